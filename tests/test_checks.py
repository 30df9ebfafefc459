"""checks.check_tree_shapes: the first missing, mis-shaped or extra tensor is named with both shapes."""
import numpy as np
import pytest

from unifluid_jax.checks import check_tree_shapes

WANT = {("a", "w"): np.zeros((2, 3)), ("b",): np.zeros((4,))}


def test_matching_trees_pass():
    check_tree_shapes({("a", "w"): np.ones((2, 3)), ("b",): [0, 1, 2, 3]}, WANT, "ckpt", "run")


@pytest.mark.parametrize("got, message", [
    ({("a", "w"): np.zeros((2, 3))}, r"ckpt: no tensor b \(the run expects shape \(4,\)\)"),
    ({("a", "w"): np.zeros((3, 2)), ("b",): np.zeros(4)},
     r"ckpt: tensor a/w has shape \(3, 2\), the run expects \(2, 3\)"),
    ({**WANT, ("c", "x"): np.zeros((5,))}, r"ckpt: tensor c/x \(5,\) is not in the run's params"),
])
def test_first_difference_is_named(got, message):
    with pytest.raises(ValueError, match=message):
        check_tree_shapes(got, WANT, "ckpt", "run")


def test_error_class_is_the_callers():
    class ExportError(ValueError):
        pass
    with pytest.raises(ExportError, match="the config expects"):
        check_tree_shapes({}, WANT, "folder", "config", ExportError)
