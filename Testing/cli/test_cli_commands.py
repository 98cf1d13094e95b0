"""The ``kdseg`` command line end to end: results on the input geometry, and every kind of bad input refused with
one line, exit code 2 and no output file (an existing output is left untouched)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import LIB_PARENT, REPO, save_tiny_student
from KDSegmentationLib.cli.main import main
from KDSegmentationLib.io.segmentations import read_segmentation
from KDSegmentationLib.tasks import TASKS

SAMPLES = REPO / "Resources" / "Samples"
LUNG_SEED = json.loads((SAMPLES / "lung_nodule" / "sample.json").read_text())["seed_ras"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Small students with random weights: enough to exercise every stage of the pipelines."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for task in TASKS:
        paths[task] = save_tiny_student(task, folder / f"{task}_tiny.kdseg.pt")
    return paths


def _ct(path: Path, direction=None, spacing=(0.8, 0.8, 2.5), size=(64, 56, 20), lo=-1000, hi=400) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(lo, hi, size=size[::-1]).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0, 30.0, -100.0))
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def _oblique_flipped():
    a = np.deg2rad(20)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
    return tuple(r.ravel())


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------------

def test_liver_result_is_on_the_input_geometry(tmp_path, tiny_models, capsys):
    ct = _ct(tmp_path / "ct.nii.gz", direction=_oblique_flipped())
    out = tmp_path / "seg.seg.nrrd"
    code, stdout, _ = _run(["segment", "--task", "liver", "--input", ct, "--output", out,
                            "--model", tiny_models["liver"], "--threads", "1"], capsys)
    assert code == 0
    lab, names = read_segmentation(out)
    ref = sitk.ReadImage(str(ct))
    assert lab.GetSize() == ref.GetSize()
    np.testing.assert_allclose(lab.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert set(names) == {"Liver", "Liver tumor"}
    assert "Liver" in stdout and "mL" in stdout


def test_labelmap_output_and_json_progress(tmp_path, tiny_models, capsys):
    out = tmp_path / "lab.nii.gz"
    code, stdout, _ = _run(["segment", "--task", "lung_nodule", "--input", SAMPLES / "lung_nodule" /
                            "chest_ct_LIDC-IDRI-0001_crop.nii.gz", f"--seed-ras={','.join(map(str, LUNG_SEED))}",
                            "--output", out, "--model", tiny_models["lung_nodule"], "--progress", "json"], capsys)
    assert code == 0
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["path"] == str(out)
    assert any(e["event"] == "progress" and e["stage"] == "inference" for e in events)
    assert "Lung nodule" in events[-1]["segments"]
    assert sitk.ReadImage(str(out)).GetSize() == (160, 160, 16)


def test_retina_photo_result_is_single_slice_on_the_photo(tmp_path, tiny_models, capsys):
    out = tmp_path / "v.seg.nrrd"
    photo = SAMPLES / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"
    code, _, _ = _run(["segment", "--task", "retina", "--input", photo, "--output", out,
                       "--model", tiny_models["retina"]], capsys)
    assert code == 0
    lab, names = read_segmentation(out)
    assert names == {"Retinal vessels": 1}
    assert lab.GetSize()[:2] == (999, 960)


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------

def _bad_inputs(tmp: Path):
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a nifti")
    photo = SAMPLES / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"
    ct = _ct(tmp / "ct.nrrd")
    four_d = tmp / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(ct))] * 2), str(four_d))
    const = tmp / "const.nrrd"
    sitk.WriteImage(sitk.Image([32, 32, 8], sitk.sitkInt16) - 1000, str(const))
    nan = sitk.Cast(sitk.ReadImage(str(ct)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(nan)
    arr[3, 4, 5] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(nan)
    sitk.WriteImage(nan_img, str(tmp / "nan.nrrd"))
    eight_bit = _ct(tmp / "eightbit.nrrd", lo=0, hi=255)
    return {
        "missing path": ("liver", tmp / "nope.nii.gz", []),
        "corrupt file": ("liver", corrupt, []),
        "photo given to liver": ("liver", photo, []),
        "CT given to retina": ("retina", ct, []),
        "4D image": ("liver", four_d, []),
        "constant image": ("liver", const, []),
        "NaN voxels": ("liver", tmp / "nan.nrrd", []),
        "8-bit image given to a CT task": ("liver", eight_bit, []),
        "seed outside the image": ("lung_nodule", ct, ["--seed-ras=500,500,500"]),
        "missing seed": ("lung_nodule", ct, []),
        "malformed seed": ("lung_nodule", ct, ["--seed-ras=1,2"]),
    }


@pytest.mark.parametrize("case", ["missing path", "corrupt file", "photo given to liver", "CT given to retina",
                                  "4D image", "constant image", "NaN voxels", "8-bit image given to a CT task",
                                  "seed outside the image", "missing seed", "malformed seed"])
def test_bad_input_exit_2_one_line_no_output(tmp_path, tiny_models, capsys, case):
    task, path, extra = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.seg.nrrd"
    code, _, err = _run(["segment", "--task", task, "--input", path, "--output", out,
                         "--model", tiny_models[task], *extra], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdseg: error: "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_tampered_model_refused_and_existing_output_untouched(tmp_path, tiny_models, capsys):
    tampered = tmp_path / "tampered.kdseg.pt"
    raw = torch.load(str(tiny_models["retina"]), weights_only=True)
    name = next(iter(raw["state_dict"]))
    raw["state_dict"][name] = raw["state_dict"][name] + 1
    torch.save(raw, str(tampered))
    out = tmp_path / "existing.seg.nrrd"
    out.write_bytes(b"an earlier result")
    code, _, err = _run(["segment", "--task", "retina", "--input", SAMPLES / "retina" /
                         "fundus_CHASE_DB1_Image_01L.jpg", "--output", out, "--model", tampered], capsys)
    assert code == 2 and "checksum" in err
    assert out.read_bytes() == b"an earlier result"


def test_model_of_another_task_refused(tmp_path, tiny_models, capsys):
    code, _, err = _run(["segment", "--task", "liver", "--input", _ct(tmp_path / "ct.nrrd"),
                         "--output", tmp_path / "o.seg.nrrd", "--model", tiny_models["retina"]], capsys)
    assert code == 2 and "retina" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(tmp_path, tiny_models, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = _run(["segment", "--task", "liver", "--input", _ct(tmp_path / "ct.nrrd"),
                         "--output", ro / "o.seg.nrrd", "--model", tiny_models["liver"]], capsys)
    assert code == 2 and "not writable" in err


def test_output_in_missing_folder_or_with_wrong_extension(tmp_path, tiny_models, capsys):
    ct = _ct(tmp_path / "ct.nrrd")
    for out, words in ((tmp_path / "no" / "such" / "o.seg.nrrd", "does not exist"),
                       (tmp_path / "o.txt", "must end with")):
        code, _, err = _run(["segment", "--task", "liver", "--input", ct, "--output", out,
                             "--model", tiny_models["liver"]], capsys)
        assert code == 2 and words in err


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "segment", "--task", "liver", "--input",
                           str(tmp_path / "missing.nrrd"), "--output", str(tmp_path / "o.seg.nrrd"),
                           "--progress", "json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["event"] == "error"


def test_persistent_worker_serves_several_requests(tmp_path, tiny_models):
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
    photo = SAMPLES / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"
    reqs = [{"id": 1, "command": "segment", "task": "retina", "input": str(photo),
             "output": str(tmp_path / "a.seg.nrrd"), "model": str(tiny_models["retina"])},
            {"id": 2, "command": "segment", "task": "retina", "input": str(tmp_path / "missing.png"),
             "output": str(tmp_path / "b.seg.nrrd"), "model": str(tiny_models["retina"])},
            {"id": 3, "command": "segment", "task": "retina", "input": str(photo),
             "output": str(tmp_path / "c.seg.nrrd"), "model": str(tiny_models["retina"])},
            {"command": "quit"}]
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "serve", "--threads", "1"],
                          input="\n".join(json.dumps(r) for r in reqs) + "\n", capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    final = {e["id"]: e["event"] for e in events if e.get("event") in ("result", "error") and "id" in e}
    assert final == {1: "result", 2: "error", 3: "result"}
    assert (tmp_path / "a.seg.nrrd").exists() and (tmp_path / "c.seg.nrrd").exists()
    assert not (tmp_path / "b.seg.nrrd").exists()


def test_models_list_and_show(tmp_path, tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("KDSEG_USER_MODELS", str(Path(tiny_models["liver"]).parent))
    code, out, _ = _run(["models", "list", "--json"], capsys)
    assert code == 0
    names = {e["name"] for e in json.loads(out)}
    assert {"liver_tiny", "retina_tiny", "lung_nodule_tiny"} <= names
    code, out, _ = _run(["models", "show", "liver_tiny"], capsys)
    assert code == 0 and json.loads(out)["task"] == "liver"
    code, _, err = _run(["models", "show", "nope"], capsys)
    assert code == 2
