"""Text decoding: search cores on an exact fake model, KV-cached == uncached on the tiny model and equal to the
training path (UniFluid.loss_terms on fixed training rows), bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference.common import tiny_model
from unifluid_jax import layout
from unifluid_jax.models.unifluid import UniFluid
from unifluid_jax.inference import decode as D

PAD, EOS = layout.PAD_ID, layout.EOS_ID
A, B, C = 5, 6, 7  # token ids of the fake model
V = 8


def _markov(table):
    """A fake model whose next-token log-probs depend only on the last token: state = last token [N]."""
    logp = jnp.full((V, V), -1e4).at[tuple(zip(*table))].set(jnp.log(jnp.array(list(table.values()))))
    # rows with no entry (PAD after EOS) are uniform over PAD so finished rows are well defined
    logp = logp.at[PAD, PAD].set(0.0).at[EOS, PAD].set(0.0)

    def logits_fn(state, tokens, t):
        return logp[tokens], tokens
    return logits_fn, logp


# First token: A (0.6) or B (0.4). After A: A 0.3, C 0.26, EOS 0.24, B 0.2; after B: EOS 0.9. Greedy takes
# A A A A (0.6 * 0.3^3 = 0.0162, never ends); the best sequence is B EOS = 0.36.
TABLE = {(A, A): 0.3, (A, B): 0.2, (A, C): 0.26, (A, EOS): 0.24, (B, EOS): 0.9, (B, C): 0.1,
         (C, EOS): 1.0}
FIRST = jnp.log(jnp.array([[0, 0, 0, 0, 0, 0.6, 0.4, 0]])).repeat(2, 0)


def test_beam_search_beats_greedy_on_a_constructed_example():
    logits_fn, _ = _markov(TABLE)
    state = jnp.zeros((2,), jnp.int32)
    greedy = jax.jit(functools.partial(D.sample_loop, logits_fn, max_new_tokens=4))(state, FIRST)
    beam = jax.jit(functools.partial(D.beam_search, logits_fn, beam_size=2, max_new_tokens=4))(state, FIRST)
    assert greedy["tokens"][0].tolist() == [A, A, A, A]
    np.testing.assert_allclose(greedy["logprob"], np.log(0.6 * 0.3 ** 3), rtol=1e-5)
    assert beam["tokens"][0].tolist() == [B, EOS, PAD, PAD]
    np.testing.assert_allclose(beam["logprob"], np.log(0.36), rtol=1e-6)
    assert beam["length"].tolist() == [2, 2]
    assert float(beam["score"][0]) > float(greedy["logprob"][0])
    # The finished beam kept its score while the other beam went on (A A A A, the greedy sequence).
    np.testing.assert_allclose(beam["beam_scores"][0], np.log([0.36, 0.6 * 0.3 ** 3]), rtol=1e-5)
    assert beam["beams"][0, 1].tolist() == [A, A, A, A]


def test_beam_length_normalisation_prefers_longer():
    # A EOS = 0.55 (2 tokens, per-token log 0.5 * log 0.55 = -0.299); B D EOS = 0.45 (3 tokens, -0.266).
    d = 4
    logits_fn, _ = _markov({(A, EOS): 1.0, (B, d): 1.0, (d, EOS): 1.0})
    first = jnp.log(jnp.array([[0.0] * 5 + [0.55, 0.45, 0.0]]))
    run = lambda a: D.beam_search(logits_fn, jnp.zeros((1,), jnp.int32), first, beam_size=3, max_new_tokens=5,
                                  length_norm=a)
    raw, norm = run(0.0), run(1.0)
    assert raw["tokens"][0].tolist() == [A, EOS, PAD, PAD, PAD]
    assert norm["tokens"][0].tolist() == [B, d, EOS, PAD, PAD]
    np.testing.assert_allclose(norm["score"][0], np.log(0.45) / 3, rtol=1e-5)
    np.testing.assert_allclose(raw["score"][0], np.log(0.55), rtol=1e-5)


def test_beam_one_is_greedy_and_sampling_cores():
    rng = np.random.default_rng(0)
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(V, V)) * 3, jnp.float32))
    fn = lambda s, tok, t: (logp[tok] + 0.1 * t, tok)  # step-dependent offset leaves argmax unchanged
    first = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    state = jnp.zeros((4,), jnp.int32)
    greedy = D.sample_loop(fn, state, first, max_new_tokens=6)
    beam = D.beam_search(fn, state, first, beam_size=1, max_new_tokens=6)
    np.testing.assert_array_equal(greedy["tokens"], beam["tokens"])
    np.testing.assert_allclose(greedy["logprob"], beam["logprob"], rtol=1e-6)
    # After EOS every row is PAD.
    toks = np.asarray(greedy["tokens"])
    for row in toks:
        if EOS in row.tolist():
            assert (row[row.tolist().index(EOS) + 1:] == PAD).all()
    # Sampling with top_k=1 or a vanishing temperature is greedy; top_p keeps the nucleus.
    k = jax.random.PRNGKey(0)
    for kw in (dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-3)):
        s = D.sample_loop(fn, state, first, k, max_new_tokens=6, greedy=False, **kw)
        np.testing.assert_array_equal(s["tokens"], greedy["tokens"])
    f = D.filter_logits(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), top_p=0.75)
    assert np.isfinite(np.asarray(f)).tolist() == [[True, True, False, False]]
    f = D.filter_logits(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), top_k=3)
    assert np.isfinite(np.asarray(f)).tolist() == [[True, True, True, False]]
    draws = D.select_tokens(jax.random.PRNGKey(1), jnp.zeros((2000, 4)), greedy=False)
    assert set(np.asarray(draws).tolist()) == {0, 1, 2, 3}


def _questions():
    cfg, _, _ = tiny_model()
    u = cfg.siglip.image_size
    images = np.random.default_rng(1).uniform(-1, 1, (3, u, u, 3)).astype(np.float32)
    cap = D.question_batch(cfg, images[:2], None, task="caption", caption_prompt=[11, 12], sep_ids=(4,))
    vqa = D.question_batch(cfg, images[2:], [[13, 14, 15]], task="vqa", sep_ids=(4,))
    return {k: np.concatenate([cap[k], vqa[k]]) for k in cap}


def test_cached_decoding_equals_uncached():
    _, model, params = tiny_model()
    batch = _questions()
    out_c = D.decode_text(model, params, batch, max_new_tokens=5, return_logits=True)
    out_u = D.decode_text(model, params, batch, max_new_tokens=5, return_logits=True, use_cache=False)
    np.testing.assert_array_equal(out_c["tokens"], out_u["tokens"])
    assert np.abs(out_c["logits"] - out_u["logits"]).max() <= 1e-5
    assert out_c["tokens"].shape == (3, 5) and out_c["logits"].shape == (3, 5, 64)
    # Greedy: each token is the argmax of its logits (PAD once a row has finished).
    lengths = out_c["length"]
    for i in range(3):
        n = int(lengths[i])
        np.testing.assert_array_equal(out_c["tokens"][i, :n], out_c["logits"][i, :n].argmax(-1))
        assert (out_c["tokens"][i, n:] == PAD).all()
    # Beam search through the model: the cached path (KV-cache rows reordered per step) equals the uncached one.
    beam_c = D.decode_text(model, params, batch, max_new_tokens=5, method="beam", beam_size=2)
    beam_u = D.decode_text(model, params, batch, max_new_tokens=5, method="beam", beam_size=2, use_cache=False)
    np.testing.assert_array_equal(beam_c["beams"], beam_u["beams"])
    assert np.abs(beam_c["beam_scores"] - beam_u["beam_scores"]).max() <= 1e-5
    assert beam_c["beams"].shape == (3, 2, 5)
    assert (beam_c["score"] >= beam_c["beam_scores"][:, 1]).all()


def test_decoded_logits_equal_the_training_path():
    """Teacher forcing through TRAINING: each question with its greedy answer laid out as a fixed training row
    (und | src | text | gen, not decoding's [und | text] rows) through UniFluid.loss_terms; the NLL of every
    answer token equals -log_softmax of the logits decoding chose it from."""
    cfg, model, params = tiny_model()
    batch = _questions()
    out = D.decode_text(model, params, batch, max_new_tokens=2, return_logits=True)
    exs, want = [], []
    for i in range(3):
        n_pre = int(batch["text_input_mask"][i].sum())
        toks = [int(t) for t in out["tokens"][i, :int(out["length"][i])]]
        answer = toks[:-1] if toks and toks[-1] == EOS else toks
        text = layout.text_layout(int(batch["task"][i]), batch["text_tokens"][i, 1:n_pre - 1], answer,
                                  cfg.max_text_len, sep_ids=(4,))
        exs.append({"task": batch["task"][i], "image_und": batch["image_und"][i], **text,
                    "gen_tokens": np.zeros((cfg.n_img, cfg.token_dim), np.float32)})
        logp = jax.nn.log_softmax(out["logits"][i, :len(toks)])
        want.append([-float(logp[t, tok]) for t, tok in enumerate(toks)])
    rows, _ = layout.layout_examples(exs, layout.fixed_spec(cfg.dims), cfg.dims, layout="fixed")
    terms = model.apply(params, rows, jax.random.PRNGKey(0), 0, 1, method=UniFluid.loss_terms)
    for i in range(3):
        got = np.asarray(terms["nll"][i, :len(want[i])])
        assert len(want[i]) >= 1 and (rows["tgt_task"][i, :len(want[i])] >= 0).all()
        np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-5)


def test_bad_input():
    cfg, model, params = tiny_model()
    u = cfg.siglip.image_size
    img = np.zeros((2, u, u, 3), np.float32)
    with pytest.raises(ValueError, match="no images given"):
        D.question_batch(cfg, [], None)
    with pytest.raises(ValueError, match="no questions given"):
        D.question_batch(cfg, img, [], task="vqa")
    with pytest.raises(ValueError, match=r"question 1 .*too long.*max_text_len=8"):
        D.question_batch(cfg, img, [[5], list(range(5, 12))], task="vqa", sep_ids=(4,))
    with pytest.raises(ValueError, match="unknown decoding method"):
        D.decode_text(model, params, _questions(), method="nucleus")
    with pytest.raises(ValueError, match="needs an rng"):
        D.decode_text(model, params, _questions(), method="sample")


class _Tok:
    def decode(self, ids):
        return " ".join(str(i) for i in ids if i not in (PAD, layout.BOS_ID))


def test_detokenize():
    assert D.detokenize(_Tok(), np.array([[5, 6, 0], [7, 0, 0]])) == ["5 6", "7"]
