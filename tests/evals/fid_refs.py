"""pytorch-fid's FID Inception with random weights (nothing is downloaded), for parity tests.

The published weights file is the state dict of pytorch-fid's `fid_inception_v3()`; here that function
runs with its weight download and load skipped, its weights are randomised, and that state dict is what
`pytorch_fid.inception.InceptionV3` then loads through its own (patched-URL) loading path.
"""
import os
import re
import sys
from unittest import mock

import numpy as np
import pytest
import torch

# torchvision is installed outside site-packages (see setup.py): importable only by these tests.
TORCHVISION_DIR = os.path.join(sys.prefix, "fid_refs")
INSTALL = (f"pip install --no-deps --target {TORCHVISION_DIR} torchvision==0.28.0 && "
           "pip install --no-deps pytorch-fid==0.3.0 clean-fid==0.1.35")

_OPS = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: its definitions go with it


def import_torchvision():
    """The PyPI torchvision wheel is a CUDA build whose C++ ops do not load next to the CPU torch used here;
    its import then fails registering fake kernels for those ops (torchvision::nms, ...). Declaring each
    missing op's schema lets the (pure Python) model code import; the ops are never called."""
    if TORCHVISION_DIR not in sys.path and os.path.isdir(TORCHVISION_DIR):
        sys.path.append(TORCHVISION_DIR)
    for _ in range(20):
        try:
            import torchvision
            return torchvision
        except RuntimeError as e:
            m = re.search(r"operator torchvision::(\w+) does not exist", str(e))
            if not m:
                raise
            for k in [k for k in sys.modules if k.startswith("torchvision")]:
                del sys.modules[k]
            _OPS.define(f"{m.group(1)}(Tensor x) -> Tensor")
    raise RuntimeError("torchvision does not import")


def pytorch_fid():
    try:
        tv = import_torchvision()
        from pytorch_fid import inception
    except ImportError as e:
        pytest.skip(f"FID references not installed ({e}); install with: {INSTALL}")
    return tv, inception


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the layout of pt_inception-2015-12-05-*.pth, random (He-scaled convs, random BN stats)."""
    tv, pf = pytorch_fid()
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tv.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None):
        net = pf.fid_inception_v3()
    g = torch.Generator().manual_seed(seed)
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if v.ndim >= 2:
            fan_in = int(np.prod(v.shape[1:]))
            v.copy_(torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
        else:
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
    return {k: v.clone() for k, v in sd.items()}


def fid_models(state_dict):
    """(pytorch_fid.inception.InceptionV3 (pool3, resize + normalise inside), fid_inception_v3 (to logits)),
    both loading `state_dict` through pytorch-fid's own code, in eval mode."""
    _, pf = pytorch_fid()
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state_dict):
        return pf.InceptionV3([3]).eval(), pf.fid_inception_v3().eval()
