import pytest

from unifluid_jax.tools import build_shapes


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small embedded dataset (64 px) with its tokenizer, built once per test session."""
    out = tmp_path_factory.mktemp("shapes")
    build_shapes.build(str(out), size=64, num_train=256, num_val=64, num_test=32, num_shards=1, num_geneval=4)
    return str(out)
