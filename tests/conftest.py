"""Test-wide setup. The 8-device CPU flag must be set before jax is first imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache per test run, made by the controller and inherited (environment) by the xdist
# workers and by the subprocesses tests start: a program several tests or processes build compiles once.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unifluid_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from unifluid_jax.train import sharding  # noqa: E402


@pytest.fixture
def mesh1():
    """A 1-device mesh with the standard axis names, for single-device tests."""
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture
def mesh8():
    """All 8 fake CPU devices as data x fsdp x tensor = 2 x 2 x 2."""
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small embedded dataset (64 px) with its tokenizer, built once per test session (per worker)."""
    from unifluid_jax.tools import build_shapes
    out = tmp_path_factory.mktemp("shapes")
    build_shapes.build(str(out), size=64, num_train=256, num_val=64, num_test=32, num_shards=1, num_geneval=4)
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): xdist hands out single tests in collection order, and the demo
    test, collected near the end, would otherwise run alone while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
