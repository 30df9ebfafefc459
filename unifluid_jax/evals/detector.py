"""Analytic object detector for shapes images (numpy + scipy.ndimage, no learned weights).

Pipeline:
1. Colour segmentation: every pixel goes to its nearest palette colour, with a distance threshold and
   the background rejected (see `segment_colors`: by default the distance is to the blend of each
   colour with the background, which keeps blurred objects whole).
2. Connected components (8-connected) per palette colour. Thin fringes of another colour hugging a
   larger object (what blurred edges of generated images turn into, e.g. an orange rim around yellow)
   are merged into that object; components below `min_area_frac` of a grid cell are noise and dropped.
3. Shape and size, holes filled first. (a) Anchored: on square images the mask is compared (IoU) with
   the dataset's own rasterisation of each (shape, size) at the cell of the component's centre; if the
   best IoU >= `anchored_iou` that (shape, size) is taken. This makes clean renders exact even at 32 px,
   where a small object is 4-5 px wide and generic templates are ambiguous. (b) Otherwise (off-centre,
   distorted or non-square images) the mask is compared with the four ideal templates (circle, square,
   apex-up triangle, cross) drawn in the component's own bounding box. This combines the classic
   features in one score: fill ratio of the box (square 1, circle pi/4, cross 5/9, triangle 1/2),
   empty vs full corners, and up/down symmetry (triangle vs cross); size comes from the box extent
   relative to the cell side (threshold halfway between the two `shapes.SIZE_FRACTION`s).
   Components whose best IoU is below `min_iou` are not objects.
4. Grid cell from the box centre.

Limit: at 32 px a small circle and a small square in the centre cell rasterise to the same 4x4 block,
so they cannot be told apart (the tie goes to circle, first in `shapes.SHAPES`); every other case at
>= 32 px is distinct.

Returns objects in the shapes metadata format {shape, color, size, row, col, bbox}, sorted row-major,
so on clean renders `detect(render(scene)) == scene["objects"]`.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from unifluid_jax.data import shapes

_COLORS = np.array([shapes.PALETTE[c] for c in shapes.COLORS], np.float64)  # [C, 3]
_ALL = np.concatenate([_COLORS, np.array([shapes.BACKGROUND], np.float64)])  # palette + background
_SIZE_THRESHOLD = (shapes.SIZE_FRACTION["small"] + shapes.SIZE_FRACTION["large"]) / 2
_EIGHT = np.ones((3, 3), bool)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 from uint8 or float in [-1, 1] (the model's pixel range)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected uint8 or float in [-1, 1], got {image.dtype}")
    return np.clip(np.round((image.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def segment_colors(image: np.ndarray, max_color_dist: float = 110.0, blend: bool = True) -> np.ndarray:
    """[H, W] int map: index into `shapes.COLORS`, or -1 for background / unassigned pixels.

    blend=False: plain nearest colour among palette + background, rejected beyond `max_color_dist`.
    blend=True (default): distance to the segment from the background to each palette colour, i.e.
    the pixel is modelled as alpha * colour (alpha in [0, 1]) as blurred or anti-aliased edges on the
    black background are; it is foreground when the best colour has alpha >= 1/2 (the pixel is nearer
    the colour than the background along that segment) and the residual is <= `max_color_dist`. On
    flat renders both agree; on blurred ones the blend keeps objects at their true (half-intensity)
    edge instead of eroding bright colours such as white.
    """
    img = to_uint8(image).astype(np.float64)
    if not blend:
        d2 = ((img[:, :, None, :] - _ALL[None, None]) ** 2).sum(-1)  # [H, W, C+1]
        nearest = d2.argmin(-1)
        ok = (nearest < len(_COLORS)) & (d2.min(-1) <= max_color_dist ** 2)
        return np.where(ok, nearest, -1)
    bg = _ALL[-1]
    dirs = _COLORS - bg  # [C, 3]
    alpha = np.clip(np.einsum("hwk,ck->hwc", img - bg, dirs) / (dirs ** 2).sum(-1), 0.0, 1.0)
    resid2 = (((img - bg)[:, :, None, :] - alpha[..., None] * dirs) ** 2).sum(-1)  # [H, W, C]
    best = resid2.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r2 = np.take_along_axis(resid2, best[..., None], -1)[..., 0]
    return np.where((a >= 0.5) & (r2 <= max_color_dist ** 2), best, -1)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling an h x w box, sampled at pixel centres (normalised coords in [-1, 1])."""
    v = (np.arange(h) + 0.5) / h * 2 - 1
    u = (np.arange(w) + 0.5) / w * 2 - 1
    u, v = u[None, :], v[:, None]
    third = 1 / 3
    return {
        "circle": u * u + v * v <= 1,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(u) <= (v + 1) / 2,
        "cross": ((np.abs(v) <= third) & (np.abs(u) <= 1)) | ((np.abs(u) <= third) & (np.abs(v) <= 1)),
    }


@functools.lru_cache(maxsize=64)
def _anchored_masks(size: int, row: int, col: int) -> tuple[tuple[str, str, np.ndarray], ...]:
    """Full-image masks of every (shape, size) rendered by the dataset at one cell."""
    out = []
    for shape in shapes.SHAPES:
        for sz in shapes.SIZES:
            obj = shapes.make_object(shape, "white", sz, row, col, size)
            out.append((shape, sz, shapes.render({"size": size, "objects": [obj]})[..., 0] > 0))
    return tuple(out)


def classify_anchored(mask: np.ndarray, row: int, col: int) -> tuple[str, str, float]:
    """(shape, size, IoU) of a full-image mask against the dataset rasterisations at (row, col)."""
    best = ("square", "small", -1.0)
    for shape, sz, t in _anchored_masks(mask.shape[0], row, col):
        iou = float((mask & t).sum() / max((mask | t).sum(), 1))
        if iou > best[2]:
            best = (shape, sz, iou)
    return best


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of a tight-cropped binary mask against the four templates."""
    best, best_iou = "square", -1.0
    for name, t in _templates(*mask.shape).items():
        iou = (mask & t).sum() / max((mask | t).sum(), 1)
        if iou > best_iou:
            best, best_iou = name, float(iou)
    return best, best_iou


def _merge_fringes(labels: np.ndarray, colors: list[int], areas: np.ndarray, fringe_ratio: float):
    """Map each component to itself or to a larger touching component of another colour that it is
    a thin fringe of (area < fringe_ratio x the neighbour's). Returns parent index per component."""
    n = len(colors)
    parent = np.arange(n)
    objects = ndimage.find_objects(labels)
    for i in np.argsort(areas):  # smallest first
        sl = objects[i]
        pad = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        own = labels[pad] == i + 1
        ring = ndimage.binary_dilation(own, _EIGHT) & ~own
        neigh = labels[pad][ring]
        neigh = neigh[neigh > 0] - 1
        best = None
        for j in np.unique(neigh):
            if colors[j] != colors[i] and areas[i] < fringe_ratio * areas[j]:
                if best is None or areas[j] > areas[best]:
                    best = j
        if best is not None:
            parent[i] = best
    # Resolve chains (fringe of a fringe) to the root.
    for i in range(n):
        while parent[parent[i]] != parent[i]:
            parent[i] = parent[parent[i]]
    return parent


def detect(image: np.ndarray, max_color_dist: float = 110.0, blend: bool = True, min_area_frac: float = 0.04,
           min_iou: float = 0.5, fringe_ratio: float = 0.5, anchored_iou: float = 0.85) -> list[dict]:
    """Detect shapes objects in one [H, W, 3] image (uint8 or float in [-1, 1], H, W >= 32).

    Returns [{shape, color, size, row, col, bbox=(x0, y0, x1, y1) end-exclusive}] sorted by (row, col).
    """
    seg = segment_colors(image, max_color_dist, blend)
    H, W = seg.shape
    if min(H, W) < 32:
        raise ValueError(f"detector needs images >= 32 px, got {H}x{W}")
    cell_h, cell_w = H / shapes.GRID, W / shapes.GRID
    # One label image with components of all colours (colours never share a pixel).
    labels = np.zeros((H, W), np.int32)
    colors: list[int] = []
    for c in np.unique(seg[seg >= 0]):
        lab, k = ndimage.label(seg == c, _EIGHT)
        labels[lab > 0] = lab[lab > 0] + len(colors)
        colors += [int(c)] * k
    if not colors:
        return []
    areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, len(colors) + 1))
    parent = _merge_fringes(labels, colors, areas, fringe_ratio)
    roots = parent[labels - 1] + 1
    roots[labels == 0] = 0
    min_area = min_area_frac * cell_h * cell_w
    out = []
    for r in np.unique(parent):
        mask = roots == r + 1
        if mask.sum() < min_area:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        crop = ndimage.binary_fill_holes(mask[y0:y1, x0:x1])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        row, col = min(int(cy // cell_h), shapes.GRID - 1), min(int(cx // cell_w), shapes.GRID - 1)
        iou = -1.0
        if H == W:
            mask[y0:y1, x0:x1] = crop
            shape, size, iou = classify_anchored(mask, row, col)
        if iou < anchored_iou:
            shape, iou = classify_shape(crop)
            extent = max((x1 - x0) / cell_w, (y1 - y0) / cell_h)
            size = "large" if extent > _SIZE_THRESHOLD else "small"
        if iou < min_iou:
            continue
        out.append({"shape": shape, "color": shapes.COLORS[colors[r]], "size": size, "row": row,
                    "col": col, "bbox": (x0, y0, x1, y1)})
    return sorted(out, key=lambda o: (o["row"], o["col"], o["bbox"]))


def detect_batch(images, **kwargs) -> list[list[dict]]:
    """`detect` over a batch [B, H, W, 3] or a list of images."""
    return [detect(im, **kwargs) for im in images]


def strip_bbox(objects: list[dict]) -> list[tuple]:
    """Objects as sorted (shape, color, size, row, col) tuples, for comparisons that ignore pixels."""
    return sorted((o["shape"], o["color"], o["size"], o["row"], o["col"]) for o in objects)
