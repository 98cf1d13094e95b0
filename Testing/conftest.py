"""Shared fixtures. Real-data tests use ../shared/data beside the checkout and skip with a reason when it is absent."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB_PARENT = REPO / "KDSegmentation"
if str(LIB_PARENT) not in sys.path:
    sys.path.insert(0, str(LIB_PARENT))

SHARED_DATA = Path(os.environ.get("KDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _private_folder(variable: str, folder: Path):
    """Point ``variable`` at ``folder`` for the session, then restore it."""
    previous = os.environ.get(variable)
    os.environ[variable] = str(folder)
    yield
    if previous is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = previous


@pytest.fixture(scope="session", autouse=True)
def private_dataset_cache(tmp_path_factory):
    """Datasets prepared by the tests go to a temporary folder, never into the user's cache (each test's data
    folder is new, so every run would leave another prepared copy there)."""
    yield from _private_folder("KDSEG_CACHE", tmp_path_factory.mktemp("dataset-cache"))


@pytest.fixture(scope="session", autouse=True)
def private_compiled_models(tmp_path_factory):
    """Models compiled for ONNX Runtime by the tests go to a temporary folder, never into the user's cache."""
    yield from _private_folder("KDSEG_COMPILED", tmp_path_factory.mktemp("compiled-models"))


def save_tiny_student(task: str, path, **save_options) -> Path:
    """A student of ``task``'s shipped architecture at width 4 with random weights (seed with torch.manual_seed
    first), saved as a model file: enough to run every stage of a pipeline in a test."""
    from KDSegmentationLib.models.files import save_model
    from KDSegmentationLib.models.networks import build_network, default_arch_args

    arch, args = default_arch_args(task, "student")
    args = dict(args, width=4)
    return save_model(path, build_network(arch, **args), arch=arch, arch_args=args, task=task, role="student",
                      **save_options)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real-data folder; skips the test when it is not present (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: with one thread no OpenMP synchronisation is needed, which otherwise costs tens of milliseconds
    per operation when other processes busy the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
