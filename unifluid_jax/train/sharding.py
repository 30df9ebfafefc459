"""Mesh construction and the logical-axis vocabulary shared by every module.

Every param and activation carries logical axis names; `rules` (in the config, defaults here) map them to
the mesh axes ('data', 'fsdp', 'tensor'). Names absent from the rules are replicated. flax applies the rules
in order and skips a mesh axis already used by an earlier dimension of the same array.

Param names:       vocab, embed, heads, kv_heads, head_dim, mlp, layers, norm,
                   conv_h, conv_w, conv_in, conv_out (image convs), pos (position tables)
Activation names:  act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab,
                   act_height, act_width, act_channels
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),  # K can be 1 (MQA) or smaller than the tensor axis: replicate by default
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("pos", None),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills a single -1 entry so the product equals `num_devices`; raises a clear error otherwise."""
    shape = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in shape.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    bad = [a for a, s in shape.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh: axis sizes must be >= 1 or -1, got {shape}")
    known = math.prod(s for s in shape.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh: {shape} cannot fill {num_devices} devices ({num_devices} % {known} != 0); "
                "change the mesh sizes in config.mesh")
        shape[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh: {shape} uses {known} devices but {num_devices} are available; "
            "set the sizes in config.mesh so their product is the device count (one may be -1)")
    return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (Explicit axes break logical constraints)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Config rules (lists, as ConfigDict stores them) -> the tuple form flax expects."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def logical_sharding(mesh: Mesh, logical_tree, rules=DEFAULT_RULES):
    """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
    mesh_specs = nn.logical_to_mesh(logical_tree, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(mesh: Mesh, boxed_params, rules=DEFAULT_RULES):
    """NamedShardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` params."""
    return logical_sharding(mesh, nn.get_partition_spec(boxed_params), rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------
# Config-driven helpers used by the trainer.


def jit_once(fn, devices=None, **jit_kwargs):
    """jax.jit for a function run once (initialisation). On CPU XLA's backend optimisation of its ~one fusion
    per parameter costs more than the run itself (the tiny VAE's init: 10 s -> 4 s to compile, 0.05 s to run);
    on TPU / GPU the default optimisation is kept."""
    devices = list(devices if devices is not None else jax.devices())
    opts = {"xla_backend_optimization_level": 0} if devices[0].platform == "cpu" else None
    return jax.jit(fn, compiler_options=opts, **jit_kwargs)


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh described by `config.mesh` ({data, fsdp, tensor}, one may be -1) over all global devices."""
    return make_mesh(dict(config.mesh), devices)


def rules_of(config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    rules = config.get("sharding", {}).get("rules", None) if hasattr(config, "get") else None
    return rules_from_config(rules)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(mesh: Mesh, spec: P, shape: Sequence[int]) -> P:
    """Drops mesh axes from dims they do not divide (e.g. 6 kv heads on tensor=4), so any config compiles."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axes if axes is None or shape[i] % _axis_size(mesh, axes) == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def fitted_param_shardings(mesh: Mesh, boxed_abstract, rules=DEFAULT_RULES):
    """Like `param_shardings`, but every spec is fitted to its leaf's shape (see `fit_spec`).

    Returns a tree with the structure of the UNBOXED params (one NamedSharding per array)."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract), rules)
    unboxed = unbox_abstract(boxed_abstract)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(mesh, s, x.shape)), specs, unboxed,
                        is_leaf=lambda x: isinstance(x, P))


def batch_shardings(mesh: Mesh, batch_logical_axes: Mapping[str, Sequence[str | None]], rules=DEFAULT_RULES):
    """{field: NamedSharding} from the task's per-field logical axes, e.g. ('act_batch', None)."""
    return {k: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(v), rules))
            for k, v in batch_logical_axes.items()}


def _row_ranges(index_map, global_batch: int) -> list[tuple[int, int]]:
    """Sorted distinct [start, stop) row ranges of the batch dimension in a device -> index map."""
    rows = set()
    for idx in index_map.values():
        sl = idx[0]
        rows.add((sl.start or 0, global_batch if sl.stop is None else sl.stop))
    return sorted(rows)


def process_batch_rows(sharding: NamedSharding, global_batch: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of the global batch that this process feeds, in order.

    On a TPU pod the mesh follows the physical torus, so a host's devices need not hold one contiguous block
    of ('data', 'fsdp'): a process feeds the concatenation of its ranges (see make_global_batch)."""
    return _row_ranges(sharding.addressable_devices_indices_map((global_batch,)), global_batch)


def data_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int, int]:
    """(shard_index, shard_count, local_batch) of this process for the input pipeline.

    Processes are ranked by their first row; every process must feed the same number of rows. A batch that
    is replicated across processes makes every process feed all rows (shard_count 1)."""
    ranges = process_batch_rows(sharding, global_batch)
    local = sum(b - a for a, b in ranges)
    if global_batch % local:
        raise ValueError(f"global batch {global_batch} does not split into per-process blocks of {local}")
    by_process: dict[int, int] = {}
    for dev, idx in sharding.devices_indices_map((global_batch,)).items():
        first = idx[0].start or 0
        by_process[dev.process_index] = min(first, by_process.get(dev.process_index, global_batch))
    firsts = sorted(set(by_process.values()))
    count = global_batch // local
    index = firsts.index(by_process[jax.process_index()]) if len(firsts) == count else 0
    return index, count, local


def make_global_batch(local_batch: Mapping, shardings: Mapping[str, NamedSharding], global_batch: int):
    """Per-process numpy rows -> global jax Arrays laid out by `shardings`.

    The local rows are this process's row ranges (process_batch_rows) concatenated in order; each addressable
    device gets its slice, so any device order works (contiguous or not)."""
    out = {}
    for k, v in local_batch.items():
        if k not in shardings:
            raise KeyError(f"batch field {k!r} has no logical axes in the task's batch_logical_axes")
        v = np.asarray(v)
        shape = (global_batch,) + tuple(v.shape[1:])
        index_map = shardings[k].addressable_devices_indices_map(shape)
        ranges = _row_ranges(index_map, global_batch)
        offsets, pos = {}, 0
        for a, b in ranges:
            offsets[(a, b)] = pos
            pos += b - a
        if v.shape[0] != pos:
            raise ValueError(f"batch field {k!r}: local rows {v.shape[0]} != expected {pos}")
        arrays = []
        for dev, idx in index_map.items():
            a = idx[0].start or 0
            b = global_batch if idx[0].stop is None else idx[0].stop
            local_idx = (slice(offsets[(a, b)], offsets[(a, b)] + b - a),) + tuple(idx[1:])
            arrays.append(jax.device_put(v[local_idx], dev))
        out[k] = jax.make_array_from_single_device_arrays(shape, shardings[k], arrays)
    return out


def unsharded_large_params(mesh: Mesh, shardings, abstract_params, min_size: int) -> list[str]:
    """Names of params with >= min_size elements left fully replicated although fsdp/tensor could split them."""
    split = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1)
    if split == 1:
        return []
    bad = []
    flat_s = jax.tree_util.tree_flatten_with_path(shardings)[0]
    flat_x = jax.tree.leaves(abstract_params)
    for (path, s), x in zip(flat_s, flat_x):
        if math.prod(x.shape) >= min_size and s.is_fully_replicated:
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)}")
    return bad


def unbox_abstract(tree):
    """Removes flax axis-metadata boxes without applying sharding constraints (safe outside jit)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
