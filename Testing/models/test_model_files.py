"""Model files whose header was changed and re-saved with a fresh (keyless) checksum: every such header is refused
with one line and exit code 2 before any network is built, and one bad file never hides the others in the model
list."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LIB_PARENT, REPO, save_tiny_student
from KDSegmentationLib.cli.main import main
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.files import _digest, load_model, read_header

SAMPLES = REPO / "Resources" / "Samples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for task in ("retina", "liver"):
        pre = {"retina": {"task": "retina", "input_kind": "2d-rgb", "spatial_dims": 2, "fov_diameter_px": 540.0,
                          "decision_threshold": 0.5},
               "liver": {"task": "liver", "input_kind": "3d-ct", "spatial_dims": 3, "spacing_mm": [3.0, 3.0, 3.0],
                         "hu_window": [-200.0, 300.0]}}[task]
        paths[task] = save_tiny_student(task, folder / f"{task}_tiny.kdseg.pt", preprocessing=pre, labels={
            1: "Retinal vessels"} if task == "retina" else {1: "Liver", 2: "Liver tumor"})
    return paths


def resave(src: Path, dst: Path, edit=None, header_text: str = None) -> Path:
    """What anyone can do: load, change the header, recompute the checksum (it has no key), save."""
    raw = torch.load(str(src), map_location="cpu", weights_only=True)
    if header_text is None:
        header = json.loads(raw["header"])
        edit(header)
        header_text = json.dumps(header)
    raw["header"] = header_text
    raw["sha256"] = _digest(header_text, raw["state_dict"])
    torch.save(raw, str(dst))
    return dst


def _set(path, value):
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


BAD_HEADERS = {
    "threshold_nan": ("retina", _set(["preprocessing", "decision_threshold"], float("nan"))),
    "threshold_inf": ("retina", _set(["preprocessing", "decision_threshold"], float("inf"))),
    "threshold_2": ("retina", _set(["preprocessing", "decision_threshold"], 2)),
    "threshold_-1": ("retina", _set(["preprocessing", "decision_threshold"], -1)),
    "threshold_0": ("retina", _set(["preprocessing", "decision_threshold"], 0)),
    "threshold_1": ("retina", _set(["preprocessing", "decision_threshold"], 1.0)),
    "threshold_text": ("retina", _set(["preprocessing", "decision_threshold"], "0.5")),
    "threshold_bool": ("retina", _set(["preprocessing", "decision_threshold"], True)),
    "task_unknown": ("retina", _set(["task"], "retina2")),
    "task_not_text": ("retina", _set(["task"], ["retina"])),
    "task_swapped": ("retina", _set(["task"], "lung_nodule")),  # 3 input channels for a 2-channel task
    "task_swapped_3d": ("retina", _set(["task"], "liver")),
    "arch_unknown": ("retina", _set(["arch"], "resnet9000")),
    "arch_args_not_object": ("retina", _set(["arch_args"], [1, 2])),
    "arch_arg_unknown": ("retina", _set(["arch_args", "evil"], 1)),
    "width_huge": ("retina", _set(["arch_args", "width"], 10 ** 9)),
    "width_text": ("retina", _set(["arch_args", "width"], "4")),
    "width_bool": ("retina", _set(["arch_args", "width"], True)),
    "depth_huge": ("retina", _set(["arch_args", "depth"], 10 ** 6)),
    "blocks_huge": ("retina", _set(["arch_args", "blocks"], 10 ** 6)),
    "channels_long": ("retina", _set(["arch_args", "channels"], [4] * 100000)),
    "expansion_nan": ("retina", _set(["arch_args", "expansion"], float("nan"))),
    "too_many_parameters": ("retina", _set(["arch_args", "width"], 1024)),  # each value in range, total is not
    "teacher_filters_huge": ("retina", lambda h: (h.update(arch="teacher_unet"),
                                                  h["arch_args"].clear(),
                                                  h["arch_args"].update(spatial_dims=2, in_channels=3, out_channels=2,
                                                                        filters=[1024] * 7))),
    "spatial_dims_changed": ("retina", _set(["arch_args", "spatial_dims"], 3)),
    "out_channels_changed": ("liver", _set(["arch_args", "out_channels"], 2)),
    "spacing_changed": ("liver", _set(["preprocessing", "spacing_mm"], [1.0, 1.0, 1.0])),
    "window_changed": ("liver", _set(["preprocessing", "hu_window"], [-1000.0, 1000.0])),
    "fov_changed": ("retina", _set(["preprocessing", "fov_diameter_px"], 100.0)),
    "preprocessing_task_changed": ("retina", _set(["preprocessing", "task"], "liver")),
    "preprocessing_not_object": ("retina", _set(["preprocessing"], "fast")),
    "labels_changed": ("liver", _set(["labels"], {"1": "Liver"})),
    "card_not_object": ("retina", _set(["card"], [1])),
    "role_not_text": ("retina", _set(["role"], {"x": 1})),
}
RAW_HEADERS = {
    "not_json": ("retina", "{not json"),
    "json_list": ("retina", "[1, 2, 3]"),
    "json_number": ("retina", "7"),
    "deeply_nested": ("retina", "[" * 200000 + "]" * 200000),
}


def _assert_one_line(message: str):
    assert "\n" not in message and len(message) < 600, message


@pytest.mark.parametrize("case", sorted(BAD_HEADERS) + sorted(RAW_HEADERS))
def test_crafted_header_is_refused_with_one_line(case, tiny, tmp_path):
    dst = tmp_path / f"{case}.kdseg.pt"
    if case in BAD_HEADERS:
        task, edit = BAD_HEADERS[case]
        resave(tiny[task], dst, edit)
    else:
        task, text = RAW_HEADERS[case]
        resave(tiny[task], dst, header_text=text)
    for loader in (read_header, load_model):
        with pytest.raises(InputError) as info:
            loader(dst)
        _assert_one_line(str(info.value))


def test_valid_headers_still_load(tiny):
    for path in tiny.values():
        assert load_model(path).network is not None
    for path in sorted((REPO / "Resources" / "Models").glob("*.kdseg.pt")):
        assert read_header(path)["task"]


def test_malformed_container_is_refused(tiny, tmp_path):
    raw = torch.load(str(tiny["retina"]), map_location="cpu", weights_only=True)
    for name, change in {"header_bytes": {"header": 5}, "state_list": {"state_dict": [1]},
                         "state_values": {"state_dict": {"a": 1}}, "sha_number": {"sha256": 3}}.items():
        dst = tmp_path / f"{name}.kdseg.pt"
        torch.save(dict(raw, **change), str(dst))
        with pytest.raises(InputError) as info:
            read_header(dst)
        _assert_one_line(str(info.value))


def _cli(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT), KDSEG_USER_MODELS=str(tmp_path / "user-models"))
    return subprocess.run([sys.executable, "-m", "KDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(tmp_path))


@pytest.mark.parametrize("case", ["threshold_2", "task_swapped"])
def test_crafted_model_end_to_end_exit_2_one_line_no_output(case, tiny, tmp_path):
    task, edit = BAD_HEADERS[case]
    model = resave(tiny[task], tmp_path / "crafted.kdseg.pt", edit)
    target = "lung_nodule" if case == "task_swapped" else "retina"
    out = tmp_path / "out.seg.nrrd"
    args = ["segment", "--task", target, "--model", model, "--output", out, "--threads", "1"]
    if target == "retina":
        args += ["--input", SAMPLES / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"]
    else:
        sample = json.loads((SAMPLES / "lung_nodule" / "sample.json").read_text())
        args += ["--input", SAMPLES / "lung_nodule" / sample["file"],
                 "--seed-ras=" + ",".join(str(v) for v in sample["seed_ras"])]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_one_bad_file_never_hides_the_others(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "user-models"
    folder.mkdir()
    good = folder / "good.kdseg.pt"
    good.write_bytes(Path(tiny["retina"]).read_bytes())
    resave(tiny["retina"], folder / "bad_threshold.kdseg.pt", BAD_HEADERS["threshold_nan"][1])
    resave(tiny["retina"], folder / "nested.kdseg.pt", header_text=RAW_HEADERS["deeply_nested"][1])
    (folder / "garbage.kdseg.pt").write_bytes(b"\x00" * 100)
    torch.save([1, 2, 3], str(folder / "a_list.kdseg.pt"))
    monkeypatch.setenv("KDSEG_USER_MODELS", str(folder))

    assert main(["models", "list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out) if e["source"] == "local"}
    assert set(entries) == {"good", "bad_threshold", "nested", "garbage", "a_list"}
    assert "error" not in entries["good"] and entries["good"]["task"] == "retina"
    for name in ("bad_threshold", "nested", "garbage", "a_list"):
        _assert_one_line(entries[name]["error"])

    assert main(["models", "list"]) == 0
    text = capsys.readouterr().out
    assert "good" in text and "bad_threshold" in text and "unusable" in text

    assert main(["models", "show", "bad_threshold"]) == 0
    assert "decision_threshold" in json.loads(capsys.readouterr().out)["error"]


def test_non_finite_weights_are_refused(tiny, tmp_path):
    raw = torch.load(str(tiny["retina"]), map_location="cpu", weights_only=True)
    name = next(k for k, v in raw["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    raw["state_dict"][name] = raw["state_dict"][name].clone()
    raw["state_dict"][name].view(-1)[0] = float("nan")
    raw["sha256"] = _digest(raw["header"], raw["state_dict"])
    dst = tmp_path / "nan.kdseg.pt"
    torch.save(raw, str(dst))
    with pytest.raises(InputError) as info:
        load_model(dst)
    assert "non-finite" in str(info.value)
    _assert_one_line(str(info.value))


def test_the_panel_lists_an_unusable_model_with_its_error(tiny, tmp_path, monkeypatch):
    from KDSegmentationLib.client import models as client_models
    from KDSegmentationLib.models.catalog import list_models

    folder = tmp_path / "user-models"
    folder.mkdir()
    (folder / "good.kdseg.pt").write_bytes(Path(tiny["retina"]).read_bytes())
    resave(tiny["retina"], folder / "bad.kdseg.pt", BAD_HEADERS["threshold_2"][1])
    monkeypatch.setenv("KDSEG_USER_MODELS", str(folder))
    entries = {e["name"]: e for e in list_models() if e["source"] == "local"}
    assert "unusable" in client_models.model_label(entries["bad"])
    assert "decision_threshold" in client_models.model_card_text(entries["bad"])
    choices = [value for _, value in client_models.model_choices(entries.values(), "retina")]
    assert str(folder / "good.kdseg.pt") in choices and str(folder / "bad.kdseg.pt") not in choices
