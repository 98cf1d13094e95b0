"""Retinal vessels in colour fundus photographs: field of view (FOV), scale, camera-independent contrast, the pipeline.

Arrays are (H, W, 3) uint8 RGB photos, (H, W) bool masks and (3, H, W) float32 network inputs; sizes are pixels.
Every scale-dependent parameter is a fraction of the FOV diameter, so a photo gives the same normalised image at any
resolution and from any camera once it is rescaled to the model's FOV diameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.tasks.base import InputGridOutput, NetworkInput, TaskPipeline
from KDSegmentationLib.tasks.components import fill_holes, largest_component

# FOV threshold between the dark surround and the retina, as a fraction of the way from one level to the other.
FOV_LEVEL_FRACTION = 0.25
# Background (illumination) estimate: Gaussian sigma as a fraction of the FOV diameter. 1/50 is about 11 px at
# DRIVE's 540 px FOV: wider than the widest vessels (~12 px), small enough to follow vignetting and the optic disc.
BACKGROUND_SIGMA = 1.0 / 50.0
# Local contrast (standard deviation) estimate: sigma as a fraction of the FOV diameter.
CONTRAST_SIGMA = 1.0 / 12.0
# Local contrast is floored at this fraction of its median in the FOV so that flat dark areas are not blown up.
CONTRAST_FLOOR = 0.5
# The FOV rim is dim and blurred on every camera: statistics skip a band of this fraction of the diameter.
RIM_FRACTION = 1.0 / 100.0
# The outermost FOV band (fraction of the diameter; 3 px at 540 px) fades to black and is set to 0 in the output.
EDGE_FRACTION = 1.0 / 180.0
# Normalised values are clipped to +-CLIP standard deviations.
CLIP = 4.0


# ---------------------------------------------------------------------------------------------------------------------
# field of view
# ---------------------------------------------------------------------------------------------------------------------
def _otsu(values_u8: np.ndarray) -> int:
    hist = np.bincount(values_u8.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1.0 - w), 1e-12)
    return int(np.argmax(between))


def fov_mask(rgb: np.ndarray) -> np.ndarray:
    """Field of view of a fundus photo: (H, W, 3) uint8 -> (H, W) bool.

    The brightest channel is smoothed (JPEG noise), split into dark surround and retina by Otsu, and thresholded a
    quarter of the way from the surround's level to the retina's; the largest component with holes filled is kept.
    Works when the disc is cut at the top/bottom. A photo with no dark surround gives an all-True mask.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    bright = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]).astype(np.float32)  # 15x max(axis=2)
    size = max(3, (min(h, w) // 120) | 1)
    bright = ndi.uniform_filter(bright, size)
    t0 = _otsu(np.clip(bright, 0, 255).astype(np.uint8))
    dark, lit = bright[bright <= t0], bright[bright > t0]
    if dark.size == 0 or lit.size == 0:
        return np.ones((h, w), dtype=bool)
    bg, fg = float(np.median(dark)), float(np.median(lit))
    # a real surround is near black and much darker than the retina; otherwise Otsu split the retina itself
    if fg - bg < 20.0 or bg > 0.5 * fg or bg > 60.0:
        return np.ones((h, w), dtype=bool)
    mask = bright > bg + FOV_LEVEL_FRACTION * (fg - bg)
    # opening removes thin bright artefacts touching the disc (camera text, reflections) before picking the disc
    mask = ndi.binary_opening(mask, iterations=2)
    mask = largest_component(mask)
    return fill_holes(mask)


def fov_diameter(mask: np.ndarray) -> float:
    """FOV diameter in pixels: the disc's largest horizontal width (unaffected by top/bottom cropping)."""
    mask = np.asarray(mask, dtype=bool)
    rows = mask.any(axis=1)
    if not rows.any():
        raise ValueError("the field-of-view mask is empty")
    m = mask[rows]
    left = np.argmax(m, axis=1)
    right = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
    widths = (right - left + 1).astype(np.float64)
    # a median over 5 rows ignores a single ragged row; near the disc's centre widths change by < 1 px per row
    if widths.size >= 5:
        widths = ndi.median_filter(widths, size=5, mode="nearest")
    return float(widths.max())


# ---------------------------------------------------------------------------------------------------------------------
# contrast normalisation
# ---------------------------------------------------------------------------------------------------------------------
def _block_sums(a: np.ndarray, k: int) -> np.ndarray:
    """(C, Hp, Wp) with Hp, Wp multiples of k -> (C, Hp/k, Wp/k) sums over k x k blocks."""
    c, hp, wp = a.shape
    return a.reshape(c, hp // k, k, wp).sum(axis=2).reshape(c, hp // k, wp // k, k).sum(axis=3)


def _linear_taps(n_out: int, n_in: int, k: int):
    """Linear interpolation from block centres (i k + (k - 1) / 2) back to every pixel: for each of the ``n_out``
    pixels its two coarse neighbours (i0, i1) and the weight ``f`` of i1 (float32)."""
    x = np.clip((np.arange(n_out) - (k - 1) / 2.0) / k, 0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (x - i0).astype(np.float32)


def _upsample(a: np.ndarray, shape_hw: Tuple[int, int], k: int) -> np.ndarray:
    """(..., hc, wc) coarse grid of block size ``k`` -> (..., H, W) float32, separable linear interpolation (two
    taps per axis: gathers, not a dense interpolation matrix)."""
    r0, r1, fr = _linear_taps(shape_hw[0], a.shape[-2], k)
    c0, c1, fc = _linear_taps(shape_hw[1], a.shape[-1], k)
    rows = a[..., r0, :] * (1.0 - fr)[:, None] + a[..., r1, :] * fr[:, None]
    return rows[..., c0] * (1.0 - fc) + rows[..., c1] * fc


def _smooth_ratio(num: np.ndarray, den: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution G*num / G*den on the coarse grid; num (C, h, w), den (h, w)."""
    g_den = ndi.gaussian_filter(den, sigma, mode="constant")
    out = np.stack([ndi.gaussian_filter(n, sigma, mode="constant") for n in num])
    ok = g_den > 1e-3 * max(float(g_den.max()), 1e-12)
    out[:, ok] /= g_den[ok]
    out[:, ~ok] = 0.0
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    # a square minimum filter: a band of about ``radius`` px, in O(N) whatever the radius
    return ndi.minimum_filter(mask, size=2 * radius + 1, mode="constant", cval=False) if radius > 0 else mask


def normalise_fundus(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Camera-independent contrast: (H, W, 3) uint8 + (H, W) FOV -> (3, H, W) float32 in [-CLIP, CLIP], 0 outside.

    Per channel: subtract the illumination background (Gaussian, sigma = FOV diameter / 50) estimated from FOV pixels
    only (normalised convolution, so the dark surround does not leak in as a bright ring), divide by the local standard
    deviation (sigma = diameter / 12, floored at half its FOV median) and clip. A per-channel gain and offset, i.e. a
    different camera's colour balance and exposure, cancels out. The FOV's outermost band (diameter / 180), where the
    photo fades to black on every camera, is set to 0 so that the FOV edge does not look like a dark vessel.
    """
    rgb = np.asarray(rgb)
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if rgb.ndim != 3 or rgb.shape[:2] != (h, w):
        raise ValueError(f"photo {rgb.shape} and mask {mask.shape} differ in size")
    d = fov_diameter(mask)
    # statistics come from the FOV without its dim rim
    weight = _erode(mask, int(round(d * RIM_FRACTION)))
    if not weight.any():
        weight = mask
    inner = _erode(mask, int(round(d * EDGE_FRACTION)))
    x = rgb[..., :3].transpose(2, 0, 1).astype(np.float32)
    bg, s_w, s_x, s_xx, k = _background(x, weight, d)
    inv_std, q = _inverse_local_std(bg, s_w, s_x, s_xx, d, k)
    return _normalised(x, bg, inv_std, ~inner, k, q)


def _background(x: np.ndarray, weight: np.ndarray, d: float):
    """Illumination background per channel from FOV pixels only, on a grid k times coarser (sigma ~2 coarse pixels,
    then a linear upsample: ~10x faster). x: (3, H, W) float32. Returns (bg, s_w, s_x, s_xx, k): the background and
    the block sums of the weight, weight * x and weight * x^2 on the coarse grid."""
    h, w = weight.shape
    sigma_bg = d * BACKGROUND_SIGMA
    k = max(1, int(sigma_bg // 2))
    hp, wp = -(-h // k) * k, -(-w // k) * k
    # rows: weight, weight * x (3), weight * x^2 (3); zero padding to whole blocks carries no weight
    acc = np.zeros((7, hp, wp), dtype=np.float32)
    acc[0, :h, :w] = weight
    np.multiply(x, acc[0, :h, :w], out=acc[1:4, :h, :w])
    np.multiply(acc[1:4, :h, :w], x, out=acc[4:7, :h, :w])
    sums = _block_sums(acc, k)
    s_w, s_x, s_xx = sums[0], sums[1:4], sums[4:7]
    return _smooth_ratio(s_x, s_w, sigma_bg / k), s_w, s_x, s_xx, k


def _inverse_local_std(bg, s_w, s_x, s_xx, d: float, k: int):
    """1 / local standard deviation of (x - bg), floored at CONTRAST_FLOOR of its FOV median; on a grid q times
    coarser again (its Gaussian is ~4x wider, which also makes its upsample q times cheaper). Returns (1/std, q)."""
    # local variance with bg constant within a block: E[x^2] - 2 bg E[x] + bg^2
    var_block = np.maximum(s_xx - 2.0 * bg * s_x + bg * bg * s_w, 0.0)
    sigma_std = d * CONTRAST_SIGMA / k
    q = max(1, int(sigma_std // 2))
    hq, wq = -(-s_w.shape[0] // q) * q, -(-s_w.shape[1] // q) * q
    acc2 = np.zeros((4, hq, wq), dtype=np.float32)
    acc2[0, :s_w.shape[0], :s_w.shape[1]] = s_w
    acc2[1:, :s_w.shape[0], :s_w.shape[1]] = var_block
    sums2 = _block_sums(acc2, q)
    std = np.sqrt(_smooth_ratio(sums2[1:], sums2[0], sigma_std / q))
    inside = sums2[0] > 0.5 * (k * q) ** 2
    for c in range(3):
        vals = std[c][inside] if inside.any() else std[c].ravel()
        floor = CONTRAST_FLOOR * float(np.median(vals)) if vals.size else 1.0
        std[c] = np.maximum(std[c], max(floor, 1e-3))
    return 1.0 / std, q


def _normalised(x: np.ndarray, bg, inv_std, outside: np.ndarray, k: int, q: int) -> np.ndarray:
    """(x - background) / local std, upsampled from the coarse grids, clipped, 0 in the ``outside`` band."""
    shape_hw = x.shape[1:]
    out = np.subtract(x, _upsample(bg, shape_hw, k), dtype=np.float32)
    out *= _upsample(inv_std, shape_hw, k * q)
    np.clip(out, -CLIP, CLIP, out=out)
    out[:, outside] = 0.0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# scale
# ---------------------------------------------------------------------------------------------------------------------
def _resize(a: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Resize a 2D uint8 or float32 array with Pillow's bilinear filter (pixel centres aligned, antialiased)."""
    from PIL import Image

    h, w = size_hw
    if a.shape[:2] == (h, w):
        return a.copy()
    if a.dtype == np.uint8:
        return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.float32)


def rescale_to_fov(rgb: np.ndarray, mask: np.ndarray, target_diameter_px: float
                   ) -> Tuple[np.ndarray, np.ndarray, float]:
    """Resize the photo so that its FOV diameter becomes ``target_diameter_px``.

    Returns (rgb_scaled (h, w, 3) uint8, mask_scaled (h, w) bool, scale = target / measured diameter). The scaled size
    is ``round(H * scale), round(W * scale)``; :func:`restore_from_fov` maps results back.
    """
    scale = float(target_diameter_px) / fov_diameter(mask)
    h, w = mask.shape
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    rgb_s = _resize(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), size)
    mask_s = _resize(np.asarray(mask, dtype=np.uint8) * 255, size) >= 128
    return rgb_s, mask_s, scale


def restore_from_fov(prob_scaled: np.ndarray, original_shape: Tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rescale_to_fov` for a result: (h, w) or (C, h, w) float -> (H, W) or (C, H, W) float32."""
    hw = tuple(int(v) for v in original_shape[:2])
    p = np.asarray(prob_scaled, dtype=np.float32)
    if p.ndim == 3:
        return np.stack([_resize(c, hw) for c in p])
    return _resize(p, hw)


# ---------------------------------------------------------------------------------------------------------------
# the photo on the model's scale and back
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PreparedPhoto:
    rgb: np.ndarray                   # uint8 (h, w, 3) rescaled photo
    fov: np.ndarray                   # bool (h, w) field of view on the rescaled photo
    scale: float                      # rescaled size / original size
    original_shape: Tuple[int, int]   # (H, W) of the input photo
    original_fov: Optional[np.ndarray] = None  # bool (H, W) field of view on the input photo


def prepare_fundus(rgb: np.ndarray, task: TaskSpec, fov: Optional[np.ndarray] = None) -> PreparedPhoto:
    """Photo (H, W, 3) uint8 -> rescaled to the task's field-of-view diameter."""
    if fov is None:
        fov = fov_mask(rgb)
    rgb_s, fov_s, scale = rescale_to_fov(rgb, fov, task.fov_diameter_px)
    return PreparedPhoto(rgb=rgb_s, fov=fov_s.astype(bool), scale=float(scale), original_shape=rgb.shape[:2],
                         original_fov=fov)


def prepare_fundus_label(label: np.ndarray, prepared: PreparedPhoto) -> np.ndarray:
    """Vessel mask (H, W) -> uint8 (h, w) on the rescaled photo (thin vessels: resize as float, threshold 0.5)."""
    from PIL import Image

    h, w = prepared.rgb.shape[:2]
    lab = Image.fromarray((label > 0).astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return (np.asarray(lab) >= 0.5).astype(np.uint8)


def fundus_input(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Network input (3, h, w) float32: camera-independent contrast normalisation inside the field of view."""
    return normalise_fundus(rgb, fov)


def probabilities_to_photo(prob_hw: np.ndarray, prepared: PreparedPhoto) -> np.ndarray:
    """Foreground probability (h, w) on the rescaled photo -> (H, W) on the input photo."""
    return restore_from_fov(prob_hw, prepared.original_shape)


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------------

def _photo_label_image(labels2d: np.ndarray, photo):
    """(H, W) labels -> UInt8 image with the photo's geometry (2D, or single-slice 3D if the photo was 3D)."""
    import SimpleITK as sitk

    lab = sitk.GetImageFromArray(labels2d[None] if photo.GetDimension() == 3 else labels2d)
    lab.SetOrigin(photo.GetOrigin())
    lab.SetSpacing(photo.GetSpacing())
    lab.SetDirection(photo.GetDirection())
    return lab


class RetinaPipeline(TaskPipeline):
    """The photo rescaled to the model's field-of-view diameter and contrast-normalised; vessel probabilities resized
    back to the photo, limited to its field of view, and thresholded at the model's calibrated threshold."""

    def prepare(self, image, seed_ras=None) -> NetworkInput:
        from KDSegmentationLib.io.images import photo_to_array

        rgb = photo_to_array(image)
        prepared = prepare_fundus(rgb, self.spec, fov=fov_mask(rgb))
        return NetworkInput(tensor=fundus_input(prepared.rgb, prepared.fov)[None], context=prepared)

    def to_input_grid(self, probabilities, prepared: NetworkInput, image, threshold: float = 0.5) -> InputGridOutput:
        photo = prepared.context
        prob_model = probabilities[0, 1] * photo.fov
        prob = probabilities_to_photo(prob_model, photo) * photo.original_fov
        labels2d = (prob >= threshold).astype(np.uint8)
        return InputGridOutput(labels=labels2d, labelmap=_photo_label_image(labels2d, image),
                               probability=prob.astype(np.float32))

    def measure(self, output: InputGridOutput, prepared: NetworkInput, image) -> Dict[str, dict]:
        area = int(output.labels.sum())
        fov_px = max(int(prepared.context.original_fov.sum()), 1)
        return {self.spec.labels[0].name: {"area_px": area, "fraction_of_fov": round(area / fov_px, 4)}}
