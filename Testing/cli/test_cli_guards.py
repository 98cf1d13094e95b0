"""Guards of the command line and the persistent worker: the input is never overwritten, ``--threads`` is validated
and capped, ``--model NAME`` prefers the model folders over the current directory, ``kdseg serve`` answers every
line (whatever it holds) and stays alive, messages are bounded, and SIGINT/SIGTERM during a request end with an
error event and no hidden temp file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import LIB_PARENT, REPO, save_tiny_student
from KDSegmentationLib.cli.arguments import available_cpus
from KDSegmentationLib.cli.main import main
from KDSegmentationLib.models.catalog import resolve_model
from KDSegmentationLib.tasks import get_task

SAMPLES = REPO / "Resources" / "Samples"
PHOTO = SAMPLES / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for task in ("retina", "liver"):
        paths[task] = save_tiny_student(task, folder / f"{task}_tiny.kdseg.pt")
    return paths


def _ct(path: Path) -> Path:
    arr = np.random.default_rng(0).integers(-1000, 400, size=(12, 40, 48)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path))
    return path


def _dicom(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(n):
        sl = sitk.GetImageFromArray(rng.integers(-1000, 400, size=(1, 40, 48)).astype(np.int16))
        sl.SetSpacing((0.8, 0.8, 2.5))
        sl.SetOrigin((-5.0, -6.0, 2.5 * i))
        for key, val in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.98.1",
                         "0020|000d": "1.2.826.0.1.3680043.2.1125.98.0", "0020|0013": str(i + 1),
                         "0020|0032": f"-5\\-6\\{2.5 * i}", "0020|0037": "1\\0\\0\\0\\1\\0",
                         "0008|0018": f"1.2.826.0.1.3680043.2.1125.98.2.{i + 1}"}.items():
            sl.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"IM{i:04d}.dcm"))
        writer.Execute(sl)
    return folder


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(LIB_PARENT), **extra)


def _kdseg(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "KDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, env=_env(**env), timeout=300, cwd=str(cwd))


def _one_error_line(err: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdseg: error: "), err
    assert len(lines[0]) < 2500


def _hidden(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------------------
# the input is never overwritten
# ------------------------------------------------------------------------------------------------------------

def _same_as_input_cases(tmp: Path):
    ct = _ct(tmp / "ct.nrrd")
    (tmp / "link.nrrd").symlink_to(ct)
    dicom = _dicom(tmp / "dicom")
    os.link(ct, tmp / "hard.nrrd")
    return {
        "same path": (ct, ct, tmp),
        "relative path": (ct, Path("ct.nrrd"), tmp),
        "dotted path": (ct, Path("sub/../ct.nrrd"), tmp),
        "symlink to the input": (ct, tmp / "link.nrrd", tmp),
        "input through a symlink": (tmp / "link.nrrd", ct, tmp),
        "hard link": (ct, tmp / "hard.nrrd", tmp),
        "inside the DICOM folder": (dicom, dicom / "seg.nrrd", tmp),
        "a DICOM subfolder": (dicom, dicom / "sub" / ".." / "seg.nii.gz", tmp),
    }


@pytest.mark.parametrize("case", ["same path", "relative path", "dotted path", "symlink to the input",
                                  "input through a symlink", "hard link", "inside the DICOM folder",
                                  "a DICOM subfolder"])
def test_output_equal_to_input_is_refused(case, tmp_path, tiny_models, capsys, monkeypatch):
    (tmp_path / "sub").mkdir()
    inp, out, cwd = _same_as_input_cases(tmp_path)[case]
    monkeypatch.chdir(cwd)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["segment", "--task", "liver", "--input", str(inp), "--output", str(out),
                 "--model", str(tiny_models["liver"])])
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed
    assert (tmp_path / "link.nrrd").is_symlink()


def test_output_equal_to_input_end_to_end(tmp_path, tiny_models):
    ct = _ct(tmp_path / "ct.nrrd")
    data = ct.read_bytes()
    proc = _kdseg(["segment", "--task", "liver", "--input", "ct.nrrd", "--output", ct, "--model",
                   tiny_models["liver"], "--threads", "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr)
    assert ct.read_bytes() == data and _hidden(tmp_path) == []


def test_evaluate_output_equal_to_a_segmentation_is_refused(tmp_path, capsys):
    seg = _ct(tmp_path / "pred.nrrd")
    data = seg.read_bytes()
    for flag in ("--pred", "--ref"):
        other = "--ref" if flag == "--pred" else "--pred"
        code = main(["evaluate", "--task", "liver", flag, str(seg), other, str(_ct(tmp_path / "other.nrrd")),
                     "--output", str(seg)])
        _, err = capsys.readouterr()
        assert code == 2, err
        _one_error_line(err)
        assert seg.read_bytes() == data


@pytest.mark.parametrize("grid", ["0.5,1.5", "0,0.5", "nan", "-0.2", "inf"])
def test_calibrate_refuses_thresholds_outside_0_1(grid, tmp_path, tiny_models, capsys):
    model = tmp_path / "m.kdseg.pt"
    model.write_bytes(Path(tiny_models["retina"]).read_bytes())
    before = model.read_bytes()
    code = main(["calibrate", "--model", str(model), "--data", str(tmp_path), f"--thresholds={grid}"])
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err)
    assert model.read_bytes() == before


def test_unusable_path_texts_are_bad_input_not_internal_errors(tmp_path, tiny_models, capsys):
    out = tmp_path / "o.seg.nrrd"
    for args in (["--input", "/x/" + "a" * 5000, "--output", str(out), "--model", str(tiny_models["retina"])],
                 ["--input", str(PHOTO), "--output", str(out), "--model", "m" * 5000],
                 ["--input", str(PHOTO), "--output", str(tmp_path / ("b" * 300 + ".seg.nrrd")),
                  "--model", str(tiny_models["retina"])]):
        code = main(["segment", "--task", "retina", *args])
        _, err = capsys.readouterr()
        assert code == 2, err
        _one_error_line(err)
        assert "internal error" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# --threads
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "", "1e3", "true"])
def test_bad_threads_exit_2_one_line(value, tmp_path, tiny_models, capsys):
    out = tmp_path / "o.seg.nrrd"
    code = main(["segment", "--task", "retina", "--input", str(PHOTO), "--output", str(out),
                 "--model", str(tiny_models["retina"]), f"--threads={value}"])
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err)
    assert not out.exists()


def test_bad_threads_end_to_end(tmp_path, tiny_models):
    out = tmp_path / "o.seg.nrrd"
    proc = _kdseg(["segment", "--task", "retina", "--input", PHOTO, "--output", out, "--model",
                   tiny_models["retina"], "--threads", "abc"], tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc.stderr)
    assert not out.exists()


def test_threads_over_the_cpu_count_are_capped_with_a_warning(tmp_path, tiny_models, capsys):
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "o.seg.nrrd"
        code = main(["segment", "--task", "retina", "--input", str(PHOTO), "--output", str(out),
                     "--model", str(tiny_models["retina"]), "--threads", "100000", "--progress", "none"])
        _, err = capsys.readouterr()
        assert code == 0, err
        assert torch.get_num_threads() <= available_cpus()
        assert "warning" in err and "100000" in err and out.exists()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# --model NAME
# ------------------------------------------------------------------------------------------------------------

def test_model_name_resolves_the_model_folder_before_the_current_directory(tmp_path, tiny_models, monkeypatch,
                                                                           capsys):
    user = tmp_path / "user-models"
    user.mkdir()
    (user / "mine.kdseg.pt").write_bytes(Path(tiny_models["retina"]).read_bytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "mine").write_bytes(b"planted")
    (cwd / "mine.kdseg.pt").write_bytes(b"planted")
    monkeypatch.setenv("KDSEG_USER_MODELS", str(user))
    monkeypatch.chdir(cwd)
    task = get_task("retina")
    assert resolve_model(task, "mine") == user / "mine.kdseg.pt"
    assert resolve_model(task, "mine.kdseg.pt") == user / "mine.kdseg.pt"
    assert resolve_model(task, "./mine.kdseg.pt") == Path("./mine.kdseg.pt")  # an explicit path stays a path
    shipped = resolve_model(task, "retina_student")
    assert shipped.parent.name == "Models" and shipped.is_file()
    out = tmp_path / "o.seg.nrrd"
    code = main(["segment", "--task", "retina", "--input", str(PHOTO), "--output", str(out), "--model", "mine",
                 "--progress", "none", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    assert out.exists()


# ------------------------------------------------------------------------------------------------------------
# kdseg serve
# ------------------------------------------------------------------------------------------------------------

def test_serve_survives_any_line_and_answers_each(tmp_path, tiny_models):
    good = {"command": "segment", "task": "retina", "input": str(PHOTO), "model": str(tiny_models["retina"])}
    long_path = "/nonexistent/" + "a" * 600_000
    ct = _ct(tmp_path / "ct.nrrd")
    ct_bytes = ct.read_bytes()
    lines = [
        b"[1, 2]", b"42", b'"text"', b"null", b"true",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": 3, "nested": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"id": 4, "command": "segment", "task": "retina\xff\xfe"}',
        b'{"id": 5, "command": "segment", "pad": "' + b"a" * 3_000_000 + b'"}',
        json.dumps({"id": 6, "command": "segment", "task": "retina", "input": long_path,
                    "output": str(tmp_path / "x.seg.nrrd")}).encode(),
        json.dumps({"id": 7, "command": "segment", "task": 5, "input": [1], "output": {}}).encode(),
        json.dumps({"id": 8, "command": "segment", "task": "retina", "input": str(PHOTO),
                    "output": str(tmp_path / "y.seg.nrrd"), "seed_ras": "abc"}).encode(),
        json.dumps({"id": 9, "command": ["segment"]}).encode(),
        json.dumps({"id": 10, "command": "segment", "task": "retina", "input": "a\u0000b",
                    "output": str(tmp_path / "z.seg.nrrd")}).encode(),
        json.dumps({"id": 11, "command": "segment", "task": "liver", "input": str(ct), "output": str(ct),
                    "model": str(tiny_models["liver"])}).encode(),
        json.dumps({"id": 10 ** 40, "command": "segment", "task": "retina", "input": str(PHOTO),
                    "output": str(tmp_path / "w.seg.nrrd"), "model": "m" * 100_000}).encode(),
        json.dumps(dict(good, id=12, output=str(tmp_path / "ok.seg.nrrd"))).encode(),
        b'{"command": "quit"}',
    ]
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "serve", "--threads", "1"],
                          input=b"\n".join(lines) + b"\n", capture_output=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(len(line) < 4000 for line in proc.stdout.splitlines())
    final = [(e.get("id"), e["event"]) for e in events if e["event"] in ("result", "error")]
    assert final == [(None, "error")] * 6 + [(3, "error"), (4, "error"), (5, "error"), (6, "error"), (7, "error"),
                                             (8, "error"), (9, "error"), (10, "error"), (11, "error"),
                                             (None, "error"), (12, "result")], final
    assert (tmp_path / "ok.seg.nrrd").exists() and ct.read_bytes() == ct_bytes
    assert "internal error" not in proc.stdout.decode()


_SIGNAL_DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {lib!r})
    import SimpleITK as sitk
    from KDSegmentationLib.cli import main as cli

    real_write = sitk.WriteImage

    def write_then_signal(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)  # the hidden temp file now exists beside the output
        os.kill(os.getpid(), signal.{sig})
        time.sleep(60)

    sitk.WriteImage = write_then_signal
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("mode", ["serve", "segment"])
def test_signal_during_a_request_gives_an_error_event_and_no_temp_file(sig, mode, tmp_path, tiny_models):
    driver = tmp_path / "driver.py"
    driver.write_text(_SIGNAL_DRIVER.format(lib=str(LIB_PARENT), sig=sig))
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "result.nii.gz"  # a labelmap: written through SimpleITK
    if mode == "serve":
        request = {"id": 77, "command": "segment", "task": "retina", "input": str(PHOTO), "output": str(out),
                   "model": str(tiny_models["retina"])}
        proc = subprocess.run([sys.executable, str(driver), "serve", "--threads", "1"],
                              input=json.dumps(request) + "\n", capture_output=True, text=True, env=_env(),
                              timeout=120)
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert any(e["event"] == "error" and e.get("id") == 77 and "cancel" in e["message"] for e in events), \
            proc.stdout
    else:
        proc = subprocess.run([sys.executable, str(driver), "segment", "--task", "retina", "--input", str(PHOTO),
                               "--output", str(out), "--model", str(tiny_models["retina"]), "--threads", "1",
                               "--progress", "json"], capture_output=True, text=True, env=_env(), timeout=120)
        _one_error_line(proc.stderr)
        assert json.loads(proc.stdout.splitlines()[-1])["event"] == "error"
    assert proc.returncode == 128 + getattr(signal, sig), (proc.returncode, proc.stderr[-2000:])
    assert list(outdir.iterdir()) == []
