"""Dataset layouts, the prepared cache, splits, the batch sampler and the training samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from KDSegmentationLib.training import augment
from KDSegmentationLib.training import cache as caches, layouts, reading, sampling, splits
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import get_task

from conftest import LIB_PARENT, require

RETINA, LIVER, LUNG = get_task("retina"), get_task("liver"), get_task("lung_nodule")


# ----------------------------------------------------------------------------------------------------------------
# tiny synthetic datasets
# ----------------------------------------------------------------------------------------------------------------
def _photo(size=96, seed=0) -> np.ndarray:
    """A fundus-like RGB photo: a bright disc (the field of view) on black, with dark 'vessels'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[disc] = (170, 90, 40)
    rgb[disc & (np.abs(yy - xx) < 2)] = (90, 40, 20)
    rgb[disc] = np.clip(rgb[disc] + rng.integers(0, 10, (int(disc.sum()), 3)), 0, 255)
    return rgb


def _vessels(size=96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    return ((np.abs(yy - xx) < 2) & disc).astype(np.uint8) * 255


def _save(arr, path: Path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def _ct(path: Path, shape=(12, 20, 24), value=None, spacing=(1.5, 1.5, 4.0)):
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        arr = np.full(shape, -1000, np.int16)
        arr[2:10, 4:16, 4:20] = 50       # "body"
        arr[4:8, 6:12, 6:14] = 80        # "liver"
    else:
        arr = value
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return arr


def _liver_mask(shape=(12, 20, 24)):
    m = np.zeros(shape, np.uint8)
    m[4:8, 6:12, 6:14] = 1
    return m


def make_generic_retina(root: Path, n=2) -> Path:
    for i in range(n):
        _save(_photo(seed=i), root / "images" / f"eye{i}.png")
        _save(_vessels(), root / "labels" / f"eye{i}.png")
    return root


def make_case_folders(root: Path) -> Path:
    for name in ("case_a", "case_b"):
        _ct(root / name / "ct.nii.gz")
        liver = _liver_mask()
        tumour = np.zeros_like(liver)
        tumour[5:7, 8:10, 8:10] = 1
        _ct(root / name / "liver.nii.gz", value=liver)
        _ct(root / name / "tumor.nii.gz", value=tumour)
    return root


def make_drive(root: Path) -> Path:
    for split, key, suffix in (("training", "21", "training"), ("training", "22", "training"), ("test", "01", "test")):
        _save(_photo(seed=int(key)), root / split / "images" / f"{key}_{suffix}.tif")
        _save(_vessels(), root / split / "1st_manual" / f"{key}_manual1.gif")
        fov = (_photo().max(-1) > 0).astype(np.uint8) * 255
        _save(fov, root / split / "mask" / f"{key}_{suffix}_mask.gif")
    return root


def make_chase(root: Path) -> Path:
    for name in ("Image_01L", "Image_01R", "Image_12L"):
        _save(_photo(), root / "images" / f"{name}.jpg")
        _save(_vessels() > 0, root / "manual" / f"{name}_1stHO.png")
    return root


def make_lidc(root: Path) -> Path:
    for pid in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        for nod in ("nodule-0", "nodule-1"):
            for k in range(3):
                img = np.full((128, 128), 40, np.uint8)
                img[54:74, 54:74] = 200
                _save(img, root / pid / nod / "images" / f"slice-{k}.png")
                for r in range(3):
                    m = np.zeros((128, 128), np.uint8)
                    m[56 + r:72, 56:72] = 255
                    _save(m, root / pid / nod / f"mask-{r}" / f"slice-{k}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# layout detection
# ----------------------------------------------------------------------------------------------------------------
def test_generic_layout_pairs_images_labels_and_fov(tmp_path):
    root = make_generic_retina(tmp_path / "g")
    _save((_photo().max(-1) > 0).astype(np.uint8) * 255, root / "fov" / "eye0_mask.png")
    cases = layouts.find_cases(root, RETINA)
    assert [c.layout for c in cases] == ["generic", "generic"]
    assert all(c.labelled for c in cases)
    assert cases[0].fov and cases[0].fov.endswith("eye0_mask.png") and cases[1].fov is None


def test_msd_layout_with_nnunet_channel_suffix(tmp_path):
    _ct(tmp_path / "msd" / "imagesTr" / "liver_3_0000.nii.gz")
    _ct(tmp_path / "msd" / "labelsTr" / "liver_3.nii.gz", value=_liver_mask())
    cases = layouts.find_cases(tmp_path / "msd", LIVER)
    assert len(cases) == 1 and cases[0].layout == "msd" and cases[0].label.endswith("liver_3.nii.gz")


def test_drive_layout_has_train_and_test_splits(tmp_path):
    cases = layouts.find_cases(make_drive(tmp_path / "DRIVE"), RETINA)
    assert {c.case_id: c.split for c in cases} == {"21_training": "train", "22_training": "train", "01_test": "test"}
    assert all(c.fov and c.label for c in cases)
    train, val, test = splits.split_cases(cases, None, 0)
    assert [c.case_id for c in test] == ["01_test"]  # the test split is never trained or validated on
    assert len(train) + len(val) == 2 and len(val) == 1


def test_chase_layout_groups_both_eyes_of_a_child(tmp_path):
    cases = layouts.find_cases(make_chase(tmp_path / "CHASE"), RETINA)
    by_id = {c.case_id: c for c in cases}
    assert by_id["Image_01L"].group == by_id["Image_01R"].group == "child01"
    assert by_id["Image_01L"].split == "train" and by_id["Image_12L"].split == "test"
    assert by_id["Image_01L"].label.endswith("Image_01L_1stHO.png")


def test_lidc_layout_one_case_per_nodule_grouped_by_patient(tmp_path):
    cases = layouts.find_cases(make_lidc(tmp_path / "lidc"), LUNG)
    assert len(cases) == 4 and {c.group for c in cases} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002"}
    assert cases[0].case_id == "LIDC-IDRI-0001_nodule-0" and cases[0].layout == "lidc_slices"
    for pid in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):  # a patient's nodules share one split
        assert len({c.split for c in cases if c.group == pid}) == 1


def test_case_folders_merge_liver_and_tumour(tmp_path):
    cases = layouts.find_cases(make_case_folders(tmp_path / "rad"), LIVER)
    assert [c.case_id for c in cases] == ["case_a", "case_b"]
    assert set(cases[0].structures) == {1, 2} and cases[0].layout == "case_folders"
    arrays = reading.prepare_case(cases[0], LIVER)
    assert arrays["image"].dtype == np.int16 and arrays["label"].shape == arrays["image"].shape
    assert set(np.unique(arrays["label"])) == {0, 1, 2}
    assert np.allclose(arrays["spacing"], LIVER.spacing_mm)


def test_unlabelled_folder(tmp_path):
    for i in range(2):
        _save(_photo(seed=i), tmp_path / "u" / f"p{i}.jpg")
    cases = layouts.find_cases(tmp_path / "u", RETINA)
    assert [c.layout for c in cases] == ["unlabelled"] * 2 and not any(c.labelled for c in cases)


def test_unrecognised_folder_lists_the_layouts(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError) as err:
        layouts.find_cases(tmp_path / "x", RETINA)
    msg = str(err.value)
    assert "\n" not in msg and "DRIVE" in msg and "imagesTr" in msg and "LIDC" in msg
    with pytest.raises(InputError, match="not found"):
        layouts.find_cases(tmp_path / "missing", RETINA)


def test_layout_of_another_task_is_refused(tmp_path):
    with pytest.raises(InputError, match="--task"):
        layouts.find_cases(make_drive(tmp_path / "DRIVE"), LIVER)


# ----------------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------------
def test_cache_round_trip_retina(tmp_path):
    root = make_generic_retina(tmp_path / "g")
    cases = layouts.find_cases(root, RETINA)
    direct = [reading.prepare_case(c, RETINA) for c in cases]
    out = caches.prepare_cache(cases, RETINA, tmp_path / "cache", source=str(root))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "retina" and manifest["layout"] == "generic" and manifest["format"] == caches.CACHE_FORMAT
    assert [e["case_id"] for e in manifest["cases"]] == ["eye0", "eye1"]
    cached = layouts.find_cases(out, RETINA)  # a cache is a --data folder too
    assert [c.case_id for c in cached] == ["eye0", "eye1"] and all(c.labelled for c in cached)
    for c, d in zip(cached, direct):
        a = caches.load_arrays(c)
        assert a["image"].dtype == np.uint8 and a["image"].shape[2] == 3 and a["fov"].dtype == bool
        for key in ("image", "fov", "label"):
            np.testing.assert_array_equal(a[key], d[key])
    with pytest.raises(InputError, match="prepared for task"):
        layouts.find_cases(out, LIVER)
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary folder left behind


def test_cache_round_trip_ct_and_reuse(tmp_path):
    root = make_case_folders(tmp_path / "rad")
    cache = caches.ensure_cache(root, LIVER, tmp_path / "cache")
    assert len(cache.cases) == 2
    a = caches.load_arrays(cache.cases[0])
    assert a["image"].dtype == np.int16 and a["label"].dtype == np.uint8 and a["label"].max() == 2
    stamp = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    caches.ensure_cache(root, LIVER, tmp_path / "cache")  # unchanged source: reused
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == stamp
    os.utime(root / "case_a" / "ct.nii.gz", (1, 1))  # a changed source file invalidates the cache
    caches.ensure_cache(root, LIVER, tmp_path / "cache")
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns != stamp


def test_cache_of_lidc_slices(tmp_path):
    cases = layouts.find_cases(make_lidc(tmp_path / "lidc"), LUNG)
    out = caches.prepare_cache(cases[:1], LUNG, tmp_path / "cache")
    a = caches.load_arrays(caches.load_cache(out).cases[0])
    assert a["image"].shape == (3, 128, 128) and a["image"].dtype == np.uint8
    assert a["label"].dtype == np.uint8 and a["soft"].dtype == np.float16
    thirds = np.unique(a["soft"]).astype(np.float32) * 3  # 3 readers: agreement in thirds
    assert np.allclose(thirds, np.round(thirds), atol=1e-2)
    assert a["label"].sum() > 0


def test_training_from_a_cache_never_imports_simpleitk(tmp_path):
    root = make_generic_retina(tmp_path / "g", n=3)
    caches.prepare_cache(layouts.find_cases(root, RETINA), RETINA, tmp_path / "cache")
    code = f"""
import sys
sys.modules['SimpleITK'] = None  # any import of it now fails
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.trainer import train
train(TrainConfig(task='retina', data={str(tmp_path / 'cache')!r}, output={str(tmp_path / 'm.kdseg.pt')!r},
                  role='teacher', steps=2, batch_size=2, patch=(32, 32), val_fraction=0,
                  arch_args={{'filters': [4, 8, 16]}}))
"""
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.kdseg.pt").is_file()


# ----------------------------------------------------------------------------------------------------------------
# splits and sampling
# ----------------------------------------------------------------------------------------------------------------
def _cases(groups):
    return [layouts.Case(case_id=f"{g}_{i}", group=g, image="x", label="y") for i, g in enumerate(groups)]


def test_split_by_patient_and_folds():
    cases = _cases(["p1", "p1", "p2", "p3", "p3", "p4", "p5"])
    train, val, test = splits.split_cases(cases, 0.4, seed=3)
    assert not {c.group for c in train} & {c.group for c in val} and not test
    assert splits.split_cases(cases, 0.4, seed=3)[1] == val  # deterministic
    seen = []
    for k in range(3):
        tr, va, _ = splits.split_cases(cases, None, 0, folds=3, fold=k)
        assert not {c.group for c in tr} & {c.group for c in va}
        seen += [c.group for c in va]
    assert sorted(set(seen)) == ["p1", "p2", "p3", "p4", "p5"] and len(seen) == len(set(seen)) + 2
    assert splits.split_cases(cases, 0.0, 0)[1] == []


def test_sampler_is_deterministic_mixes_and_resumes():
    s = sampling.MixedBatchSampler(5, 3, 8, total_steps=20, seed=1, unlabelled_fraction=0.25)
    batches = list(s)
    assert len(batches) == 20
    assert all(sum(k[0] >= 5 for k in b) == 2 for b in batches)  # 2 of 8 unlabelled in every batch
    assert batches == list(sampling.MixedBatchSampler(5, 3, 8, total_steps=20, seed=1, unlabelled_fraction=0.25))
    resumed = list(sampling.MixedBatchSampler(5, 3, 8, total_steps=20, seed=1, start_step=7, unlabelled_fraction=0.25))
    assert resumed == batches[7:]
    # every labelled case equally often over whole cycles
    counts = np.bincount([k[0] for b in batches[:5] for k in b if k[0] < 5], minlength=5)
    assert counts.min() == counts.max() == 6
    # two ranks draw different cases/seeds at the same step
    r0 = sampling.MixedBatchSampler(5, 0, 4, 3, seed=1, rank=0, world_size=2).batch(0)
    r1 = sampling.MixedBatchSampler(5, 0, 4, 3, seed=1, rank=1, world_size=2).batch(0)
    assert [k[1] for k in r0] != [k[1] for k in r1]


# ----------------------------------------------------------------------------------------------------------------
# samples and augmentation
# ----------------------------------------------------------------------------------------------------------------
def _retina_arrays():
    rgb = _photo(128)
    return {"image": rgb, "fov": rgb.max(-1) > 0, "label": (_vessels(128) > 0).astype(np.uint8)}


def _ct_arrays():
    hu = np.full((40, 60, 60), -1000, np.int16)
    hu[5:35, 10:50, 10:50] = 40
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:30, 20:40, 25:45] = 1
    lab[15:18, 25:28, 30:33] = 2
    return {"image": hu, "label": lab}


def _slice_arrays():
    img = np.full((4, 128, 128), 30, np.uint8)
    img[:, 50:70, 50:70] = 220
    lab = np.zeros(img.shape, np.uint8)
    lab[1:3, 52:68, 52:68] = 1
    return {"image": img, "label": lab, "soft": lab.astype(np.float16) * 0.75}


@pytest.mark.parametrize("task,arrays,patch,channels", [
    (RETINA, _retina_arrays, (64, 64), 3), (LIVER, _ct_arrays, (16, 32, 32), 1), (LUNG, _slice_arrays, (128, 128), 2),
])
def test_patch_dataset_items(task, arrays, patch, channels):
    import torch

    data = sampling.PatchDataset([arrays()], [True], task, patch, soft_labels=task is LUNG)
    key = (0, (0, 5, 0, 0, 1))
    item = data[key]
    region = data.region
    assert item["image"].shape == (channels, *region) and item["image"].dtype == torch.float16
    assert item["label"].shape == region and item["theta"].shape == (len(patch), len(patch) + 1)
    assert torch.equal(item["image"], data[key]["image"])  # a pure function of its key
    assert not torch.equal(item["image"], data[(0, (0, 6, 0, 0, 1))]["image"])
    batch = {k: torch.stack([item[k], data[(0, (1, 1, 0, 0, 0))][k]]) for k in item}
    x, y, s = augment.warp_batch(batch["image"], batch["theta"], patch, label=batch["label"],
                                 soft=batch.get("soft"), pad_mode=data.policy.pad_mode)
    assert x.shape == (2, channels, *patch) and x.dtype == torch.float32 and y.shape == (2, *patch)
    assert set(torch.unique(y).tolist()) <= {v.value for v in task.labels} | {0}
    if s is not None:
        assert s.shape == (2, 2, *patch) and torch.allclose(s.sum(1), torch.ones(()))


def test_foreground_oversampling_finds_small_structures():
    data = sampling.PatchDataset([_ct_arrays()], [True], LIVER, (16, 16, 16))
    hits = sum(int((data[(0, (s,))]["label"] == 2).any()) for s in range(30))
    assert hits >= 6  # tumour (0.05 % of the volume) in a good share of the patches: classes drawn equally


def test_identity_warp_is_the_centre_crop():
    import torch

    img = torch.arange(2 * 1 * 12 * 10, dtype=torch.float32).reshape(2, 1, 12, 10)
    lab = (img[:, 0] % 3).to(torch.uint8)
    theta = torch.from_numpy(np.stack([augment.random_affine(None, augment.AugPolicy(), (6, 4), (12, 10),
                                                             augment=False)] * 2))
    x, y, _ = augment.warp_batch(img, theta, (6, 4), label=lab)
    assert torch.allclose(x, img[:, :, 3:9, 3:7]) and torch.equal(y, lab[:, 3:9, 3:7].long())


def test_ct_policy_never_mirrors():
    policy = augment.default_policy(LIVER)
    assert policy.flip_axes == ()
    rng = np.random.default_rng(0)
    for _ in range(50):
        theta = augment.random_affine(rng, policy, (16, 32, 32), (20, 40, 40))
        assert np.linalg.det(theta[:, :3]) > 0  # a mirror would flip the sign: the liver has a side
    assert augment.default_policy(RETINA).flip_axes  # photos may be mirrored (left/right eyes exist)


def test_contrast_phase_shift_moves_soft_tissue_not_air_or_fat():
    hu = np.array([-1000.0, -300.0, -150.0, -75.0, 0.0, 100.0, 1000.0], np.float32)
    shifted = augment.contrast_phase_shift(hu, -50.0)
    np.testing.assert_allclose(shifted, [-1000, -300, -150, -100, -50, 50, 950], atol=1e-4)
    # an unenhanced liver (~55 HU) is inside the drawn range of a portal-venous training liver (~100 HU)
    assert augment.PHASE_SHIFT_HU[0] <= 55 - 100 and augment.PHASE_SHIFT_HU[1] >= 120 - 100


def test_crop_normalisation_matches_whole_photo(shared_data):
    from KDSegmentationLib.tasks.retina import fov_diameter, fov_mask
    from KDSegmentationLib.tasks.retina import fundus_input

    rgb = np.asarray(Image.open(require(shared_data / "retina/DRIVE/training/images/21_training.tif")))
    fov = fov_mask(rgb)
    whole = fundus_input(rgb, fov)[:, 150:406, 150:406]
    region = augment.normalise_region(rgb[100:456, 100:456], fov[100:456, 100:456], fov_diameter(fov))
    err = np.abs(region[:, 50:306, 50:306] - whole).mean()
    plain = np.abs(fundus_input(rgb[100:456, 100:456], fov[100:456, 100:456])[:, 50:306, 50:306] - whole).mean()
    assert err < 0.03 * np.abs(whole).mean() and err < plain / 5


# ----------------------------------------------------------------------------------------------------------------
# the real datasets (skipped where ../shared/data is absent)
# ----------------------------------------------------------------------------------------------------------------
def test_real_drive(shared_data):
    cases = layouts.find_cases(require(shared_data / "retina" / "DRIVE"), RETINA)
    assert sum(c.split == "train" for c in cases) == 20 and sum(c.split == "test" for c in cases) == 20
    train, val, test = splits.split_cases(cases, None, 0)
    assert len(test) == 20 and {c.split for c in train + val} == {"train"} and len(val) == 4
    a = reading.prepare_case(cases[0], RETINA)
    assert abs(a["image"].shape[1] - 566) < 30 and a["label"].mean() > 0.05 and "fov_ref" in a


def test_real_chase(shared_data):
    cases = layouts.find_cases(require(shared_data / "retina" / "CHASE_DB1"), RETINA)
    assert len(cases) == 28 and sum(c.split == "test" for c in cases) == 8 and all(c.labelled for c in cases)


def test_real_lidc(shared_data):
    cases = layouts.find_cases(require(shared_data / "lung" / "LIDC-IDRI-slices"), LUNG)
    assert len(cases) == 698 and len({c.group for c in cases}) == 233
    splits = {}
    for c in cases:
        splits.setdefault(c.group, set()).add(c.split)
    assert all(len(s) == 1 for s in splits.values())  # never one patient on two sides
    a = reading.prepare_case(cases[0], LUNG)
    assert a["image"].shape[1:] == (128, 128) and a["label"].shape == a["image"].shape


def test_real_radcttaceomics_with_a_dicom_case(shared_data):
    cases = layouts.find_cases(require(shared_data / "liver" / "RadCTTACEomics"), LIVER)
    assert len(cases) == 9 and all(set(c.structures) == {1, 2} for c in cases)
    dicom_case = next(c for c in cases if c.case_id.endswith("0697"))
    assert Path(dicom_case.image).is_dir()
    a = reading.prepare_case(dicom_case, LIVER)
    assert a["label"].shape == a["image"].shape and set(np.unique(a["label"])) == {0, 1, 2}
    liver_ml = (a["label"] > 0).sum() * np.prod(LIVER.spacing_mm) / 1000
    assert 800 < liver_ml < 1100  # info.json: 927 ml liver
