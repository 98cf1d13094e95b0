"""The model-grid -> input-grid step of the CT pipeline: the cropped resampling equals resampling everything."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from KDSegmentationLib.io.geometry import resample_like
from KDSegmentationLib.tasks import ct
from KDSegmentationLib.tasks.ct import labels_on_input_grid, prepare_ct_volume
from KDSegmentationLib.tasks import LIVER


def _oblique_ct(spacing=(0.8, 0.7, 2.5)):
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([1, -1, 1])
    img = sitk.GetImageFromArray(np.full((30, 70, 60), -1000, np.int16))
    img.SetSpacing(spacing)
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


@pytest.fixture(params=["cells", "itk slabs"])
def upsampling(request, monkeypatch):
    """Both ways back to the input grid: interpolation only in mixed cells (grids sharing their axes, the CT
    pipeline's), and ITK resampling in slabs (any other grid pair)."""
    if request.param == "itk slabs":
        monkeypatch.setattr(ct, "shares_axes", lambda grid, original: False)
    return request.param


def test_cropped_argmax_equals_full_resampling_on_an_oblique_flipped_grid(upsampling):
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


def _scipy_largest(mask):
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def test_largest_component_equals_scipy_in_3d_and_2d_with_ties():
    from KDSegmentationLib.tasks.components import largest_component

    rng = np.random.default_rng(1)
    for shape, p in (((20, 30, 25), 0.2), ((40, 50), 0.35), ((9, 9, 9), 0.05)):
        mask = rng.random(shape) < p
        np.testing.assert_array_equal(largest_component(mask), _scipy_largest(mask))
    tie = np.zeros((6, 10, 10), bool)
    tie[4, 1:3, 1:3] = True  # same size as the next one, but later in C order
    tie[1, 6:8, 6:8] = True
    np.testing.assert_array_equal(largest_component(tie), _scipy_largest(tie))
    assert largest_component(tie)[1, 6, 6] and not largest_component(tie)[4, 1, 1]
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


def test_segment_volumes_counts_every_label_in_the_box():
    from KDSegmentationLib.tasks.ct import segment_volumes

    labels = np.zeros((30, 40, 50), np.uint8)
    labels[3:9, 10:30, 5:7] = 1
    labels[4:6, 12:14, 5] = 2
    got = segment_volumes(labels, LIVER, (0.5, 0.5, 2.0))
    counts = np.bincount(labels.ravel(), minlength=3)
    assert got == {"Liver": {"voxels": int(counts[1]), "volume_ml": round(counts[1] * 0.0005, 2)},
                   "Liver tumor": {"voxels": int(counts[2]), "volume_ml": round(counts[2] * 0.0005, 2)}}
    assert segment_volumes(labels * 0, LIVER, (1, 1, 1))["Liver"] == {"voxels": 0, "volume_ml": 0.0}


def test_slabs_and_skipped_classes_equal_full_resampling_for_any_slab_size(upsampling):
    prepared = prepare_ct_volume(_oblique_ct(), LIVER)
    shape = prepared.hu.shape
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3,) + shape).astype(np.float32)
    logits[0] += 2.5  # mostly background; the tumour class wins only here and there
    logits[2] -= 1.0
    prob = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    want = _full_resample(prob, prepared)
    assert (want == 2).any() and (want == 1).any()
    for slab, min_voxels in ((1, 1), (2, 1), (5, 1), (2, 1 << 18), (1000, 1)):
        np.testing.assert_array_equal(labels_on_input_grid(prob, prepared, slab_vox=slab, min_slab_voxels=min_voxels),
                                      want)


@pytest.mark.parametrize("spacing", [(0.8, 0.7, 5.0), (3.0, 3.0, 3.0), (1.1, 0.5, 0.6)])
def test_argmax_equals_full_resampling_when_slices_are_coarser_or_as_fine_as_the_model(spacing, upsampling):
    """Slices thicker than the model's 3 mm (the model grid is then finer along z), the model's own spacing, and
    thin slices: the same labels as resampling everything."""
    prepared = prepare_ct_volume(_oblique_ct(spacing), LIVER)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3,) + prepared.hu.shape).astype(np.float32)
    logits[0] += 1.5
    prob = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    want = _full_resample(prob, prepared)
    assert (want == 1).any() and (want == 2).any()
    np.testing.assert_array_equal(labels_on_input_grid(prob, prepared), want)


def test_the_organ_chosen_on_the_model_grid_is_the_largest_component_on_the_input_grid(upsampling):
    """keep_organ (3 mm grid) then the return to an oblique, flipped, anisotropic input grid gives the labels that
    keeping the largest component of the full input-grid labels gives, and drops the detached false positive."""
    from KDSegmentationLib.tasks.components import largest_component
    from KDSegmentationLib.tasks.liver import keep_organ

    prepared = prepare_ct_volume(_oblique_ct(), LIVER)
    shape = prepared.hu.shape
    rng = np.random.default_rng(1)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    organ = ((zz - shape[0] / 2) ** 2 / 9 + (yy - 8) ** 2 / 16 + (xx - shape[2] / 2) ** 2 / 25) < 1.5
    stray = (zz == shape[0] // 2) & (yy == shape[1] - 3) & (xx == 2)     # far from the organ: a false positive
    prob = np.zeros((3,) + shape, np.float32)
    fg = rng.uniform(0.55, 0.95, shape).astype(np.float32)
    prob[1] = np.where(organ | stray, fg, rng.uniform(0.0, 0.45, shape)).astype(np.float32)
    prob[0] = 1.0 - prob[1]
    tumour = organ & (rng.random(shape) < 0.2)
    prob[2][tumour], prob[1][tumour] = prob[1][tumour] * 0.6, prob[1][tumour] * 0.4
    full = labels_on_input_grid(prob, prepared)
    want = full * largest_component(full > 0)
    got = labels_on_input_grid(keep_organ(prob, LIVER.spacing_mm), prepared)
    assert (full > 0).sum() > (want > 0).sum() > 50 and (want == 2).any()
    np.testing.assert_array_equal(got, want)
    assert not keep_organ(np.stack([np.ones(shape), np.zeros(shape), np.zeros(shape)]), LIVER.spacing_mm)[1:].any()


def _ball(shape, centre, radius_vox):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius_vox ** 2


def test_a_structure_joined_through_a_neck_is_cut_off_and_the_organs_own_thin_parts_stay():
    """A 'liver' (3 mm grid) with a 'heart' joined through a 2-voxel neck, and a thin tail of its own: the heart
    goes, the cut runs at the neck, the tail stays; without a second structure the mask is returned whole."""
    from KDSegmentationLib.tasks.components import main_part

    shape = (40, 40, 70)
    liver = _ball(shape, (20, 20, 20), 12)
    heart = _ball(shape, (20, 20, 52), 9)
    neck = np.zeros(shape, bool)
    neck[19:21, 19:21, 30:45] = True                      # 6 mm thick: narrower than 2 x 6 mm
    tail = np.zeros(shape, bool)
    tail[20, 3:9, 18:22] = True                           # a lobe's thin tip, attached to the liver
    mask = liver | heart | neck | tail
    part = main_part(mask, (3.0, 3.0, 3.0))
    assert part[liver].all() and part[tail].all() and not part[heart].any()
    assert not part[19:21, 19:21, 40:45].any()          # the neck goes with the heart beyond its middle
    np.testing.assert_array_equal(main_part(liver | tail, (3.0, 3.0, 3.0)), liver | tail)
    # a thick junction (a broad contact) is not a neck: the two stay one
    broad = liver | heart
    broad[8:32, 8:32, 28:45] |= _ball(shape, (20, 20, 36), 11)[8:32, 8:32, 28:45]
    assert main_part(broad, (3.0, 3.0, 3.0)).sum() == broad.sum()


def test_the_liver_pipeline_drops_a_heart_joined_across_the_diaphragm():
    """keep_organ with the heart case on the model grid: only the liver and its surrounding background are left."""
    from KDSegmentationLib.tasks.liver import keep_organ

    shape = (40, 40, 70)
    liver = _ball(shape, (20, 20, 20), 12)
    heart = _ball(shape, (20, 20, 52), 9)
    neck = np.zeros(shape, bool)
    neck[19:21, 19:21, 30:45] = True
    prob = np.zeros((3,) + shape, np.float32)
    prob[1] = np.where(liver | heart | neck, 0.9, 0.05)
    prob[0] = 1.0 - prob[1]
    kept = keep_organ(prob, (3.0, 3.0, 3.0))
    organ = kept[1:].max(axis=0) > kept[0]
    assert organ[liver].all() and not organ[heart].any() and organ.sum() < liver.sum() + neck.sum()
