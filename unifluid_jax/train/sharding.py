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
