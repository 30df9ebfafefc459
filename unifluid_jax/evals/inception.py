"""The FID Inception-v3 (TF-slim graph of 2015-12-05, as ported by pytorch-fid) in Flax, with the input
conventions of pytorch-fid and clean-fid.

Architecture = pytorch-fid's `fid_inception_v3()`: torchvision's Inception3 (1008 classes, no aux head)
with the FID patches: avg pools in Mixed_5*/6b-e/7b exclude the zero padding (TF's average pool), and the
last block (Mixed_7c) pools with a 3x3 max instead of an average. Module names follow the torch ones so
the converter (convert/inception.py) maps each tensor by rule. Layout NHWC; BatchNorm in inference form
(eps 1e-3, the running statistics are params: this network is never trained here).

Outputs: 'pool3' [B, 2048] (the FID features), 'logits' [B, 1008] (fc with bias) and 'logits_unbiased'
(fc without bias: what the original Inception-Score code and torch-fidelity take the softmax of).

Preprocessing (`preprocess`, uint8 [B, H, W, 3] -> network input in [-1, 1] at 299 x 299):
  'pytorch_fid': x / 255, torch bilinear resize (align_corners=False, no antialias), 2x - 1
                 (pytorch-fid's InceptionV3(resize_input=True, normalize_input=True); clean-fid's
                 'legacy_pytorch' is the same);
  'clean':       clean-fid's 'clean' mode: each channel resized by PIL bicubic in float mode, clipped to
                 [0, 255], then (x - 128) / 128 (its InceptionV3W normalisation). Runs on the host (PIL).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
MODES = ("pytorch_fid", "clean")


class BatchNorm(nn.Module):
    """Inference BatchNorm with torch's parameter set (weight, bias, running mean/var) as params."""
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class BasicConv(nn.Module):
    """torchvision BasicConv2d: conv (no bias) -> BN -> ReLU. `padding` (ph, pw) symmetric, as torch."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _conv(name, features, kernel, stride=1, padding=(0, 0)):
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv(features, k, stride, padding, name=name)


def _avg_pool_same(x):
    """3x3 stride-1 average over the valid (unpadded) pixels only: TF's average pool."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 64, 1)(x)
        b5 = _conv("branch5x5_2", 64, 5, padding=(2, 2))(_conv("branch5x5_1", 48, 1)(x))
        b3 = _conv("branch3x3dbl_1", 64, 1)(x)
        b3 = _conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(_conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3))
        bp = _conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3", 384, 3, stride=2)(x)
        bd = _conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(_conv("branch3x3dbl_1", 64, 1)(x))
        bd = _conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv("branch1x1", 192, 1)(x)
        b7 = _conv("branch7x7_1", c7, 1)(x)
        b7 = _conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = _conv("branch7x7dbl_1", c7, 1)(x)
        bd = _conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = _conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = _conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3_2", 320, 3, stride=2)(_conv("branch3x3_1", 192, 1)(x))
        b7 = _conv("branch7x7x3_1", 192, 1)(x)
        b7 = _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = _conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
    max_pool: bool = False  # FIDInceptionE_2 (Mixed_7c) pools with a max, FIDInceptionE_1 with a TF average

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 320, 1)(x)
        b3 = _conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([_conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              _conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = _conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(_conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([_conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              _conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool_same(x)
        bp = _conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
    """[B, 299, 299, 3] in [-1, 1] -> {'pool3': [B, 2048], 'logits': [B, 1008], 'logits_unbiased': ...}."""

    @nn.compact
    def __call__(self, x):
        x = _conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool(_conv("Conv2d_2b_3x3", 64, 3, padding=(1, 1))(x))
        x = _conv("Conv2d_3b_1x1", 80, 1)(x)
        x = _max_pool(_conv("Conv2d_4a_3x3", 192, 3)(x))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool3 = x.mean((1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=jax.lax.Precision.HIGHEST, name="fc")
        logits = fc(pool3)
        unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=jax.lax.Precision.HIGHEST)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


# --- preprocessing ---------------------------------------------------------------------------------------

def _torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear interpolation along one axis (align_corners=False, no
    antialias), in float32 as torch computes them: source = (dst + 0.5) * (n_in / n_out) - 0.5 clamped at 0,
    a blend of its two neighbours. The source index is one fused multiply-add on a float32 scale (exact in
    float64, rounded once), as torch's CPU kernel compiles it."""
    f32 = np.float32
    scale = np.float64(f32(n_in / n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32), f32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
    m = np.zeros((n_out, n_in), f32)
    np.add.at(m, (np.arange(n_out), i0), f32(1) - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


@functools.partial(jax.jit, static_argnums=1)
def _pytorch_fid_input(images, size: int):
    x = images.astype(jnp.float32) / 255.0
    _, H, W, _ = x.shape
    mh, mw = _torch_bilinear_matrix(H, size), _torch_bilinear_matrix(W, size)
    hp = jax.lax.Precision.HIGHEST  # the two separable passes in torch's order: along W, then H
    x = jnp.einsum("pw,bhwc->bhpc", mw, x, precision=hp)
    x = jnp.einsum("oh,bhpc->bopc", mh, x, precision=hp)
    return 2 * x - 1


def _pil_bicubic_float(channel: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    img = Image.fromarray(channel.astype(np.float32), mode="F").resize((size, size), resample=Image.BICUBIC)
    return np.asarray(img).clip(0, 255)


def clean_resize(images, size: int = SIZE) -> np.ndarray:
    """clean-fid 'clean' resize: [B, H, W, 3] uint8 -> float32 [B, 299, 299, 3] in [0, 255]."""
    images = np.asarray(images)
    return np.stack([np.stack([_pil_bicubic_float(im[..., c], size) for c in range(3)], -1)
                     for im in images]).astype(np.float32)


def check_images(images) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"Inception input must be uint8 [B, H, W, 3] (quantised images, as saved to disk), got "
                         f"{images.dtype} {tuple(images.shape)}; convert [-1, 1] floats with "
                         "inference.generate.to_uint8")


def preprocess(images, mode: str = "clean", size: int = SIZE) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] network input in [-1, 1] (see module doc for modes).
    `size` other than 299 (the network is fully convolutional, >= 75) only for cheap tests: FIDs computed at
    another size are not comparable to published ones."""
    if mode not in MODES:
        raise ValueError(f"Inception preprocessing mode {mode!r} is unknown; choose one of {MODES}")
    images = np.asarray(images)
    check_images(images)
    if mode == "pytorch_fid":
        return _pytorch_fid_input(images, size)
    return jnp.asarray((clean_resize(images, size) - 128.0) / 128.0)


@dataclasses.dataclass
class Extractor:
    """Features of uint8 images under one preprocessing mode: `extractor(images) -> dict of numpy`."""
    params: dict
    mode: str = "clean"
    size: int = SIZE
    put: object = None  # optional: places the preprocessed batch (e.g. sharded over a mesh's data axis)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Inception preprocessing mode {self.mode!r} is unknown; choose one of {MODES}")
        self._apply = jax.jit(FIDInceptionV3().apply)

    def __call__(self, images) -> dict[str, np.ndarray]:
        x = preprocess(images, self.mode, self.size)
        out = self._apply(self.params, self.put(x) if self.put else x)
        return {k: np.asarray(v) for k, v in out.items()}

    def pool3(self, images) -> np.ndarray:
        """The FID feature extractor (a `feature_fn` for evals/fid.py)."""
        return self(images)["pool3"]
