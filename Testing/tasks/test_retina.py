"""Fundus field of view, scale and contrast normalisation on synthetic and real (DRIVE, CHASE_DB1) photos."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from conftest import require
from KDSegmentationLib.tasks import retina as fundus

DRIVE_CASES = ["test/01_test", "test/07_test", "test/14_test", "training/21_training", "training/33_training",
               "training/40_training"]


def _drive(shared_data, case):
    split, name = case.split("/")
    root = require(shared_data / "retina" / "DRIVE" / split)
    rgb = np.asarray(Image.open(root / "images" / f"{name}.tif").convert("RGB"))
    mask = np.asarray(Image.open(root / "mask" / f"{name}_mask.gif")) > 0
    return rgb, mask


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _synthetic_fundus(h=584, w=565, diameter=540.0, cut=0, seed=0):
    """Orange disc with dark vessels-like lines and vignetting on a near-black, noisy surround."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    r = np.hypot(yy - cy, xx - cx)
    disc = r <= diameter / 2
    shade = 1.0 - 0.4 * (r / (diameter / 2)) ** 2
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[..., 0] = 200 * shade
    rgb[..., 1] = 100 * shade
    rgb[..., 2] = 40 * shade
    for k in range(6):
        line = np.abs((yy - cy) * np.cos(k) - (xx - cx) * np.sin(k)) < 3
        rgb[line] *= 0.6
    rgb[~disc] = 5
    rgb += rng.normal(0, 3, rgb.shape)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    if cut:
        rgb, disc = rgb[cut:-cut], disc[cut:-cut]
    return rgb, disc


# -- field of view -----------------------------------------------------------------------------------------------------
def test_fov_synthetic_and_cropped_disc():
    rgb, disc = _synthetic_fundus()
    m = fundus.fov_mask(rgb)
    assert _iou(m, disc) > 0.99
    assert abs(fundus.fov_diameter(m) - 540) <= 3
    # a camera that cuts the disc at top and bottom: same horizontal diameter
    rgb_c, disc_c = _synthetic_fundus(cut=80)
    m_c = fundus.fov_mask(rgb_c)
    assert _iou(m_c, disc_c) > 0.99
    assert abs(fundus.fov_diameter(m_c) - 540) <= 3


def test_fov_no_dark_surround_is_everything():
    rgb = np.random.default_rng(0).integers(90, 200, (100, 120, 3), dtype=np.uint8)
    assert fundus.fov_mask(rgb).all()


def test_fov_diameter_ignores_single_ragged_row():
    m = np.zeros((50, 60), bool)
    m[10:40, 20:40] = True
    m[25, 2:58] = True  # one stray row
    assert fundus.fov_diameter(m) == 20
    with pytest.raises(ValueError):
        fundus.fov_diameter(np.zeros((5, 5), bool))


def test_fov_matches_drive_masks(shared_data):
    for case in DRIVE_CASES:
        rgb, gt = _drive(shared_data, case)
        m = fundus.fov_mask(rgb)
        assert _iou(m, gt) > 0.97, case
        assert abs(fundus.fov_diameter(m) - fundus.fov_diameter(gt)) <= 6, case


def test_fov_robust_to_jpeg_and_vertical_crop(shared_data):
    rgb, gt = _drive(shared_data, "test/03_test")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=25)
    jpg = np.asarray(Image.open(buf))
    assert _iou(fundus.fov_mask(jpg), gt) > 0.97
    cropped, gt_c = rgb[90:-90], gt[90:-90]
    m = fundus.fov_mask(cropped)
    assert _iou(m, gt_c) > 0.97
    assert abs(fundus.fov_diameter(m) - fundus.fov_diameter(gt)) <= 6


def test_fov_chase_is_one_disc(shared_data):
    root = require(shared_data / "retina" / "CHASE_DB1" / "images")
    for name in ("Image_01L.jpg", "Image_08R.jpg"):
        rgb = np.asarray(Image.open(root / name).convert("RGB"))
        m = fundus.fov_mask(rgb)
        d = fundus.fov_diameter(m)
        assert 850 < d < 999
        # the disc is filled and round: its area is close to pi d^2 / 4
        assert abs(m.sum() / (np.pi * d * d / 4) - 1) < 0.05
        # the dark surround is outside
        assert not m[0, 0] and not m[-1, -1]


# -- normalisation -----------------------------------------------------------------------------------------------------
def test_normalise_shape_range_and_outside_zero():
    rgb, disc = _synthetic_fundus()
    m = fundus.fov_mask(rgb)
    out = fundus.normalise_fundus(rgb, m)
    assert out.shape == (3,) + m.shape and out.dtype == np.float32
    assert np.all(out[:, ~m] == 0)
    assert np.abs(out).max() <= fundus.CLIP
    # inside, each channel has zero-ish median and unit-ish spread, whatever its brightness
    for c in range(3):
        v = out[c][ndi.binary_erosion(m, iterations=10)]
        assert abs(np.median(v)) < 0.5
        assert 0.3 < v.std() < 2.0


def test_normalise_cancels_camera_gain_and_offset(shared_data):
    rgb, gt = _drive(shared_data, "test/01_test")
    m = fundus.fov_mask(rgb)
    ref = fundus.normalise_fundus(rgb, m)
    # another camera: different white balance and exposure per channel
    gain, offset = np.array([0.7, 1.3, 0.9]), np.array([10.0, -15.0, 5.0])
    other = np.clip(rgb * gain + offset, 0, 255).astype(np.uint8)
    out = fundus.normalise_fundus(other, m)
    inner = ndi.binary_erosion(m, iterations=8)
    for c in (0, 1):  # red and green carry the vessels; blue is near the quantisation floor on DRIVE
        r = np.corrcoef(ref[c][inner], out[c][inner])[0, 1]
        assert r > 0.97, (c, r)


def _edge_and_centre(m):
    d = fundus.fov_diameter(m)
    edge = m & ~ndi.binary_erosion(m, iterations=max(1, int(d / 60)))
    centre = ndi.binary_erosion(m, iterations=int(d / 6))
    return edge, centre


def test_no_ring_at_fov_edge_synthetic():
    # flat, evenly lit retina: any level change along the FOV edge would come from the dark surround leaking in
    rgb, _ = _synthetic_fundus()
    yy, xx = np.mgrid[0:584, 0:565]
    disc = np.hypot(yy - 291.5, xx - 282) <= 270
    flat = np.where(disc[..., None], np.array([190, 95, 35], np.uint8), np.uint8(4))
    flat = np.clip(flat + np.random.default_rng(1).normal(0, 4, flat.shape), 0, 255).astype(np.uint8)
    m = fundus.fov_mask(flat)
    out = fundus.normalise_fundus(flat, m)
    edge, centre = _edge_and_centre(m)
    for c in range(3):
        assert abs(out[c][edge].mean() - out[c][centre].mean()) < 0.2, c


def test_fov_edge_level_real_photo(shared_data):
    rgb, _ = _drive(shared_data, "test/02_test")
    m = fundus.fov_mask(rgb)
    g = fundus.normalise_fundus(rgb, m)[1]
    edge, centre = _edge_and_centre(m)
    # DRIVE's optics leave a slightly brighter rim (~+5 grey levels): a mild offset, and above all the FOV edge
    # must not look like a dark vessel (fewer dark pixels than in the middle of the retina)
    assert abs(g[edge].mean() - g[centre].mean()) < 1.0
    assert np.mean(g[edge] <= -2) <= np.mean(g[centre] <= -2)


def test_normalise_is_resolution_independent(shared_data):
    rgb, _ = _drive(shared_data, "test/05_test")
    m = fundus.fov_mask(rgb)
    a = fundus.normalise_fundus(rgb, m)[1]
    h, w = m.shape
    big = np.asarray(Image.fromarray(rgb).resize((2 * w, 2 * h), Image.BICUBIC))
    mb = fundus.fov_mask(big)
    b = fundus.normalise_fundus(big, mb)[1]
    b_small = np.asarray(Image.fromarray(b).resize((w, h), Image.BILINEAR))
    inner = ndi.binary_erosion(m & np.asarray(Image.fromarray(mb).resize((w, h))), iterations=8)
    r = np.corrcoef(a[inner], b_small[inner])[0, 1]
    assert r > 0.9, r


def test_fill_holes_equals_scipy_in_2d_and_3d():
    from KDSegmentationLib.tasks.components import fill_holes

    rng = np.random.default_rng(0)
    for shape in [(50, 60), (7, 30, 40), (1, 1), (3, 1), (200, 300)]:
        for density in (0.3, 0.5, 0.7):
            mask = rng.random(shape) < density
            mask = ndi.binary_opening(mask) if min(shape) > 2 else mask
            np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole
    ring[0, :] = True
    ring[1, 8] = False  # background at the border stays background
    filled = fill_holes(ring)
    assert filled[4, 4] and not filled[1, 8] and not filled[8, 0]


def test_upsampling_from_the_coarse_grid_interpolates_block_centres_linearly():
    rng = np.random.default_rng(1)
    coarse = rng.normal(size=(5, 7)).astype(np.float32)
    k, shape = 4, (19, 26)  # not whole blocks: the last row and column of blocks are partial

    def by_interp(values, n_out):  # np.interp between block centres (i k + (k - 1) / 2), clamped at the ends
        x = (np.arange(n_out) - (k - 1) / 2.0) / k
        return np.interp(x, np.arange(values.size), values)

    rows = np.stack([by_interp(coarse[:, j], shape[0]) for j in range(coarse.shape[1])], axis=1)
    expected = np.stack([by_interp(rows[i], shape[1]) for i in range(shape[0])])
    np.testing.assert_allclose(fundus._upsample(coarse, shape, k), expected, atol=1e-5)
