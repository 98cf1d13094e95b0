"""Reading images with their geometry, and refusing inputs that do not suit a task."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import require
from KDSegmentationLib import tasks
from KDSegmentationLib.io import images as imageio
from KDSegmentationLib.io import suitability
from KDSegmentationLib.errors import InputError


def _ct(size=(24, 20, 12), spacing=(0.8, 0.8, 2.5), lo=-1000.0, hi=1200.0, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = rng.uniform(lo, hi, size=size[::-1]).astype(np.int16)
    arr.flat[0], arr.flat[1] = int(lo), int(hi)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 20.0, -300.0))
    return img


# -- reading -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha", ".mhd"])
def test_volume_formats_keep_geometry(tmp_path, ext):
    img = _ct()
    # an oblique, flipped direction must survive every format (NIfTI stores it as an affine)
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    path = tmp_path / f"ct{ext}"
    sitk.WriteImage(img, str(path))
    back = imageio.read_image(path)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


@pytest.mark.parametrize("ext,mode", [(".png", "RGBA"), (".jpg", "RGB"), (".tif", "RGB"), (".ppm", "RGB"),
                                      (".gif", "P"), (".png", "L"), (".tiff", "I;16")])
def test_photos_become_rgb_uint8(tmp_path, ext, mode):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([rgb, np.full((30, 40), 7, np.uint8)]), "RGBA")
    elif mode == "L":
        im = Image.fromarray(rgb[..., 0], "L")
    elif mode == "I;16":
        im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)
    elif mode == "P":
        im = Image.fromarray(rgb).convert("P")
    else:
        im = Image.fromarray(rgb)
    path = tmp_path / f"photo{ext}"
    im.save(path)
    img = imageio.read_image(path)
    assert img.GetDimension() == 2
    assert img.GetSize() == (40, 30)
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert img.GetPixelID() == sitk.sitkVectorUInt8
    arr = imageio.photo_to_array(img)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    if mode in ("RGBA", "RGB") and ext != ".jpg":
        np.testing.assert_array_equal(arr, rgb)  # alpha dropped, colours untouched
    if mode in ("L", "I;16"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        assert arr.max() >= 250  # 16-bit was scaled, not clipped or truncated


def test_photo_array_round_trip_and_single_slice_volume():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    img = imageio.array_to_photo(rgb)
    np.testing.assert_array_equal(imageio.photo_to_array(img), rgb)
    # Slicer saves a photo as a single-slice 3D RGB volume: it must read the same and keep its geometry
    vol = sitk.JoinSeries([img])
    vol.SetOrigin((3.0, 4.0, 0.0))
    np.testing.assert_array_equal(imageio.photo_to_array(vol), rgb)
    lab = imageio.array_to_photo(np.ones((4, 5), np.uint8), reference=vol)
    assert lab.GetSize() == (5, 4, 1) and lab.GetOrigin() == (3.0, 4.0, 0.0)
    with pytest.raises(ValueError):
        imageio.array_to_photo(np.ones((3, 5), np.uint8), reference=vol)


def test_missing_corrupt_and_unsupported_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        imageio.read_image(tmp_path / "nope.nrrd")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a gzip stream")
    with pytest.raises(InputError, match="unreadable or corrupt"):
        imageio.read_image(bad)
    badpng = tmp_path / "broken.png"
    badpng.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="unreadable or corrupt"):
        imageio.read_image(badpng)
    other = tmp_path / "notes.docx"
    other.write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        imageio.read_image(other)
    empty_dir = tmp_path / "dicom"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        imageio.read_image(empty_dir)


def test_messages_are_one_line(tmp_path):
    bad = tmp_path / "broken.mha"
    bad.write_text("ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_SHORT\nElementDataFile = x\n")
    with pytest.raises(InputError) as info:
        imageio.read_image(bad)
    assert "\n" not in str(info.value)


def _write_dicom_series(folder, n=6, spacing_z=2.0, stray_at=None):
    """Synthetic CT series; ``stray_at`` adds one extra slice at that z position (mm)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    zs = [i * spacing_z for i in range(n)] + ([stray_at] if stray_at is not None else [])
    for i, z in enumerate(zs):
        sl = sitk.GetImageFromArray((np.full((1, 8, 10), -1000 + 10 * i)).astype(np.int16))
        sl.SetSpacing((0.7, 0.7, spacing_z))
        sl.SetOrigin((-5.0, -6.0, float(z)))
        for key, val in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.99.1",
                         "0020|000d": "1.2.826.0.1.3680043.2.1125.99.0", "0020|0013": str(i + 1),
                         "0020|0032": f"-5\\-6\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0",
                         "0008|0018": f"1.2.826.0.1.3680043.2.1125.99.2.{i + 1}"}.items():
            sl.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_with_stray_slice(tmp_path):
    _write_dicom_series(tmp_path / "series" / "sub", n=6, spacing_z=2.0, stray_at=70.0)
    warnings = []
    img = imageio.read_image(tmp_path / "series", warn=warnings.append)
    assert img.GetSize() == (10, 8, 6)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.7, 2.0), atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), (-5.0, -6.0, 0.0), atol=1e-4)
    assert len(warnings) == 1
    assert "off the regular slice grid" in warnings[0] and "slice006.dcm" in warnings[0]
    # a single DICOM file also reads
    one = imageio.read_image(tmp_path / "series" / "sub" / "slice000.dcm")
    assert one.GetSize()[:2] == (10, 8)


def test_real_dicom_series_matches_reference_grid(shared_data):
    case = require(shared_data / "liver" / "RadCTTACEomics" / "RadCTTACEomics_0697")
    warnings = []
    img = imageio.read_image(case / "dicom", warn=warnings.append)
    ref = sitk.ReadImage(str(case / "liver.nii.gz"))
    assert img.GetSize() == ref.GetSize() == (512, 512, 44)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert len(warnings) == 1 and "dicom-00001.dcm" in warnings[0]
    assert suitability.check_image_for_task(img, tasks.LIVER) == []


# -- checks against a task ---------------------------------------------------------------------------------------------
def test_ct_accepted_with_padding_values():
    img = _ct(lo=-3024, hi=2500)
    assert suitability.check_image_for_task(img, tasks.LIVER) == []
    assert isinstance(suitability.check_image_for_task(img, tasks.LUNG_NODULE), list)


def test_photo_given_to_ct_task_and_volume_given_to_retina():
    photo = imageio.array_to_photo(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="2D image"):
        suitability.check_image_for_task(photo, tasks.LIVER)
    assert suitability.check_image_for_task(photo, tasks.RETINA) == []
    with pytest.raises(InputError, match="3D volume"):
        suitability.check_image_for_task(_ct(), tasks.RETINA)
    # Slicer's single-slice RGB volume of a photo is fine for retina
    assert suitability.check_image_for_task(sitk.JoinSeries([photo]), tasks.RETINA) == []


def test_4d_and_multicomponent_ct_refused():
    four = sitk.Image([8, 8, 4, 3], sitk.sitkInt16)
    with pytest.raises(InputError, match="4D"):
        suitability.check_image_for_task(four, tasks.LIVER)
    rgb_vol = sitk.Image([8, 8, 4], sitk.sitkVectorInt16, 3)
    with pytest.raises(InputError, match="components"):
        suitability.check_image_for_task(rgb_vol, tasks.LIVER)


def test_constant_and_nan_refused():
    flat = sitk.Image([16, 16, 8], sitk.sitkInt16) - 1000
    with pytest.raises(InputError, match="empty"):
        suitability.check_image_for_task(flat, tasks.LIVER)
    arr = sitk.GetArrayFromImage(_ct()).astype(np.float32)
    arr[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        suitability.check_image_for_task(sitk.GetImageFromArray(arr), tasks.LIVER)
    arr[3, 4, 5] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        suitability.check_image_for_task(sitk.GetImageFromArray(arr), tasks.LIVER)


@pytest.mark.parametrize("lo,hi,what", [(0, 255, "8-bit"), (0, 1800, "not CT"), (-1.0, 1.0, "not CT"),
                                        (-20000, 40000, "outside the Hounsfield"), (-1024, -600, "no voxel above")])
def test_non_ct_intensities_refused(lo, hi, what):
    img = sitk.GetImageFromArray(np.linspace(lo, hi, 16 * 16 * 8, dtype=np.float32).reshape(8, 16, 16))
    with pytest.raises(InputError, match=what):
        suitability.check_image_for_task(img, tasks.LIVER)


def test_too_large_reports_estimate():
    img = _ct(size=(64, 64, 32))
    with pytest.raises(InputError, match=r"too large .*GB") as info:
        suitability.check_image_for_task(img, tasks.LIVER, max_voxels=10_000)
    assert "131,072 voxels" in str(info.value)
    assert suitability.estimate_memory_bytes(img, tasks.LIVER) == 64 * 64 * 32 * 4 * (2 + 3)


def test_single_slice_ct_refused_for_3d_task():
    img = _ct(size=(32, 32, 1))
    with pytest.raises(InputError, match="single slice"):
        suitability.check_image_for_task(img, tasks.LIVER)


def test_real_inputs_pass_their_task_checks(shared_data):
    ct = imageio.read_image(require(shared_data / "liver" / "TotalSegmentator_example" / "example_ct_sm.nii.gz"))
    assert suitability.check_image_for_task(ct, tasks.LIVER) == []
    slab = imageio.read_image(require(shared_data / "lung" / "LIDC-IDRI_c2c_slabs" / "LIDC-IDRI-0001" / "ct.nii.gz"))
    assert suitability.check_image_for_task(slab, tasks.LUNG_NODULE) == []
    drive = imageio.read_image(require(shared_data / "retina" / "DRIVE" / "test" / "images" / "01_test.tif"))
    assert drive.GetSize() == (565, 584) and drive.GetNumberOfComponentsPerPixel() == 3
    assert suitability.check_image_for_task(drive, tasks.RETINA) == []
    with pytest.raises(InputError):
        suitability.check_image_for_task(drive, tasks.LIVER)
    chase = imageio.read_image(require(shared_data / "retina" / "CHASE_DB1" / "images" / "Image_01L.jpg"))
    assert chase.GetSize() == (999, 960)
    # an 8-bit nodule crop (LIDC slices are windowed PNGs) is refused for a CT task
    crop = next((shared_data / "lung" / "LIDC-IDRI-slices").glob("LIDC-IDRI-*/nodule-*/images/slice-*.png"), None)
    if crop is not None:
        vol = sitk.JoinSeries([sitk.VectorIndexSelectionCast(imageio.read_image(crop), 0)] * 4)
        with pytest.raises(InputError, match="8-bit"):
            suitability.check_image_for_task(vol, tasks.LUNG_NODULE)


def test_io_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'KDSegmentation');"
            "import KDSegmentationLib.io.images, KDSegmentationLib.io.segmentations, KDSegmentationLib.io.geometry, "
            "KDSegmentationLib.tasks.retina, KDSegmentationLib.evaluation.metrics;"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    from conftest import REPO

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
