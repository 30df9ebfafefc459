"""optax optimizer from `config.optimizer`: AdamW, warmup + constant/cosine/wsd, clipping, decay mask, freezing.

Params are addressed by their '/'-joined path (e.g. 'decoder/layers/attn/q_einsum/w'); regexes use re.search.
Frozen params go through `optax.set_to_zero` inside `optax.multi_transform`, so they keep no Adam moments.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unifluid_jax.checks import ConfigError, check, check_choice, check_positive
from unifluid_jax.train import sharding

# Never decayed, whatever the config says (paper/MAR recipe: biases, norms and 1-D params).
BUILTIN_NO_DECAY = (r"(^|/)bias$", r"(^|/)b$", r"norm", r"(^|/)scale$")
SCHEDULES = ("constant", "cosine", "wsd")


def validate_config(section, path: str = "optimizer") -> None:
    check_positive(section, path, "lr", allow_zero=True)
    check_positive(section, path, "warmup_steps", "weight_decay", "grad_clip", allow_zero=True)
    check_positive(section, path, "grad_accum_steps", "eps")
    check_choice(section.schedule, f"{path}.schedule", SCHEDULES)
    check(0 <= section.b1 < 1 and 0 <= section.b2 < 1, f"{path}.b1/b2",
          f"betas must be in [0, 1), got ({section.b1}, {section.b2})")
    check(0 <= section.ema_decay < 1, f"{path}.ema_decay", f"must be in [0, 1) (0 = off), got {section.ema_decay}")
    check(0 < section.decay_frac <= 1, f"{path}.decay_frac", f"must be in (0, 1], got {section.decay_frac}")
    check(0 <= section.end_lr_ratio <= 1, f"{path}.end_lr_ratio", f"must be in [0, 1], got {section.end_lr_ratio}")
    for field in ("no_decay_regexes", "frozen_regexes"):
        for rx in section[field]:
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"config.{path}.{field}: bad regex {rx!r}: {e}") from None


def schedule(section, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then constant (paper default), cosine down to lr * end_lr_ratio, or wsd
    (warmup-stable-decay): constant, then linear down to lr * end_lr_ratio over the last `decay_frac` of the
    run, which a run of known length anneals with while keeping the constant rate for most of it."""
    lr, warm = float(section.lr), int(section.warmup_steps)
    if section.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif section.schedule == "wsd":
        decay = max(int(round(float(section.decay_frac) * total_steps)), 1)
        stable = max(total_steps - warm - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(lr),
                                      optax.linear_schedule(lr, lr * float(section.end_lr_ratio), decay)], [stable])
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=float(section.end_lr_ratio))
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def param_paths(tree) -> Any:
    """Same-structure tree of '/'-joined key paths (boxes are treated as leaves)."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return jax.tree_util.tree_map_with_path(lambda p, _: name(p), tree,
                                            is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _effective_ndim(leaf) -> int:
    """ndim without the scanned 'layers' axis, so a stacked norm scale (layers, D) still counts as 1-D."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        return sum(n != "layers" for n in leaf.names)
    return len(leaf.shape)


def decay_mask(section, boxed_params):
    """True where weight decay applies: >= 2-D (ignoring 'layers') and no builtin/config regex matches."""
    rxs = [re.compile(r) for r in BUILTIN_NO_DECAY + tuple(section.no_decay_regexes)]
    paths = param_paths(boxed_params)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    mask = jax.tree.map(lambda p, x: _effective_ndim(x) >= 2 and not any(r.search(p) for r in rxs),
                        paths, boxed_params, is_leaf=is_box)
    return mask


def frozen_labels(section, params):
    """'frozen' / 'train' label per param path."""
    rxs = [re.compile(r) for r in section.frozen_regexes]
    return jax.tree.map(lambda p: "frozen" if any(r.search(p) for r in rxs) else "train", param_paths(params))


def make(section, boxed_params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transform for params shaped like `boxed_params` (abstract is fine) and its lr schedule.

    The transform works on UNBOXED params (masks/labels are computed here from the boxed tree)."""
    sched = schedule(section, total_steps)
    mask = decay_mask(section, boxed_params)  # one bool per box: already the unboxed structure
    parts = []
    if section.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(section.grad_clip)))
    parts.append(optax.adamw(sched, b1=float(section.b1), b2=float(section.b2), eps=float(section.eps),
                             weight_decay=float(section.weight_decay), mask=mask))
    tx = optax.chain(*parts)
    if section.frozen_regexes:
        labels = frozen_labels(section, sharding.unbox_abstract(boxed_params))
        if "train" not in jax.tree.leaves(labels):
            raise ConfigError("config.optimizer.frozen_regexes: every parameter is frozen; nothing would train")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, sched


def trainable_mask(section, params):
    labels = frozen_labels(section, params) if section.frozen_regexes else jax.tree.map(lambda _: "train", params)
    return jax.tree.map(lambda l: l == "train", labels)


def global_norm(tree, mask=None) -> jax.Array:
    leaves = jax.tree.leaves(tree) if mask is None else [
        x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
