"""Prefix-LM masks and positions from (input_mask, mask_ar) (SPEC 7)."""
import jax.numpy as jnp
import numpy as np

from unifluid_jax.models import masks


def test_prefix_lm_mask_table_with_padding():
    # 3 prefix tokens (bidirectional), 4 causal tokens, 2 pads at the end.
    input_mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
    mask_ar = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    expected = np.array([
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], bool)
    got = np.asarray(masks.make_attention_mask(input_mask, mask_ar))
    assert got.dtype == bool and got.shape == (1, 9, 9)
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(masks.positions_from_mask(input_mask)[0], [0, 1, 2, 3, 4, 5, 6, 6, 6])


def test_pad_between_prefix_and_suffix():
    # Pad inside the sequence: it neither attends nor is attended, and does not advance positions.
    input_mask = np.array([[1, 1, 0, 1, 1, 1]], bool)
    mask_ar = np.array([[0, 0, 0, 1, 1, 1]])
    expected = np.array([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 1, 1, 0],
        [1, 1, 0, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(np.asarray(masks.make_attention_mask(input_mask, mask_ar))[0], expected)
    np.testing.assert_array_equal(masks.positions_from_mask(input_mask)[0], [0, 1, 1, 2, 3, 4])
    # Leading pads clip at position 0.
    np.testing.assert_array_equal(masks.positions_from_mask(np.array([[0, 0, 1, 1]]))[0], [0, 0, 0, 1])


def test_causal_default_and_cache_step_slice():
    full = masks.make_attention_mask(np.ones((2, 5), bool), np.ones((2, 5), int))
    np.testing.assert_array_equal(np.asarray(full[0]), np.tril(np.ones((5, 5), bool)))
    step = masks.cache_step_mask(full, jnp.int32(2), 2)
    assert step.shape == (2, 2, 5)
    np.testing.assert_array_equal(np.asarray(step[1]), np.tril(np.ones((5, 5), bool))[2:4])
