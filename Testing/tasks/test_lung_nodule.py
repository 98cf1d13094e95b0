"""Lung nodule task: LIDC-IDRI loading and consensus, patient split, HU -> crop intensity, seed region and paste-back.

Geometry tests build small synthetic CTs with flipped, permuted and oblique direction matrices: a blob placed at a
known physical point must come out at the centre of the stack and be pasted back onto the same voxels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import require
from PIL import Image

from KDSegmentationLib.tasks import lung_nodule as lung

from KDSegmentationLib.tasks import lidc
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import LUNG_NODULE

# where the 8-bit crops of LIDC-IDRI-0001/nodule-0 sit in the HU slab (scripts/recover_lidc_window.py):
# crop slice k = slab slice k + 3, crop centre = ITK index (i=316, j=366)
CROP_0001 = dict(centre_ij=(316, 366), slab_minus_crop=3, n_slices=9)


def _png(path):
    return np.asarray(Image.open(path).convert("L"))


def _ras_of_index(img, idx):
    x, y, z = img.TransformIndexToPhysicalPoint([int(v) for v in idx])
    return (-x, -y, z)                                   # LPS -> RAS, as Slicer would send it


# ---------------------------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lidc_slices(shared_data):
    return require(shared_data / "lung" / "LIDC-IDRI-slices")


@pytest.mark.parametrize("pid, min_agree", [("LIDC-IDRI-0001", 2),   # 4 readers marked it: >= 2 of 4
                                            ("LIDC-IDRI-0002", 1)])  # readers 2, 3 all zero: >= 1 of 2
def test_consensus_on_real_nodule_matches_manual_count(lidc_slices, pid, min_agree):
    rec = next(r for r in lidc.iter_lidc_nodules(lidc_slices) if r.patient_id == pid and r.nodule_id == "nodule-0")
    assert [lidc._number(p.name) for p in rec.slice_paths] == list(range(len(rec.slice_paths)))
    images, readers, consensus, soft = lidc.load_nodule(rec)
    n = len(rec.slice_paths)
    assert images.shape == (n, 128, 128) and images.dtype == np.uint8
    assert readers.shape == (4, n, 128, 128) and set(np.unique(readers)) <= {0, 1}
    # manual count straight from the PNGs
    manual = np.zeros((4, n, 128, 128), int)
    for r in range(4):
        for z, p in enumerate(rec.slice_paths):
            manual[r, z] = _png(lidc_slices / pid / "nodule-0" / f"mask-{r}" / p.name) == 255
    marked = manual.reshape(4, -1).any(1)
    count = manual[marked].sum(0)
    assert marked.sum() == {1: 2, 2: 4}[min_agree]
    np.testing.assert_array_equal(consensus, (count >= min_agree).astype(np.uint8))
    np.testing.assert_allclose(soft, count / marked.sum(), atol=1e-6)
    np.testing.assert_array_equal(images[0], _png(rec.slice_paths[0]))


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_consensus_rules_absent_folder_missing_slice_and_all_zero_reader(tmp_path):
    ndir = tmp_path / "LIDC-IDRI-0999" / "nodule-0"
    a = np.zeros((128, 128), np.uint8)
    a[60:70, 60:70] = 255
    b = np.zeros_like(a)
    b[65:75, 65:75] = 255
    for z in range(11):                                  # 11 slices: checks numeric order (slice-10 after slice-9)
        _write(ndir / "images" / f"slice-{z}.png", np.full((128, 128), z, np.uint8))
        _write(ndir / "mask-0" / f"slice-{z}.png", a)
        if z != 3:                                       # reader 1 lacks slice 3: zeros there
            _write(ndir / "mask-1" / f"slice-{z}.png", b)
        _write(ndir / "mask-2" / f"slice-{z}.png", np.zeros_like(a))   # did not mark the nodule
    # mask-3 absent: did not mark it either -> 2 readers marked, consensus = at least 1 of 2
    (rec,) = lidc.iter_lidc_nodules(tmp_path)
    assert [p.name for p in rec.slice_paths][-2:] == ["slice-9.png", "slice-10.png"]
    images, readers, consensus, soft = lidc.load_nodule(rec)
    assert images[:, 0, 0].tolist() == list(range(11))
    assert readers.shape == (3, 11, 128, 128)
    union = ((a > 0) | (b > 0)).astype(np.uint8)
    np.testing.assert_array_equal(consensus[0], union)
    np.testing.assert_array_equal(consensus[3], (a > 0).astype(np.uint8))
    assert soft[0, 67, 67] == 1.0 and soft[0, 61, 61] == 0.5 and soft[3, 67, 67] == 0.5
    assert soft.dtype == np.float32 and consensus.dtype == np.uint8


def test_iter_missing_root_is_input_error(tmp_path):
    with pytest.raises(InputError):
        lidc.iter_lidc_nodules(tmp_path / "nope")


def test_split_is_deterministic_by_patient_and_disjoint():
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(4, 104)]   # none of the reserved test patients
    s1 = lidc.split_patients(ids, seed=0)
    s2 = lidc.split_patients(list(reversed(ids)) + ids[:5], seed=0)   # order and duplicates do not matter
    assert s1 == s2
    assert [len(s1[k]) for k in ("train", "val", "test")] == [70, 15, 15]
    sets = [set(v) for v in s1.values()]
    assert set().union(*sets) == set(ids) and sum(map(len, sets)) == len(ids)
    assert all(v == sorted(v) for v in s1.values())
    assert lidc.split_patients(ids, seed=1) != s1
    with pytest.raises(ValueError):
        lidc.split_patients(ids, fractions=(0.5, 0.2, 0.2))


# ---------------------------------------------------------------------------------------------------------------
# intensity mapping, on the real scan the crops came from
# ---------------------------------------------------------------------------------------------------------------

def test_hu_mapping_reproduces_8bit_crops_of_lidc_0001(shared_data):
    lung_dir = shared_data / "lung"
    ct = sitk.ReadImage(str(require(lung_dir / "LIDC-IDRI_c2c_slabs" / "LIDC-IDRI-0001" / "ct.nii.gz")))
    crops = require(lung_dir / "LIDC-IDRI-slices" / "LIDC-IDRI-0001" / "nodule-0" / "images")
    lo, hi = LUNG_NODULE.hu_window
    assert lo <= -1024 and hi >= 1500, (
        f"tasks.LUNG_NODULE.hu_window={LUNG_NODULE.hu_window} cuts tissue; the crops are per-slice min-max of "
        "unclipped HU, so it must only drop out-of-field padding, e.g. (-1024, 3071): see docs/lidc_window.md")
    i, j = CROP_0001["centre_ij"]
    k_mid = 4 + CROP_0001["slab_minus_crop"]
    region = lung.extract_seed_region(ct, _ras_of_index(ct, (i, j, k_mid)), LUNG_NODULE)
    assert region.seed_in_stack == (k_mid, 64, 64)       # slab of 16 slices at 2.5 mm: all within +-40 mm
    errs = []
    for k in range(CROP_0001["n_slices"]):
        crop = _png(crops / f"slice-{k}.png").astype(np.float32)
        ours = region.stack[k + CROP_0001["slab_minus_crop"]] * 255.0
        errs.append(np.abs(ours - crop).mean())
        # the same through the array function on the raw HU window
        raw = sitk.GetArrayViewFromImage(ct)[k + 3, j - 64:j + 64, i - 64:i + 64]
        np.testing.assert_allclose(lung.hu_to_crop_intensity(raw) * 255.0, ours, atol=1e-3)
    # the crops are rounded to 8 bits: a mean error of 0.25 grey levels is the rounding itself
    assert max(errs) < 0.3, errs


def test_hu_to_crop_intensity_is_per_slice_and_bounded():
    hu = np.stack([np.full((4, 4), -900.0), np.linspace(-1000, 500, 16).reshape(4, 4), np.full((4, 4), -3024.0)])
    hu[2, 0, 0] = 40.0
    out = lung.hu_to_crop_intensity(hu)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.all(out[0] == 0)                           # constant slice
    assert out[1].min() == 0 and out[1].max() == 1
    lo = LUNG_NODULE.hu_window[0]
    # out-of-field padding is clipped, so it cannot become the slice minimum below air
    assert out[2, 0, 0] == 1.0 and out[2, 1, 1] == 0.0 and lo >= -1024


# ---------------------------------------------------------------------------------------------------------------
# seed region geometry
# ---------------------------------------------------------------------------------------------------------------

def _rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]),    # index axes i, j, k run to A, I, L
    "oblique": _rotation((1, 2, 0.5), 25.0) @ np.diag([1.0, -1.0, 1.0]),
}


def _phantom(direction, size=(40, 36, 30), spacing=(0.8, 0.7, 2.0), blob_at=(25, 14, 17), radius_vox=2.5):
    """CT of -800 HU with a +100 HU ball (in index space) at ``blob_at`` (i, j, k); returns image and blob mask."""
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in reversed(size)], indexing="ij")
    i, j, k = blob_at
    ball = ((xx - i) ** 2 + (yy - j) ** 2 + (zz - k) ** 2) <= radius_vox ** 2
    arr = np.where(ball, 100, -800).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, 30.5, -101.0))
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img, ball.astype(np.uint8)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_seed_round_trip_any_direction(name):
    img, ball = _phantom(DIRECTIONS[name])
    seed_ras = _ras_of_index(img, (25, 14, 17))
    region = lung.extract_seed_region(img, seed_ras, LUNG_NODULE)
    assert region.seed_index == (25, 14, 17)
    s, r, c = region.seed_in_stack
    assert (r, c) == (64, 64)
    assert region.stack.shape[1:] == (128, 128) and region.stack.dtype == np.float32
    # slices within +-40 mm along the slicing axis, clipped to the volume
    n_axis = img.GetSize()[region.axes[0]]
    assert region.stack.shape[0] <= n_axis
    # the blob sits at the centre of the stack (found in HU: per-slice min-max makes blob-free slices bright too)
    bright = region.hu > -400
    centre = np.argwhere(bright).mean(0)
    np.testing.assert_allclose(centre, (s, 64, 64), atol=1e-6)
    assert region.stack[s, 64, 64] == 1.0 and region.stack[s, 64, 80] < 0.5
    assert region.hu[0, 0, 0] == lung.PAD_HU            # in-plane padding outside a 40-voxel image
    # stack axes point (as nearly as whole index axes can) to S, P, L like the LIDC crops
    idx_img = sitk.GetImageFromArray(np.arange(ball.size, dtype=np.int32).reshape(ball.shape))
    idx_img.CopyInformation(img)
    ids = lung.take_region(idx_img, region, pad_value=-1)

    def phys(pos):
        flat = int(ids[pos])
        k, rem = divmod(flat, ball.shape[1] * ball.shape[2])
        j, i = divmod(rem, ball.shape[2])
        return np.array(img.TransformIndexToPhysicalPoint((i, j, k)))

    p0 = phys((s, r, c))
    assert phys((s + 1, r, c))[2] > p0[2] or s + 1 >= region.stack.shape[0]
    assert phys((s, r + 1, c))[1] > p0[1]
    assert phys((s, r, c + 1))[0] > p0[0]
    # paste-back puts the blob on exactly the same voxels of the input grid
    lab = lung.paste_back(bright.astype(np.float32), region, img)
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert lab.GetSize() == img.GetSize() and lab.GetOrigin() == img.GetOrigin()
    assert lab.GetSpacing() == img.GetSpacing() and lab.GetDirection() == img.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), ball)


def test_seed_outside_image_is_input_error():
    img, _ = _phantom(DIRECTIONS["oblique"])
    far = np.array(_ras_of_index(img, (0, 0, 0))) + (500.0, 0, 0)
    with pytest.raises(InputError) as exc:
        lung.extract_seed_region(img, tuple(far), LUNG_NODULE)
    msg = str(exc.value)
    assert "outside the image" in msg and "\n" not in msg


def test_seed_near_border_is_padded_and_clipped():
    img, _ = _phantom(np.eye(3))
    region = lung.extract_seed_region(img, _ras_of_index(img, (0, 35, 0)), LUNG_NODULE)
    assert region.seed_in_stack == (0, 64, 64)
    assert region.stack.shape[0] == 21                    # 40 mm / 2 mm = 20 slices above, none below
    assert np.all(region.hu[:, :, :64] == lung.PAD_HU)   # columns left of the seed are outside (i < 0)


def test_component_selection_keeps_seeded_or_nearest():
    img, _ = _phantom(np.eye(3))
    region = lung.extract_seed_region(img, _ras_of_index(img, (20, 18, 15)), LUNG_NODULE)
    s = region.seed_in_stack[0]
    prob = np.zeros(region.stack.shape, np.float32)
    prob[s - 1:s + 2, 62:67, 62:67] = 0.9               # component at the seed
    prob[s, 64:67, 75:80] = 0.8                          # another one 11 px (8.8 mm) away along columns
    prob[s, 48:51, 46:49] = 0.7                          # a third one about 18 mm away
    arr = sitk.GetArrayFromImage(lung.paste_back(prob, region, img))
    assert arr.sum() == 3 * 25
    assert arr[15, 18, 20] == 1
    # seed in the gap: nearest component within 10 mm is kept alone
    prob[s - 1:s + 2, 62:67, 62:67] = 0
    arr = sitk.GetArrayFromImage(lung.paste_back(prob, region, img))
    assert arr.sum() == 15 and arr[15, 18 + 1, 20 + 11] == 1
    # nothing within 10 mm: empty
    arr = sitk.GetArrayFromImage(lung.paste_back(prob, region, img, max_distance_mm=5.0))
    assert arr.sum() == 0


def test_nodule_diameter_of_a_disk():
    spacing = (0.7, 0.7, 2.5)
    arr = np.zeros((5, 64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    arr[2] = ((yy - 32) ** 2 + (xx - 30) ** 2) * 0.49 <= 7.0 ** 2    # radius 7 mm
    arr[1] = ((yy - 32) ** 2 + (xx - 30) ** 2) * 0.49 <= 4.0 ** 2
    lab = sitk.GetImageFromArray(arr)
    lab.SetSpacing(spacing)
    lab.SetDirection(DIRECTIONS["flipped"].ravel().tolist())
    d = lung.longest_axial_diameter_mm(lab)
    assert 14.0 <= d <= 14.0 + 2 * 0.7, d
    assert lung.longest_axial_diameter_mm(lab * 0) == 0.0
    assert lung.max_3d_diameter_mm(lab * 0) == 0.0


def test_max_3d_diameter_sees_what_one_axial_slice_misses():
    """A rod along S/I: small on every axial slice, long in 3D; the same length on any grid orientation."""
    arr = np.zeros((20, 9, 9), np.uint8)
    arr[2:18, 4, 4] = 1                      # 16 slices x 2.5 mm = 40 mm long, one 0.7 mm pixel wide
    for name in ("identity", "flipped", "oblique"):
        lab = sitk.GetImageFromArray(arr)
        lab.SetSpacing((0.7, 0.7, 2.5))
        lab.SetDirection(DIRECTIONS[name].ravel().tolist())
        assert lung.longest_axial_diameter_mm(lab) == pytest.approx(0.7 * 2 ** 0.5, rel=1e-6)
        assert lung.max_3d_diameter_mm(lab) == pytest.approx((40.0 ** 2 + 2 * 0.7 ** 2) ** 0.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# real HU slabs: crop the reference slice-wise, paste it back
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"])
def test_paste_back_of_slab_consensus_is_exact(shared_data, pid):
    case = require(shared_data / "lung" / "LIDC-IDRI_c2c_slabs" / pid)
    ct = sitk.ReadImage(str(case / "ct.nii.gz"))
    cons = sitk.ReadImage(str(case / "nodule_consensus50.nii.gz"))
    carr = sitk.GetArrayFromImage(cons)
    # seed: the consensus voxel nearest to its centroid, as a clinician clicks the middle of the nodule
    vox = np.argwhere(carr > 0)
    k, j, i = vox[np.argmin(((vox - vox.mean(0)) ** 2).sum(1))]
    region = lung.extract_seed_region(ct, _ras_of_index(ct, (i, j, k)), LUNG_NODULE)
    stack = lung.take_region(cons, region, pad_value=0).astype(np.float32)
    assert stack.sum() == carr.sum()                     # the whole nodule fits in the window
    lab = lung.paste_back(stack, region, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), (carr > 0).astype(np.uint8))
    assert lab.GetOrigin() == ct.GetOrigin() and lab.GetSpacing() == ct.GetSpacing()
    d = lung.longest_axial_diameter_mm(lab)
    assert 5.0 < d < 60.0
    assert d <= lung.max_3d_diameter_mm(lab) < 100.0


def test_patients_with_hu_slabs_are_always_test():
    from KDSegmentationLib.tasks.lidc import RESERVED_TEST_PATIENTS, split_patients

    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 120)]
    for seed in range(5):
        s = split_patients(ids, seed=seed)
        assert set(RESERVED_TEST_PATIENTS) <= set(s["test"])
        assert not set(RESERVED_TEST_PATIENTS) & (set(s["train"]) | set(s["val"]))


def test_click_channel_marks_the_seed():
    stack = np.random.default_rng(0).random((3, 128, 128)).astype(np.float32)
    x = lung.network_stack(stack)
    assert x.shape == (3, 2, 128, 128)
    np.testing.assert_array_equal(x[:, 0], stack)
    assert np.unravel_index(np.argmax(x[1, 1]), (128, 128)) == (64, 64)
    off = lung.network_stack(stack, centre=(20, 100))
    assert np.unravel_index(np.argmax(off[0, 1]), (128, 128)) == (20, 100)
    assert off[0, 1, 20, 100] == pytest.approx(1.0) and off[0, 1, 64, 64] < 1e-3


def test_feret_diameter_equals_the_farthest_pair_of_all_corners():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(0)
    oblique = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]) * np.array([0.7, 0.9, 2.5])
    for trial in range(12):
        d = 2 if trial % 2 else 3
        mask = rng.random((6,) * d) < 0.3
        idx = np.argwhere(mask).astype(float)
        offsets = np.array(np.meshgrid(*[(-.5, .5)] * d, indexing="ij")).reshape(d, -1).T
        corners = (idx[:, None, :] + offsets[None]).reshape(-1, d)
        to_physical = oblique[:d, :d] if d == 3 else np.diag([0.7, 1.3])
        expected = pdist(corners @ to_physical.T).max()
        assert lung._feret_diameter(corners, to_physical) == pytest.approx(expected, rel=1e-12)


def test_select_component_keeps_the_seeded_or_nearest_26_connected_component():
    from scipy import ndimage

    from KDSegmentationLib.tasks.components import select_component

    def by_scipy(mask, seed, spacing, limit):
        labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
        keep = labels[tuple(seed)] if n else 0
        if n and keep == 0:
            idx = np.argwhere(labels > 0)
            dist = np.sqrt((((idx - np.asarray(seed)) * np.asarray(spacing)) ** 2).sum(axis=1))
            keep = labels[tuple(idx[int(np.argmin(dist))])] if dist.min() <= limit else 0
        return (labels == keep).astype(np.uint8) if keep else np.zeros(mask.shape, np.uint8)

    rng = np.random.default_rng(1)
    for trial in range(20):
        mask = (rng.random((5, 12, 12)) < 0.15).astype(np.uint8)
        seed = tuple(int(v) for v in rng.integers(0, (5, 12, 12)))
        spacing, limit = (2.5, 0.7, 0.7), 4.0 if trial % 2 else 10.0
        np.testing.assert_array_equal(select_component(mask, seed, spacing, limit),
                                      by_scipy(mask, seed, spacing, limit))
    assert not select_component(np.zeros((3, 4, 4), np.uint8), (1, 1, 1), (1, 1, 1)).any()
