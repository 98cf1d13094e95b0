"""The model-grid -> input-grid step of the CT pipeline: the cropped resampling equals resampling everything."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.io.geometry import resample_like
from KDSegmentationLib.tasks.ct import labels_on_input_grid, prepare_ct_volume
from KDSegmentationLib.tasks import LIVER


def _oblique_ct():
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([1, -1, 1])
    img = sitk.GetImageFromArray(np.full((30, 70, 60), -1000, np.int16))
    img.SetSpacing((0.8, 0.7, 2.5))
    img.SetOrigin((10.0, -40.0, 100.0))
    img.SetDirection(tuple(rot.ravel()))
    return img


def _full_resample(prob, prepared):
    maps = []
    for c in range(prob.shape[0]):
        im = sitk.GetImageFromArray(prob[c].astype(np.float32))
        im.CopyInformation(prepared.grid)
        maps.append(sitk.GetArrayFromImage(resample_like(im, prepared.original, "linear", 1.0 if c == 0 else 0.0)))
    return np.argmax(np.stack(maps), axis=0).astype(np.uint8)


def test_cropped_argmax_equals_full_resampling_on_an_oblique_flipped_grid():
    prepared = prepare_ct_volume(_oblique_ct(), LIVER)
    shape = prepared.hu.shape
    rng = np.random.default_rng(0)
    prob = np.zeros((3,) + shape, np.float32)
    prob[0] = 1.0
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    blob = ((zz - shape[0] / 2) ** 2 / 9 + (yy - 8) ** 2 / 16 + (xx - shape[2] / 2) ** 2 / 25) < 1.5
    prob[1][blob], prob[0][blob] = 0.7, 0.3
    core = blob & (rng.random(shape) < 0.3)
    prob[2][core], prob[1][core], prob[0][core] = 0.6, 0.3, 0.1
    got = labels_on_input_grid(prob, prepared)
    want = _full_resample(prob, prepared)
    assert got.shape == want.shape == sitk.GetArrayFromImage(prepared.original).shape
    assert (want > 0).sum() > 50
    np.testing.assert_array_equal(got, want)


def test_no_foreground_gives_an_empty_labelmap():
    prepared = prepare_ct_volume(_oblique_ct(), LIVER)
    prob = np.zeros((3,) + prepared.hu.shape, np.float32)
    prob[0] = 1.0
    assert not labels_on_input_grid(prob, prepared).any()
