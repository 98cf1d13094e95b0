"""Resampling to the model grid and back keeps every physical point where it was (LPS mm)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from KDSegmentationLib.io import geometry


def _rotation(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # RAS-stored volume, as NIfTI from many tools
    "oblique": _rotation((1, 2, 3), 0.5),
    "oblique_flipped": _rotation((0.3, -1, 0.2), 1.1) @ np.diag([1.0, -1.0, 1.0]),  # improper (det -1)
}


def _volume(direction: np.ndarray, spacing=(0.7, 0.9, 2.5), size=(40, 36, 18)) -> sitk.Image:
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin((-12.3, 40.1, -250.7))
    img.SetDirection(tuple(direction.ravel()))
    return img


def _blob_at(img: sitk.Image, point_lps, radius_mm=3.0) -> sitk.Image:
    """Label 1 in every voxel whose centre lies within ``radius_mm`` of the point."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    m = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    phys = idx @ m.T + np.array(img.GetOrigin())
    inside = np.linalg.norm(phys - np.asarray(point_lps), axis=1) <= radius_mm
    arr = inside.reshape(size).transpose(2, 1, 0).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _centroid_lps(lab: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(lab)
    return np.array(stats.GetCentroid(1))  # physical (LPS mm)


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_point_survives_round_trip(name, interp):
    img = _volume(DIRECTIONS[name])
    # a point well inside the volume, expressed physically
    point = np.array(img.TransformContinuousIndexToPhysicalPoint((20.3, 17.6, 9.2)))
    lab = _blob_at(img, point)
    np.testing.assert_allclose(_centroid_lps(lab), point, atol=0.5 * max(img.GetSpacing()))

    model = geometry.resample_to_spacing(lab if interp == "nearest" else sitk.Cast(lab, sitk.sitkFloat32),
                                         (1.5, 1.5, 1.5), interpolator=interp)
    assert model.GetOrigin() == img.GetOrigin()
    np.testing.assert_allclose(model.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(model.GetSpacing(), (1.5, 1.5, 1.5))
    model_lab = model if interp == "nearest" else sitk.Cast(model > 0.5, sitk.sitkUInt8)
    np.testing.assert_allclose(_centroid_lps(model_lab), point, atol=0.75)  # half a 1.5 mm voxel

    back = geometry.resample_like(model, img, interpolator=interp)
    assert geometry.same_grid(back, img, tol=0.0)
    back_lab = back if interp == "nearest" else sitk.Cast(back > 0.5, sitk.sitkUInt8)
    np.testing.assert_allclose(_centroid_lps(back_lab), point, atol=0.5 * max(img.GetSpacing()))
    # and the blob keeps its volume (4/3 pi r^3 = 113 mm^3) within a few voxels
    vox = np.prod(img.GetSpacing())
    n = int(sitk.GetArrayViewFromImage(back_lab).sum())
    assert abs(n * vox - 113.1) < 0.35 * 113.1


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_labelmap_identity_at_same_spacing(name):
    img = _volume(DIRECTIONS[name])
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 3, size=img.GetSize()[::-1]).astype(np.uint8)
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    same = geometry.resample_to_spacing(lab, img.GetSpacing(), interpolator="nearest")
    assert geometry.same_grid(same, lab, tol=0.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), arr)
    back = geometry.resample_like(same, lab, interpolator="nearest")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)


def test_extent_covered_and_none_keeps_axis():
    img = _volume(np.eye(3), spacing=(0.8, 0.8, 5.0), size=(512, 512, 44))
    out = geometry.resample_to_spacing(img, (3.0, 3.0, 3.0))
    # 512 x 0.8 = 409.6 mm -> 137 voxels of 3 mm (136 would leave 1.6 mm uncovered); 44 x 5 = 220 mm -> 74
    assert out.GetSize() == (137, 137, 74)
    assert geometry.grid_size_for_spacing((10,), (3.0,), (3.0,)) == (10,)
    keep = geometry.resample_to_spacing(img, (None, None, 2.5))
    assert keep.GetSize() == (512, 512, 88)
    np.testing.assert_allclose(keep.GetSpacing(), (0.8, 0.8, 2.5))


def test_2d_and_vector_images():
    photo = sitk.Image([50, 40], sitk.sitkVectorUInt8, 3)
    photo.SetOrigin((3.0, -4.0))
    half = geometry.resample_to_spacing(photo, (2.0, 2.0))
    assert half.GetSize() == (25, 20) and half.GetNumberOfComponentsPerPixel() == 3
    back = geometry.resample_like(half, photo)
    assert geometry.same_grid(back, photo, tol=0.0)


def test_values_survive_linear_round_trip_on_smooth_image():
    img = _volume(DIRECTIONS["oblique"])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in img.GetSize()[::-1]], indexing="ij"), 0).astype(np.float32)
    arr = np.sin(idx[0] / 6.0) + np.cos(idx[2] / 9.0)
    f = sitk.GetImageFromArray(arr)
    f.CopyInformation(img)
    back = geometry.resample_like(geometry.resample_to_spacing(f, (0.5, 0.5, 0.5)), f)
    err = np.abs(sitk.GetArrayFromImage(back) - arr)[2:-2, 2:-2, 2:-2]
    assert err.max() < 0.05


def test_crop_to_foreground_and_undo():
    img = _volume(DIRECTIONS["oblique_flipped"])
    point = img.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 9.0))
    lab = _blob_at(img, point)
    crop, (index, size) = geometry.crop_to_foreground(lab, lab, margin_mm=2.5)
    assert all(s < n for s, n in zip(size, img.GetSize()))
    np.testing.assert_allclose(_centroid_lps(crop), _centroid_lps(lab), atol=1e-6)
    back = geometry.resample_like(crop, lab, interpolator="nearest")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(lab))


def test_bad_arguments():
    img = _volume(np.eye(3))
    with pytest.raises(ValueError):
        geometry.resample_to_spacing(img, (1.0, 1.0))
    with pytest.raises(ValueError):
        geometry.resample_to_spacing(img, (1.0, 1.0, 1.0), interpolator="cubic")
    with pytest.raises(ValueError):
        geometry.resample_like(img, sitk.Image([4, 4], sitk.sitkUInt8))
