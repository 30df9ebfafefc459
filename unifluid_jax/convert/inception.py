"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`, the state dict of its
`fid_inception_v3()`) <-> evals/inception.py params, both ways, exact.

The Flax tree uses the torch module names, so each tensor maps by rule: '<block>.conv.weight' OIHW <->
'conv/kernel' HWIO; '<block>.bn.{weight,bias,running_mean,running_var}' <-> 'bn/{scale,bias,mean,var}';
'fc.weight' (O, I) <-> 'fc/kernel' (I, O). BatchNorm's 'num_batches_tracked' counters (present when the
dict was saved from a torch module) carry no weights and are ignored. The file is the one pytorch-fid
downloads (FID_WEIGHTS_URL in pytorch_fid/inception.py); nothing is fetched here.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unifluid_jax.convert.vae import (Entry, Path, assign_checked, conv_to_hwio, conv_to_oihw, expected_shapes,
                                      identity, read_weights_file)
from unifluid_jax.evals import inception as inception_lib

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=1)
def _expected() -> dict[Path, object]:
    x = jnp.zeros((1, inception_lib.SIZE, inception_lib.SIZE, 3), jnp.float32)
    return expected_shapes(inception_lib.FIDInceptionV3(), x)


def _entries(expected) -> list[Entry]:
    out = []
    for path in expected:
        *mod, leaf = path
        if mod[-1] == "bn":
            out.append((path, ".".join(mod + [_BN[leaf]]), identity, identity))
        elif leaf == "kernel" and mod[-1] == "conv":
            out.append((path, ".".join(mod + ["weight"]), conv_to_hwio, conv_to_oihw))
        elif leaf == "kernel":  # fc
            out.append((path, ".".join(mod + ["weight"]), np.transpose, np.transpose))
        else:
            out.append((path, ".".join(mod + [leaf]), identity, identity))
    return out


def params_from_torch(state_dict: Mapping[str, object], what: str = "FID Inception") -> dict:
    """pytorch-fid FID Inception state dict (torch or numpy tensors) -> {'params': ...}."""
    exp = _expected()
    return {"params": assign_checked(exp, _entries(exp), state_dict, what,
                                     ignore=lambda k: k.endswith("num_batches_tracked"))}


def params_to_torch(params) -> dict[str, np.ndarray]:
    """{'params': ...} -> the pytorch-fid state dict (numpy), loadable by fid_inception_v3's load_state_dict."""
    flat = traverse_util.flatten_dict(params.get("params", params))
    exp = _expected()
    bad = [p for p in exp if p not in flat or tuple(flat[p].shape) != exp[p].shape] + [p for p in flat if p not in exp]
    if bad:
        got = flat.get(bad[0])
        raise ValueError(f"FID Inception to torch: param {'/'.join(bad[0])} has shape "
                         f"{None if got is None else tuple(got.shape)}, the network expects "
                         f"{exp[bad[0]].shape if bad[0] in exp else None}")
    return {key: np.ascontiguousarray(bwd(np.asarray(flat[path], np.float32))) for path, key, _, bwd in _entries(exp)}


def load(path: str) -> dict:
    """The published weights file (or any file holding the same state dict) -> {'params': ...}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights file {path!r} does not exist; expected pytorch-fid's {WEIGHTS_FILE} "
            f"(download it from {WEIGHTS_URL} on a machine with internet access and pass its path)")
    return params_from_torch(read_weights_file(path), what=f"FID Inception weights {path} (expected {WEIGHTS_FILE})")


def save(params, path: str) -> None:
    import torch
    torch.save({k: torch.from_numpy(v.copy()) for k, v in params_to_torch(params).items()}, path)
