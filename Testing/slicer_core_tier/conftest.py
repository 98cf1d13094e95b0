"""Fixtures of the real-Slicer-core tier: the module file imported as Slicer imports it, on a real MRML scene.

Skips with a reason when ``slicer-core`` is not installed or ``../shared/slicer-5.12`` (Slicer's pure-Python files,
used as fixtures) is absent.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULE_DIR = REPO / "KDSegmentation"
SAMPLES_DIR = REPO / "Resources" / "Samples"

from . import slicer_standins


@pytest.fixture(scope="session")
def slicer_core(tmp_path_factory):
    """``slicer`` with the stand-ins installed (the wheel's real MRML and logics underneath)."""
    pytest.importorskip("slicer_core", reason="slicer-core (pip install slicer-core==5.12.4.0) is not installed")
    if not slicer_standins.SLICER_PYTHON.is_dir():
        pytest.skip(f"Slicer's pure-Python files not available at {slicer_standins.SLICER_FILES}")
    return slicer_standins.install(str(tmp_path_factory.mktemp("slicer-temp")))


@pytest.fixture(scope="session")
def kdseg_module(slicer_core):
    """``KDSegmentation.py`` imported the way Slicer loads a scripted module: its folder on the path, by name."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return importlib.import_module("KDSegmentation")


@pytest.fixture
def scene(slicer_core, kdseg_module, tmp_path):
    """A fresh real ``vtkMRMLScene`` (and logics) for each test, as ``slicer.mrmlScene``, after Slicer's start-up:
    the module constructed and its ``startupCompleted`` hooks run."""
    import types

    slicer_standins.new_scene(slicer_core, str(tmp_path))
    kdseg_module.KDSegmentation(types.SimpleNamespace(path=kdseg_module.__file__))
    slicer_core.app.completeStartup()
    yield slicer_core.mrmlScene
    slicer_core.mrmlScene.Clear(True)


@pytest.fixture
def vtk_messages():
    """Errors and warnings that VTK/MRML classes log while the test runs (as Slicer's error log would show them)."""
    import vtk

    window = vtk.vtkStringOutputWindow()
    previous = vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(window)
    yield window.GetOutput
    vtk.vtkOutputWindow.SetInstance(previous)


def find_sample(task: str) -> dict:
    from KDSegmentationLib.client import find_samples

    return next(s for s in find_samples(SAMPLES_DIR) if s["task"] == task)


def cli_labelmap(sample: dict, output: Path, model: str = "student"):
    """The labelmap ``kdseg segment`` writes for the sample, as a (z, y, x) array."""
    import SimpleITK as sitk
    from KDSegmentationLib.client import segment_command
    from KDSegmentationLib.client.process import engine_env

    command = segment_command(sys.executable, sample["task"], sample["path"], output, model=model,
                              device="cpu", seed_ras=sample.get("seed_ras"), threads=2)
    command.remove("--progress")
    command.remove("json")
    subprocess.run(command, env=engine_env(), check=True, capture_output=True, timeout=300)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
