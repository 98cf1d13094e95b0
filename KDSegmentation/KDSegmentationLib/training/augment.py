"""Augmentation for training, chosen for generalisation to other hospitals and cameras, not for the benchmark.

Split in two so that a GPU is never starved:

- per sample, in the DataLoader workers (numpy/MONAI on a region a little larger than the patch): cropping,
  intensity / colour / camera variation and the network-input normalisation;
- per batch, on the training device: the spatial part (rotation, scaling, flips) as one ``grid_sample``
  (:func:`warp_batch`) whose per-sample matrices the workers drew (:func:`random_affine`). A per-sample MONAI
  ``RandAffine`` costs ~20 ms for a 256x256 RGB patch on one core, which would make loading, not the GPU, set the
  pace of 2D training.

Every random choice comes from a ``numpy.random.Generator`` handed in by the caller, so a sample is a pure function
of its seed (exact resume, any number of workers).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from KDSegmentationLib.tasks import TaskSpec


@dataclass(frozen=True)
class AugPolicy:
    """Per-task augmentation, chosen for generalisation to other scanners/cameras rather than for the benchmark.

    Angles in degrees, scales as factors. ``rotate`` holds one range per rotation plane: 2D one; 3D (axial, coronal,
    sagittal) i.e. about z, y and x. ``flip_axes`` lists spatial axes that may be mirrored (none for CT: the liver
    has a side). ``region_factor`` is how much larger than the patch the worker crops so that rotation and zoom-out
    see real pixels.
    """

    rotate: Tuple[float, ...] = (0.0,)
    scale: Tuple[float, float] = (1.0, 1.0)
    anisotropic: float = 0.0          # extra independent per-axis scale jitter (+-), i.e. a spacing change
    flip_axes: Tuple[int, ...] = ()
    rot90: bool = False
    p_spatial: float = 1.0
    region_factor: float = 1.0
    pad_mode: str = "zeros"          # grid_sample padding for the image outside the region
    pos_fraction: float = 0.5        # foreground-centred crops (the rest uniform)
    # retina: share of samples with camera jitter before the normalisation (~20 ms of CPU each, against ~2 ms for a
    # crop of the precomputed whole-photo input: the share sets the data-loading cost on a GPU machine)
    camera_p: float = 0.0


def default_policy(task: TaskSpec) -> AugPolicy:
    if task.input_kind == "2d-rgb":
        return AugPolicy(rotate=(180.0,), scale=(0.8, 1.2), anisotropic=0.05, flip_axes=(0, 1), p_spatial=1.0,
                         region_factor=1.4, pad_mode="zeros", pos_fraction=0.5, camera_p=0.5)
    if task.spatial_dims == 3:
        return AugPolicy(rotate=(15.0, 5.0, 5.0), scale=(0.85, 1.15), anisotropic=0.1, flip_axes=(), p_spatial=0.8,
                         region_factor=1.25, pad_mode="border", pos_fraction=0.67)
    return AugPolicy(rotate=(15.0,), scale=(0.9, 1.1), anisotropic=0.0, flip_axes=(0, 1), rot90=True,
                     p_spatial=0.8, region_factor=1.0, pad_mode="border", pos_fraction=0.8)


def random_affine(rng: np.random.Generator, policy: AugPolicy, patch: Sequence[int], region: Sequence[int],
                  augment: bool = True) -> np.ndarray:
    """A ``grid_sample`` theta (d, d+1) float32 mapping a patch of the output onto the centre of the region.

    Built in array axis order (z, y, x) as ``M = R @ S @ F`` (input offset = M @ output offset, in pixels), then
    converted to the normalised, reversed (x, y, z) convention of ``torch.nn.functional.affine_grid``.
    """
    d = len(patch)
    m = np.eye(d)
    if augment and rng.random() < policy.p_spatial:
        planes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]  # 3D: about z (axial plane), y, x
        for (a, b), rng_deg in zip(planes, policy.rotate):
            ang = math.radians(rng.uniform(-rng_deg, rng_deg)) if rng_deg else 0.0
            if policy.rot90 and d == 2:
                ang += math.pi / 2 * int(rng.integers(4))
            r = np.eye(d)
            c, s = math.cos(ang), math.sin(ang)
            r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
            m = m @ r
        iso = rng.uniform(*policy.scale)
        scales = iso * (1 + rng.uniform(-policy.anisotropic, policy.anisotropic, size=d))
        m = m @ np.diag(scales)
    if augment:
        flips = np.ones(d)
        for ax in policy.flip_axes:
            if rng.random() < 0.5:
                flips[ax] = -1
        m = m @ np.diag(flips)
    theta = np.diag(1.0 / np.asarray(region, float)) @ m @ np.diag(np.asarray(patch, float))
    theta = theta[::-1, ::-1]  # array order -> grid order (x first)
    return np.concatenate([theta, np.zeros((d, 1))], 1).astype(np.float32)


def warp_batch(image, theta, patch: Sequence[int], label=None, soft=None, pad_mode: str = "zeros"):
    """Apply per-sample affines on the training device: one batched ``grid_sample``.

    image (B, C, *region) any float dtype -> float32 (B, C, *patch) bilinear; label (B, *region) integer ->
    int64 (B, *patch) nearest; soft (B, C, *region) -> float32 (B, C, *patch) bilinear. Outside the region labels are
    background (0) and soft targets are background (channel 0 = 1).
    """
    import torch
    import torch.nn.functional as F

    b, c = image.shape[:2]
    grid = F.affine_grid(theta.to(image.device, torch.float32), [b, c, *patch], align_corners=False)
    out_img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode=pad_mode, align_corners=False)
    out_lab = out_soft = None
    if label is not None:
        out_lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[:, 0].round().long()
    if soft is not None:
        fg = F.grid_sample(soft[:, 1:].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_soft = torch.cat([1 - fg.sum(1, keepdim=True), fg], 1)
    return out_img, out_lab, out_soft


def crop(arr: np.ndarray, centre: Sequence[int], size: Sequence[int], pad_value=0) -> np.ndarray:
    """The ``size`` window of ``arr`` centred at ``centre`` over its leading spatial axes, padded where it leaves
    the array. Trailing axes (e.g. RGB channels) are kept whole."""
    d = len(size)
    out = np.full(tuple(size) + arr.shape[d:], pad_value, dtype=arr.dtype)
    src, dst = [], []
    for ax in range(d):
        start = int(centre[ax]) - size[ax] // 2
        lo, hi = max(start, 0), min(start + size[ax], arr.shape[ax])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _lut(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[x]


def camera_jitter(rgb: np.ndarray, fov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric camera variation on a uint8 RGB (h, w, 3) before the network normalisation: per-channel gain
    (white balance), brightness, contrast, gamma, hue rotation and saturation, defocus blur, JPEG re-compression and
    sensor noise. These, not the benchmark, decide how the model does on another camera."""
    from PIL import Image, ImageFilter

    x = rgb
    if rng.random() < 0.8:
        inside = x[fov] if fov.any() else x.reshape(-1, 3)
        mean = inside.mean(0) if inside.size else np.full(3, 128.0)
        gain = rng.uniform(0.75, 1.3) * rng.uniform(0.85, 1.15, size=3)
        contrast = rng.uniform(0.7, 1.35)
        gamma = rng.uniform(0.7, 1.45)
        levels = np.arange(256, dtype=np.float32)
        chans = []
        for ch in range(3):
            v = (levels - mean[ch]) * contrast + mean[ch]
            v = np.clip(v * gain[ch], 0, 255) / 255.0
            table = np.round(255.0 * v ** gamma).astype(np.uint8)
            chans.append(_lut(x[..., ch], table))
        x = np.stack(chans, -1)
    if rng.random() < 0.5:
        # hue rotation and saturation in YIQ: one 3x3 matrix per sample
        ang = math.radians(rng.uniform(-12, 12))
        sat = rng.uniform(0.7, 1.3)
        to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
        rot = np.array([[1, 0, 0], [0, sat * math.cos(ang), -sat * math.sin(ang)],
                        [0, sat * math.sin(ang), sat * math.cos(ang)]], np.float32)
        mat = np.linalg.inv(to_yiq) @ rot @ to_yiq
        x = np.clip(x.astype(np.float32) @ mat.T.astype(np.float32), 0, 255).astype(np.uint8)
    img = None
    if rng.random() < 0.25:
        img = Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.3))))
    if rng.random() < 0.3:
        img = img or Image.fromarray(x)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(25, 90)))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    if img is not None:
        x = np.asarray(img)
    if rng.random() < 0.25:
        noise = rng.standard_normal(x.shape, dtype=np.float32) * rng.uniform(1.0, 6.0)
        x = np.clip(x + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


_CT_AUG = None


def _ct_aug():
    """MONAI intensity transforms for CT regions, built once per process: (on HU, on the [0, 1] window)."""
    global _CT_AUG
    if _CT_AUG is None:
        from monai.transforms import (Compose, RandAdjustContrast, RandGaussianNoise, RandGaussianSmooth,
                                      RandScaleIntensity, RandScaleIntensityFixedMean, RandShiftIntensity)

        on_hu = Compose([RandScaleIntensity(factors=0.1, prob=0.5), RandShiftIntensity(offsets=30.0, prob=0.5)])
        on_window = Compose([
            RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5)),
            RandScaleIntensityFixedMean(prob=0.3, factors=0.25),
            RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandGaussianNoise(prob=0.3, std=0.04),
        ])
        _CT_AUG = (on_hu, on_window)
    return _CT_AUG


def normalise_region(rgb: np.ndarray, fov: np.ndarray, diameter: float) -> np.ndarray:
    """``retina.fundus_input`` of a crop, as the whole photo would be normalised: (h, w, 3) uint8 + (h, w) bool
    -> (3, h, w) float32.

    The normalisation's Gaussians scale with the FOV diameter, which it measures as the mask's widest row; a crop
    would report its own width instead. So the crop is placed on a canvas whose mask also holds a thin strip of the
    photo's full diameter below it. The strip is thinner than the rim that the statistics skip, so it only sets the
    diameter; inside a 256 px patch this matches whole-photo normalisation to ~1 % (a plain crop is off by ~20 %).
    """
    from KDSegmentationLib.tasks import retina

    h, w = fov.shape
    strip, gap = 5, 16
    width = max(w, int(round(diameter)))
    canvas = np.zeros((h + gap + strip, width, 3), np.uint8)
    mask = np.zeros((h + gap + strip, width), bool)
    canvas[:h, :w] = rgb
    mask[:h, :w] = fov
    mask[-strip:, :int(round(diameter))] = True
    if not fov.any():
        return np.zeros((3, h, w), np.float32)
    return np.asarray(retina.fundus_input(canvas, mask), np.float32)[:, :h, :w]


# soft-tissue enhancement change drawn by :func:`contrast_phase_shift`, in HU. The training livers are portal-venous
# (mean ~100 HU); unenhanced livers are ~50-60 HU and late-arterial ones ~70-90 HU, so the range reaches both.
PHASE_SHIFT_HU = (-65.0, 35.0)


def contrast_phase_shift(hu: np.ndarray, delta: float) -> np.ndarray:
    """Mimic another contrast phase: add ``delta`` HU to enhancing soft tissue (>= 0 HU) and fade it out towards
    fat (-150 HU), leaving air and fat unchanged, unlike a global offset that would also move them.

    hu: float32 (z, y, x) in HU -> float32 (z, y, x) in HU."""
    weight = np.clip((hu + 150.0) / 150.0, 0.0, 1.0)
    return (hu + np.float32(delta) * weight).astype(np.float32)


def ct_intensity(hu: np.ndarray, task: TaskSpec, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """HU region (z, y, x) -> network input float32 (z, y, x) in the task window (``ct.ct_window``), with
    scanner/protocol variation: another contrast phase (soft tissue shifted by :data:`PHASE_SHIFT_HU`), HU scale
    +-10 % and offset +-30 HU (calibration) before windowing; gamma, contrast, blur, noise after it; and thicker
    slices (with the contrast phase, the largest shifts between hospitals' CT)."""
    from KDSegmentationLib.tasks import ct

    x = hu.astype(np.float32)
    if augment:
        if rng.random() < 0.6:
            x = contrast_phase_shift(x, rng.uniform(*PHASE_SHIFT_HU))
        on_hu, on_window = _ct_aug()
        on_hu.set_random_state(seed=int(rng.integers(2 ** 31)))
        x = np.asarray(on_hu(x[None]))[0]
    x = np.asarray(ct.ct_window(x, task), np.float32)
    if not augment:
        return x
    if rng.random() < 0.15 and x.shape[0] >= 4:
        # thick slices: average groups of k slices along z and repeat them back
        k = int(rng.integers(2, 4))
        n = x.shape[0] // k * k
        coarse = x[:n].reshape(n // k, k, *x.shape[1:]).mean(1)
        x = np.concatenate([np.repeat(coarse, k, 0), x[n:]], 0)
    on_window.set_random_state(seed=int(rng.integers(2 ** 31)))
    return np.asarray(on_window(x[None]), np.float32)[0]


def slice_intensity(img: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """8-bit windowed CT slice (h, w) -> float32 [0, 1] with window/contrast/gamma jitter, blur and noise.

    Plain numpy on purpose: batches hold 64 slices and the equivalent MONAI Compose costs ~3 ms per 128x128 slice
    against ~0.3 ms here, which would make data loading, not the GPU, set the pace."""
    x = img.astype(np.float32) / 255.0
    if not augment:
        return x
    if rng.random() < 0.6:
        x = (x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05)
    if rng.random() < 0.3:
        x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)
    if rng.random() < 0.1:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=rng.uniform(0.3, 0.8))
    if rng.random() < 0.3:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * rng.uniform(0.005, 0.03)
    return x.astype(np.float32)
