"""Frechet distance between Gaussian fits of image features, with a pluggable feature extractor.

FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the formula of FID (Heusel et al. 2017) as computed
by pytorch-fid: scipy.linalg.sqrtm of the product, an eps * I offset on both covariances when the
product is singular (non-finite root), and the imaginary part dropped only if negligible on the diagonal.

FID proper uses the FID Inception's pool3 features (evals/inception.py, `Extractor.pool3`); reference
statistics come from a folder of images (`folder_stats`) or a pytorch-fid / clean-fid `.npz` (`load_stats`:
both store 'mu' and 'sigma'). `inception_score` is IS (Salimans et al. 2016) from Inception logits.
The default `shapes_features` is a cheap hand-made extractor for shapes images, NOT Inception: numbers
computed with it are only comparable to each other (same extractor, same image size), never to published FIDs.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable

import numpy as np
from scipy import linalg

from unifluid_jax.data import shapes
from unifluid_jax.evals import detector


class FeatureStats:
    """Running mean / covariance of feature vectors, accumulated in float64 (sum and sum of outer
    products), so features can be streamed batch by batch."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self._sum = None if dim is None else np.zeros(dim)
        self._outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features) -> "FeatureStats":
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got {f.shape}")
        if self._sum is None:
            self.dim = f.shape[1]
            self._sum, self._outer = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        if f.shape[1] != self.dim:
            raise ValueError(f"feature dim {f.shape[1]} != {self.dim}")
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f
        return self

    def mean(self) -> np.ndarray:
        return self._sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased (N - 1) covariance, as np.cov(rowvar=False) in pytorch-fid."""
        if self.n < 2:
            raise ValueError("need at least 2 samples for a covariance")
        mu = self.mean()
        return (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's computation)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("mean / covariance shapes differ")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FD: singular product; adding {eps} to the diagonal of the covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FD: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from a pytorch-fid / clean-fid statistics file (np.savez with 'mu', 'sigma')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path!r} do not exist (a pytorch-fid / clean-fid .npz "
                                "with 'mu' and 'sigma', or one written by save_stats)")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"reference statistics {path}: no {missing} array (has {f.files}); expected the "
                             "pytorch-fid / clean-fid layout np.savez(path, mu=..., sigma=...)")
        mu, sigma = f["mu"][:], f["sigma"][:]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {path}: mu {mu.shape} and sigma {sigma.shape} are not [D], [D, D]")
    return mu, sigma


def save_stats(path: str, stats: "FeatureStats") -> None:
    """Writes the pytorch-fid / clean-fid layout (readable by both: np.savez_compressed mu, sigma)."""
    np.savez_compressed(path, mu=stats.mean(), sigma=stats.cov())


def fid_against(stats: "FeatureStats", ref_mu, ref_sigma, what: str = "reference statistics",
                eps: float = 1e-6) -> float:
    """FID of accumulated features against reference (mu, sigma); a feature-dimension mismatch (e.g. stats of
    another network or block) is one clear error."""
    if np.shape(ref_mu)[0] != stats.dim:
        raise ValueError(f"{what} have feature dim {np.shape(ref_mu)[0]} but the features are {stats.dim}-d; "
                         "FID needs stats of the same network layer (Inception pool3 = 2048)")
    return frechet_distance(stats.mean(), stats.cov(), ref_mu, ref_sigma, eps)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (the original code's protocol;
    pass Inception's 'logits_unbiased' for numbers comparable to it and torch-fidelity)."""
    logits = np.asarray(logits, np.float64)
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"inception_score: {n} samples for {splits} splits")
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    scores = []
    for k in range(splits):
        part = logp[k * (n // splits):(k + 1) * (n // splits)]
        log_py = np.log(np.exp(part).mean(0))
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's


def image_files(folder: str) -> list[str]:
    """The image files of a folder, sorted by name (pytorch-fid's selection)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_images(files: Iterable[str], batch_size: int) -> Iterable[np.ndarray]:
    """uint8 [B, H, W, 3] batches (RGB-converted, as pytorch-fid / clean-fid read files); a batch holds
    consecutive images of one size."""
    from PIL import Image
    batch = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(a)
    if batch:
        yield np.stack(batch)


def folder_stats(feature_fn: Callable[[np.ndarray], np.ndarray], folder: str, batch_size: int = 50) -> "FeatureStats":
    """Feature statistics of every image in `folder` (e.g. reference stats from real images)."""
    return feature_stats(feature_fn, read_images(image_files(folder), batch_size))


def _batches(images, batch_size: int) -> Iterable[np.ndarray]:
    if hasattr(images, "shape"):  # one array (numpy or jax) of all images / features
        for i in range(0, images.shape[0], batch_size):
            yield np.asarray(images[i:i + batch_size])
    else:  # an iterable of batches (e.g. a generator from an inference loop)
        for b in images:
            yield np.asarray(b)


def feature_stats(feature_fn: Callable[[np.ndarray], np.ndarray], images, batch_size: int = 64) -> FeatureStats:
    """Stats of feature_fn over images ([N, H, W, 3] array, or an iterable of such batches)."""
    stats = FeatureStats()
    for b in _batches(images, batch_size):
        stats.update(feature_fn(b))
    return stats


def compute_fd(feature_fn: Callable[[np.ndarray], np.ndarray], images_a, images_b, batch_size: int = 64,
               eps: float = 1e-6) -> float:
    """FD between two image sets under `feature_fn(batch [B, H, W, 3]) -> [B, D]`."""
    a = feature_stats(feature_fn, images_a, batch_size)
    b = feature_stats(feature_fn, images_b, batch_size)
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov(), eps)


def shapes_features(images, pool: int = 8) -> np.ndarray:
    """Default extractor for shapes images, NOT Inception. Per image: the fraction of pixels of each
    palette colour in each 3x3 grid cell (what objects are where, via the detector's colour
    segmentation; 9 x 8 values) and the image average-pooled to pool x pool x 3 in [0, 1] (shape and
    texture). [B, H, W, 3] uint8 or float in [-1, 1] -> [B, 72 + 3 pool^2] float64."""
    out = []
    for im in images:
        im = detector.to_uint8(im)
        H, W, _ = im.shape
        seg = detector.segment_colors(im)
        cells = []
        for r in range(shapes.GRID):
            for c in range(shapes.GRID):
                x0, _, x1, _ = shapes.cell_box(r, c, W)
                _, y0, _, y1 = shapes.cell_box(r, c, H)
                block = seg[y0:y1, x0:x1]
                cells.append(np.bincount(block[block >= 0], minlength=len(shapes.COLORS)) / block.size)
        ph, pw = H // pool, W // pool
        pooled = im[:ph * pool, :pw * pool].astype(np.float64).reshape(pool, ph, pool, pw, 3).mean((1, 3))
        out.append(np.concatenate([np.concatenate(cells), pooled.ravel() / 255.0]))
    return np.stack(out)
