"""Bad inputs across the three tasks and the input formats: each is refused with one line (or accepted with a
warning where it is usable), and the input is never changed.

The bad files are made here, in the test's temporary folder. Most rows call imageio directly; a few run
``kdseg segment`` end to end and check the exit code, the single stderr line, and that no output was written.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import LIB_PARENT
from KDSegmentationLib import tasks
from KDSegmentationLib.io import images as imageio
from KDSegmentationLib.io import suitability
from KDSegmentationLib.errors import InputError

TASKS = {"liver": tasks.LIVER, "lung_nodule": tasks.LUNG_NODULE, "retina": tasks.RETINA}
VOLUMES = (".nii.gz", ".nii", ".nrrd", ".mha")
PHOTOS = (".png", ".jpg")


# -- makers ------------------------------------------------------------------------------------------------------------
def _ct_array(shape=(12, 20, 24), dtype=np.int16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.uniform(-1000, 1200, size=shape).astype(dtype)
    arr[0, 0, 0], arr[-1, -1, -1] = -1000, 1200  # the last voxel is not 0: a cut file is told by its trailer
    return arr


def _ct(spacing=(0.8, 0.8, 2.5), direction=None, arr=None) -> sitk.Image:
    img = sitk.GetImageFromArray(_ct_array() if arr is None else arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 20.0, -300.0))
    if direction is not None:
        img.SetDirection(direction)
    return img


def _write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path), useCompression=path.suffix in (".nrrd", ".mha"))
    return path


def _photo(path: Path, mode="RGB", size=(300, 300)) -> Path:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode == "L":
        im = im.convert("L")
    im.save(path)
    return path


def _truncate(path: Path, keep=0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def _nifti_patch(path: Path, **fields) -> Path:
    """Rewrite fields of a NIfTI-1 header (.nii or .nii.gz) in place: pixdim, sform rows, qform/sform codes."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    if "pixdim" in fields:
        struct.pack_into("<8f", data, 76, *fields["pixdim"])
    if "codes" in fields:
        struct.pack_into("<hh", data, 252, *fields["codes"])
    for i, row in enumerate(fields.get("srows", ())):
        struct.pack_into("<4f", data, 280 + 16 * i, *row)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


def _dicom_series(folder: Path, n=12, spacing_z=2.0, skip=(), duplicate=None, iop="1\\0\\0\\0\\1\\0",
                  hu=True, size=(24, 20), extra=()) -> Path:
    """CT-like series of int16 slices; ``skip`` leaves out slice numbers, ``duplicate`` repeats one position,
    ``extra`` adds (z, orientation) slices after the regular ones."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(2)
    zs = [(i * spacing_z, iop) for i in range(n) if i not in skip]
    if duplicate is not None:
        zs.append((duplicate * spacing_z, iop))
    zs += list(extra)
    for i, (z, orientation) in enumerate(zs):
        arr = rng.uniform(-1000, 1200, size=(1, size[1], size[0])) if hu else np.full((1, size[1], size[0]), 7)
        sl = sitk.GetImageFromArray(arr.astype(np.int16))
        sl.SetSpacing((0.7, 0.7, spacing_z))
        sl.SetOrigin((-5.0, -6.0, float(z)))
        for key, val in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.77.1",
                         "0020|000d": "1.2.826.0.1.3680043.2.1125.77.0", "0020|0013": str(i + 1),
                         "0020|0032": f"-5\\-6\\{z}", "0020|0037": orientation,
                         "0008|0018": f"1.2.826.0.1.3680043.2.1125.77.2.{i + 1}"}.items():
            sl.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, with almost no data (what a decompression bomb starts as)."""
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _make(kind: str, fmt: str, tmp: Path) -> Path:
    """One input of ``kind`` in format ``fmt`` (a volume suffix, 'dicom', '.png', '.jpg', ...)."""
    if fmt == "dicom":
        folder = tmp / "dicom"
        if kind == "ok":
            return _dicom_series(folder)
        if kind == "missing slice":
            return _dicom_series(folder, skip=(5,))
        if kind == "missing last but one":
            return _dicom_series(folder, skip=(10,))
        if kind == "unreadable slice":
            _dicom_series(folder)
            return _truncate(folder / "slice006.dcm", keep=0.8).parent
        if kind == "duplicate slice":
            return _dicom_series(folder, duplicate=4)
        if kind == "sheared":
            # GDCM writes only orthogonal orientations: shear the column direction in the written files
            _dicom_series(folder)
            for f in folder.iterdir():
                data = f.read_bytes()
                assert b"1\\0\\0\\0\\1\\0 " in data
                f.write_bytes(data.replace(b"1\\0\\0\\0\\1\\0 ", b"1\\0\\0\\.5\\1\\0"))
            return folder
        if kind == "fifo inside":
            _dicom_series(folder)
            os.mkfifo(folder / "slice999.dcm")
            return folder
        if kind == "ct slice":
            _dicom_series(folder, n=1)
            return folder / "slice000.dcm"
        raise KeyError(kind)
    path = tmp / f"input{fmt}"
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if fmt in PHOTOS:
        if kind == "ok":
            return _photo(path)
        if kind == "grey":
            return _photo(path, "L")
        if kind == "truncated":
            return _truncate(_photo(path), keep=0.5)
        if kind == "bomb":
            return _huge_png(path.with_suffix(".png"), 20000, 20000)
        if kind == "bomb warning":
            return _huge_png(path.with_suffix(".png"), 10000, 10000)
        if kind == "16-bit":
            Image.fromarray((_ct_array((1, 300, 300))[0] + 1024).astype(np.uint16)).save(path.with_suffix(".png"))
            return path.with_suffix(".png")
        raise KeyError(kind)
    if fmt == ".tif":
        arr = np.random.default_rng(3).uniform(0, 1, (300, 300)).astype(np.float32)
        if kind == "nan":
            arr[5, 5] = np.nan
        Image.fromarray(arr, "F").save(path)
        return path
    # volumes
    if kind == "ok":
        return _write(_ct(), path)
    if kind == "truncated":
        return _truncate(_write(_ct(), path))
    if kind == "nan":
        arr = _ct_array(dtype=np.float32)
        arr[3, 4, 5], arr[4, 5, 6] = np.nan, np.inf
        return _write(_ct(arr=arr), path)
    if kind == "sheared":
        if fmt.startswith(".nii"):  # ITK's NIfTI writer straightens directions: shear the header's sform
            return _nifti_patch(_write(_ct(), path), codes=(0, 1), srows=[(-0.8, 0.4, 0, 10), (0, -0.8, 0, -20),
                                                                          (0, 0, 2.5, -300)])
        return _write(_ct(direction=(1, 0.5, 0, 0, 1, 0, 0, 0, 1)), path)
    if kind == "micrometre spacing":
        return _write(_ct(spacing=(0.001, 0.001, 0.002)), path)
    if kind == "huge spacing":
        return _write(_ct(spacing=(0.8, 0.8, 80.0)), path)
    if kind == "coarse slices":
        return _write(_ct(spacing=(0.8, 0.8, 12.0)), path)
    if kind == "nan spacing":
        return _nifti_patch(_write(_ct(), path), codes=(0, 1), srows=[(-0.8, 0, 0, 10), (0, -0.8, 0, -20),
                                                                      (0, 0, float("nan"), -300)])
    if kind == "ct slice":
        return _write(_ct(arr=_ct_array((1, 300, 300))), path)
    if kind == "grey slice":
        return _write(sitk.GetImageFromArray(np.random.default_rng(4).integers(0, 256, (1, 300, 300), np.uint8)),
                      path)
    raise KeyError(kind)


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*"))
                                       if p.is_file())).hexdigest()
    if not path.is_file():
        return "special"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_and_check(path: Path, task, timeout=60.0):
    """read_image + check_image_for_task in a thread, so that an input that blocks fails the test instead of hanging
    it. Returns (warnings, error)."""
    out = {}

    def run():
        warnings = []
        try:
            img = imageio.read_image(path, warn=warnings.append)
            warnings += suitability.check_image_for_task(img, task)
            out["result"] = (warnings, None)
        except InputError as exc:
            out["result"] = (warnings, exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert "result" in out, f"reading {path.name} did not finish within {timeout:.0f} s"
    return out["result"]


# -- the table ---------------------------------------------------------------------------------------------------------
CT_ROWS = (
    [(fmt, "ok", None) for fmt in VOLUMES + ("dicom",)]
    + [(fmt, "truncated", "truncated|unreadable or corrupt") for fmt in VOLUMES]
    + [(fmt, "nan", "NaN or infinite") for fmt in VOLUMES]
    + [(fmt, "sheared", "sheared|orthonormal") for fmt in VOLUMES]
    + [(fmt, "micrometre spacing", "not plausible for CT") for fmt in VOLUMES]
    + [(fmt, "huge spacing", "not plausible for CT") for fmt in VOLUMES]
    + [(fmt, "coarse slices", "warn:coarse") for fmt in VOLUMES]
    + [(fmt, "fifo", "named pipe") for fmt in VOLUMES + (".dcm",)]
    + [(".nii", "nan spacing", "spacing|unreadable or corrupt"),
       ("dicom", "missing slice", r"incomplete: 1 slice\(s\) missing between 8.00 mm \(slice004.dcm\) and "
                                  r"12.00 mm \(slice005.dcm\)"),
       ("dicom", "missing last but one", r"incomplete: 1 slice\(s\) missing between 18.00 mm"),
       ("dicom", "unreadable slice", "slice006.dcm"),
       ("dicom", "duplicate slice", "same position"),
       ("dicom", "sheared", "sheared|orthonormal"),
       ("dicom", "fifo inside", "slice999.dcm .*named pipe"),
       (".png", "ok", "2D image"),
       (".jpg", "ok", "2D image")]
)
RETINA_ROWS = (
    [(fmt, "ok", None) for fmt in PHOTOS]
    + [(fmt, "grey", "warn:greyscale") for fmt in PHOTOS]
    + [(fmt, "truncated", "unreadable or corrupt") for fmt in PHOTOS]
    + [(fmt, "fifo", "named pipe") for fmt in PHOTOS]
    + [(".png", "bomb", "decompression bomb"), (".png", "bomb warning", "decompression bomb"),
       (".png", "16-bit", "single-channel 16-bit"), (".tif", "ok", "single-channel 16-bit or floating-point"),
       (".tif", "nan", "NaN or infinite")]
    + [(fmt, "ct slice", "needs a colour fundus photograph.*single-channel") for fmt in VOLUMES]
    + [(fmt, "grey slice", "warn:greyscale") for fmt in (".nrrd", ".mha")]
    + [("dicom", "ct slice", "single-channel"), ("dicom", "ok", "3D volume")]
)
ROWS = ([(task, *row) for task in ("liver", "lung_nodule") for row in CT_ROWS]
        + [("retina", *row) for row in RETINA_ROWS])


@pytest.mark.parametrize("task,fmt,kind,expect", ROWS, ids=[f"{t}-{f.strip('.')}-{k}" for t, f, k, _e in ROWS])
def test_bad_input_table(tmp_path, task, fmt, kind, expect):
    path = _make(kind, fmt, tmp_path)
    before = _digest(path)
    warnings, error = _read_and_check(path, TASKS[task])
    assert _digest(path) == before, "the input was changed"
    if expect is None:
        assert error is None, str(error)
        assert warnings == []
    elif expect.startswith("warn:"):
        assert error is None, str(error)
        assert any(re.search(expect[5:], w) for w in warnings), warnings
    else:
        assert error is not None, f"{kind} {fmt} was accepted for {task} (warnings: {warnings})"
        message = str(error)
        assert "\n" not in message and len(message) < 600
        assert re.search(expect, message), message


def test_header_checked_before_voxels(tmp_path):
    """A header announcing a huge volume is refused from the header alone: its voxel file holds only 4 bytes."""
    (tmp_path / "tiny.raw").write_bytes(b"\0" * 4)
    nhdr = tmp_path / "huge.nhdr"
    nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4000 4000 4000\nendian: little\nencoding: raw\n"
                    "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\ndata file: tiny.raw\n")
    with pytest.raises(InputError, match=r"too large \(64,000,000,000 voxels"):
        imageio.read_image(nhdr)
    small = _write(_ct(), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="too large"):
        imageio.read_image(small, max_voxels=1000)
    with pytest.raises(InputError, match="too large"):
        imageio.read_image(_dicom_series(tmp_path / "dicom"), max_voxels=1000)
    with pytest.raises(InputError, match="too large"):
        imageio.read_image(_photo(tmp_path / "p.png"), max_voxels=1000)


def test_detached_voxel_file_must_be_regular(tmp_path):
    os.mkfifo(tmp_path / "voxels.raw")
    mhd = tmp_path / "ct.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                   "ElementDataFile = voxels.raw\n")
    warnings, error = _read_and_check(mhd, tasks.LIVER, timeout=30)
    assert error is not None and "named pipe" in str(error)


def test_device_refused_at_once():
    warnings, error = _read_and_check(Path("/dev/zero"), tasks.LIVER, timeout=30)
    assert error is not None and "device" in str(error)


def test_nifti_zero_last_voxel_still_complete(tmp_path):
    """The slow path (no trust in the trailer) accepts a complete file whose last voxel is 0 and refuses a cut one."""
    arr = _ct_array()
    arr[-1, -1, -1] = 0
    path = _write(_ct(arr=arr), tmp_path / "ct.nii.gz")
    img = imageio.read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    _truncate(path, keep=0.97)
    with pytest.raises(InputError, match="truncated|unreadable"):
        imageio.read_image(path)


def test_multimember_gzip_nifti_is_read(tmp_path):
    """bgzip-style files (several gzip members) are complete NIfTI files too."""
    plain = _write(_ct(), tmp_path / "ct.nii")
    data = plain.read_bytes()
    cut = len(data) // 3
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]) + gzip.compress(b""))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_image(path)), _ct_array())


def test_float_nifti_with_zeros_but_finite_is_accepted(tmp_path):
    arr = _ct_array(dtype=np.float32)
    arr[2, 3, 4] = 0.0
    for ext in (".nii.gz", ".nii"):
        img = imageio.read_image(_write(_ct(arr=arr), tmp_path / f"f{ext}"))
        assert suitability.check_image_for_task(img, tasks.LIVER) == []


def test_dicom_stray_and_localiser_still_left_out_with_warning(tmp_path):
    folder = _dicom_series(tmp_path / "s", n=10, extra=[(80.0, "1\\0\\0\\0\\1\\0"), (5.0, "1\\0\\0\\0\\0\\-1")])
    warnings = []
    img = imageio.read_image(folder, warn=warnings.append)
    assert img.GetSize() == (24, 20, 10)
    assert len(warnings) == 1 and "left out 2 DICOM slice(s)" in warnings[0], warnings
    assert "slice010.dcm" in warnings[0] and "slice011.dcm" in warnings[0]
    # a slice off the grid inside the range is left out too, but a gap is not
    folder = _dicom_series(tmp_path / "t", n=10, extra=[(7.0, "1\\0\\0\\0\\1\\0")])
    warnings = []
    assert imageio.read_image(folder, warn=warnings.append).GetSize() == (24, 20, 10)
    assert len(warnings) == 1 and "slice010.dcm" in warnings[0]


# -- end to end --------------------------------------------------------------------------------------------------------
def _kdseg(tmp_path: Path, task: str, inp: Path, timeout=120):
    out = tmp_path / "out" / "result.seg.nrrd"
    out.parent.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "KDSegmentationLib", "segment", "--task", task, "--input", str(inp),
            "--output", str(out)]
    if task == "lung_nodule":
        args += ["--seed-ras", "0,0,0"]
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
    env.pop("KDSEG_DEBUG", None)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    return proc, out


E2E = [("liver", ".nii.gz", "truncated"), ("liver", ".nii", "nan"), ("lung_nodule", "dicom", "missing slice"),
       ("liver", ".nrrd", "fifo"), ("retina", ".nrrd", "ct slice"), ("lung_nodule", ".mha", "sheared"),
       # library output: VNL/ITK print on stderr for a NaN sform, Pillow warns about the bomb-sized header
       ("liver", ".nii", "nan spacing"), ("retina", ".png", "bomb warning")]


@pytest.mark.parametrize("task,fmt,kind", E2E, ids=[f"{t}-{f.strip('.')}-{k}" for t, f, k in E2E])
def test_kdseg_segment_refuses_with_one_line(tmp_path, task, fmt, kind):
    (tmp_path / "in").mkdir()
    inp = _make(kind, fmt, tmp_path / "in")
    before = _digest(inp)
    proc, out = _kdseg(tmp_path, task, inp)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdseg: error: "), proc.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert _digest(inp) == before
