"""Mesh construction and host batch assembly, including device orders where a host's rows are not one block."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unifluid_jax.train import sharding


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="cannot fill 8 devices"):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        sharding.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


@pytest.mark.parametrize("order", ["natural", "shuffled"])
def test_make_global_batch_any_device_order(order):
    devices = list(jax.devices())
    if order == "shuffled":  # like a TPU torus order: mesh position != device id order
        devices = [devices[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    shardings = {"x": NamedSharding(mesh, P(("data", "fsdp"), None)), "t": NamedSharding(mesh, P(("data", "fsdp")))}
    index, count, local = sharding.data_shard(shardings["x"], 8)
    assert (index, count, local) == (0, 1, 8)  # one process feeds every row
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    t = np.arange(8, dtype=np.int32)
    out = sharding.make_global_batch({"x": x, "t": t}, shardings, 8)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["t"], t)
    for shard in out["x"].addressable_shards:  # each device holds exactly its rows
        np.testing.assert_array_equal(shard.data, x[shard.index])


def test_make_global_batch_checks_rows():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s = {"x": NamedSharding(mesh, P(("data", "fsdp")))}
    with pytest.raises(ValueError, match="local rows 6 != expected 8"):
        sharding.make_global_batch({"x": np.zeros((6,))}, s, 8)
    with pytest.raises(KeyError, match="no logical axes"):
        sharding.make_global_batch({"y": np.zeros((8,))}, s, 8)


def test_pod_hosts_feed_non_contiguous_rows():
    """v5p-32 (16 chips, 4 hosts): the torus order gives each host 4 separate row blocks of ('data','fsdp')."""
    from unifluid_jax.tools import aot
    if aot.find_libtpu() is None:
        pytest.skip("libtpu not installed (make test installs it into .venv/libtpu-aot)")
    _, devices = aot.devices_for("v5p-32")
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    s = NamedSharding(mesh, P(("data", "fsdp")))
    ranges = sharding.process_batch_rows(s, 2048)
    assert sum(b - a for a, b in ranges) == 512 and len(ranges) > 1
    assert sharding.data_shard(s, 2048) == (0, 4, 512)
