"""Writing segmentations that Slicer opens on the input geometry, and reading them back."""
from __future__ import annotations

import json
import os

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from KDSegmentationLib import tasks
from KDSegmentationLib import paths as resources
from KDSegmentationLib.io import segmentations as segio
from KDSegmentationLib.errors import InputError


def _oblique_labelmap(task, size=(12, 10, 7)) -> sitk.Image:
    arr = np.zeros(size[::-1], np.uint8)
    # one blob per label except the last one, which stays empty (it must still be written)
    for i, lab in enumerate(task.labels[:-1] if len(task.labels) > 1 else task.labels):
        arr[1 + i:3 + i, 2:5, 3 + 2 * i:6 + 2 * i] = lab.value
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((12.5, -30.25, 101.0))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, 0.0, s, 0.0, -1.0, 0.0, s, 0.0, -c))  # rotated about y and flipped
    return img


def _photo_labelmap(task) -> sitk.Image:
    arr = np.zeros((9, 11), np.uint8)
    arr[2:5, 3:8] = task.labels[0].value
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin((4.0, -2.0))
    img.SetSpacing((1.0, 1.0))
    return img


@pytest.mark.parametrize("task_name", list(tasks.TASKS))
def test_seg_nrrd_round_trip(tmp_path, task_name):
    task = tasks.TASKS[task_name]
    lab = _photo_labelmap(task) if task.input_kind == "2d-rgb" else _oblique_labelmap(task)
    path = segio.write_segmentation(lab, task, tmp_path / "out dir" / "résultat.seg.nrrd",
                                    extra_metadata={"Model": "student v1", "Version": 3})
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    arr = sitk.GetArrayFromImage(lab)
    arr3 = arr if arr.ndim == 3 else arr[None]
    lab3 = lab if lab.GetDimension() == 3 else sitk.JoinSeries([lab])
    direction = np.array(lab3.GetDirection()).reshape(3, 3)
    if lab.GetDimension() == 2:
        direction = np.eye(3)

    # pynrrd: the raw header Slicer reads: the labels' box, placed by its origin and by the offset in the reference
    voxels, header = nrrd.read(str(path))
    nz = np.argwhere(arr3 != 0)
    lo, hi = nz.min(0), nz.max(0)  # (z, y, x)
    offset = lo[::-1]
    assert header["Segmentation_ReferenceImageExtentOffset"] == " ".join(str(v) for v in offset)
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], lab3.TransformIndexToPhysicalPoint([int(v) for v in offset]),
                               atol=1e-6)
    np.testing.assert_allclose(header["space directions"],
                               (direction * np.array(lab3.GetSpacing())[None, :]).T, atol=1e-6)
    np.testing.assert_array_equal(voxels, arr3[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].transpose(2, 1, 0))
    for i in range(len(task.labels)):
        assert header[f"Segment{i}_Extent"] == " ".join(f"0 {n - 1}" for n in voxels.shape)
    assert header["KDSegmentation_Model"] == "student v1" and header["KDSegmentation_Version"] == "3"

    # slicerio: segments with names, colours, terminology, label values, layer 0
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == [lab_.name for lab_ in task.labels]
    for s, lab_ in zip(seg["segments"], task.labels):
        assert s["labelValue"] == lab_.value and s["layer"] == 0 and s["id"]
        np.testing.assert_allclose(s["color"], np.array(lab_.color) / 255.0, atol=1e-5)
        assert s["terminology"]["type"] == list(lab_.terminology.type)
        assert s["terminology"]["category"] == list(lab_.terminology.category)
        assert s["terminology"]["contextName"] == lab_.terminology.context
        if lab_.terminology.region:
            assert s["terminology"]["anatomicRegion"] == list(lab_.terminology.region)
    tags = header["Segment0_Tags"]
    assert "TerminologyEntry:" + segio.terminology_string(task.labels[0].terminology) in tags

    # our reader: same geometry and values, names -> values
    back, names = segio.read_segmentation(path)
    assert names == {lab_.name: lab_.value for lab_ in task.labels}
    assert back.GetSize() == lab3.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), lab3.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), lab3.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), direction.ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr3)


def test_liver_terminology_codes(tmp_path):
    path = segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, tmp_path / "l.seg.nrrd")
    header = nrrd.read_header(str(path))
    assert "~SCT^10200004^Liver~" in header["Segment0_Tags"]
    assert "~SCT^108369006^Neoplasm~" in header["Segment1_Tags"]
    # the tumour segment is empty in this labelmap but still present
    assert header["Segment1_Name"] == "Liver tumor"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_plain_labelmap_round_trip(tmp_path, suffix):
    lab = _oblique_labelmap(tasks.LIVER)
    path = segio.write_segmentation(lab, tasks.LIVER, tmp_path / f"labels{suffix}")
    back, names = segio.read_segmentation(path)
    assert names == {"label_1": 1}
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(back.GetOrigin(), lab.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), lab.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(lab))


def test_read_overlapping_layers(tmp_path):
    seg = slicerio.create_segmentation((6, 5, 4), np.diag([0.5, 0.5, 2.0, 1.0]))
    a = np.zeros((6, 5, 4), bool)
    a[1:4, 1:3, 1:3] = True
    b = np.zeros((6, 5, 4), bool)
    b[2:5, 2:4, 1:3] = True  # overlaps a: slicerio puts it on layer 1
    slicerio.add_segment(seg, a, {"id": "A", "name": "first"})
    slicerio.add_segment(seg, b, {"id": "B", "name": "second"})
    assert seg["voxels"].ndim == 4
    path = tmp_path / "overlap.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    lab, names = segio.read_segmentation(path)
    assert names == {"first": 1, "second": 2}
    arr = sitk.GetArrayFromImage(lab).transpose(2, 1, 0)
    np.testing.assert_array_equal(arr == 2, b)
    np.testing.assert_array_equal(arr == 1, a & ~b)
    np.testing.assert_allclose(lab.GetSpacing(), (0.5, 0.5, 2.0))


def test_unwritable_folder_leaves_nothing(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("permissions are not enforced for root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="writable"):
            segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, folder / "x.seg.nrrd")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_failed_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.seg.nrrd"
    path.write_text("previous result")

    def boom(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", boom)
    with pytest.raises(InputError, match="No space left"):
        segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, path)
    assert path.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]


def test_output_path_is_a_file_not_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as info:
        segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, blocker / "x.seg.nrrd")
    assert "\n" not in str(info.value)


def test_bad_extension_and_bad_values(tmp_path):
    with pytest.raises(InputError, match="unsupported output"):
        segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, tmp_path / "x.png")
    lab = _oblique_labelmap(tasks.LIVER) + 5
    with pytest.raises(ValueError, match="not labels"):
        segio.write_segmentation(lab, tasks.LIVER, tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_read_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="not found"):
        segio.read_segmentation(tmp_path / "none.seg.nrrd")
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_text("NRRD0004\ntype: nonsense\n")
    with pytest.raises(InputError, match="corrupt"):
        segio.read_segmentation(bad)


def test_custom_terminology_file_matches_task_registry():
    path = resources.terminology_dir() / "KDSegmentation.term.json"
    doc = json.loads(path.read_text())
    term = tasks.RETINA.labels[0].terminology
    assert doc["SegmentationCategoryTypeContextName"] == term.context
    cats = doc["SegmentationCodes"]["Category"]
    cat = next(c for c in cats if (c["CodingSchemeDesignator"], c["CodeValue"]) == term.category[:2])
    assert cat["CodeMeaning"] == term.category[2]
    typ = next(t for t in cat["Type"] if (t["CodingSchemeDesignator"], t["CodeValue"]) == term.type[:2])
    assert typ["CodeMeaning"] == term.type[2]
    assert tuple(typ["recommendedDisplayRGBValue"]) == tasks.RETINA.labels[0].color


def test_permission_error_on_rename_is_input_error(tmp_path, monkeypatch):
    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(segio.os, "replace", denied)
    with pytest.raises(InputError, match="Permission denied.*writable") as info:
        segio.write_segmentation(_oblique_labelmap(tasks.LIVER), tasks.LIVER, tmp_path / "x.nii.gz")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_real_ct_labelmap_round_trip(tmp_path, shared_data):
    from conftest import require

    src = require(shared_data / "liver" / "TotalSegmentator_example" / "example_seg.nii.gz")
    multi = sitk.ReadImage(str(src))
    liver = sitk.Cast(multi == 5, sitk.sitkUInt8)  # TotalSegmentator label 5 = liver
    path = segio.write_segmentation(liver, tasks.LIVER, tmp_path / "liver.seg.nrrd")
    back, names = segio.read_segmentation(path)
    assert names == {"Liver": 1, "Liver tumor": 2}
    assert back.GetSize() == liver.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), liver.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetSpacing(), liver.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), liver.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(liver))
    # about 1043 mL of liver in this example (SOURCE.md)
    ml = sitk.GetArrayViewFromImage(back).sum() * np.prod(back.GetSpacing()) / 1000
    assert 1000 < ml < 1100


def _corner_labelmap(size=(120, 100, 60)) -> sitk.Image:
    """Oblique, flipped, anisotropic grid (x, y, z) with liver and tumour in a box touching the far corner."""
    arr = np.zeros(size[::-1], np.uint8)
    rng = np.random.default_rng(3)
    box = arr[48:, 81:, 95:]  # (z, y, x): 12 x 19 x 25 voxels, up to the last index on every axis
    box[...] = (rng.random(box.shape) < 0.6).astype(np.uint8)
    box[rng.random(box.shape) < 0.1] = 2
    arr[48, 81, 95] = arr[-1, -1, -1] = 1  # the box's corners are labelled: its extent is exactly this
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.68, 0.74, 3.0))
    img.SetOrigin((-181.5, 40.25, -620.0))
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rot = (np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]) @ np.diag([-1, 1, -1]))
    img.SetDirection(tuple(rot.ravel()))
    return img


def _assert_same_grid_and_voxels(back: sitk.Image, want: sitk.Image):
    assert back.GetSize() == want.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), want.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), want.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), want.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(want))


def test_cropped_seg_nrrd_on_an_oblique_flipped_anisotropic_grid(tmp_path):
    lab = _corner_labelmap()
    path = segio.write_segmentation(lab, tasks.LIVER, tmp_path / "corner.seg.nrrd")
    voxels, header = nrrd.read(str(path))
    assert voxels.shape == (25, 19, 12)  # (i, j, k): the labels' box only
    assert header["Segmentation_ReferenceImageExtentOffset"] == "95 81 48"
    np.testing.assert_allclose(header["space origin"], lab.TransformIndexToPhysicalPoint((95, 81, 48)), atol=1e-9)
    # the reference geometry is the full input grid, as Slicer stores it
    assert segio.reference_geometry_string(lab) in header["Segmentation_ConversionParameters"]
    assert header["Segment0_Extent"] == header["Segment1_Extent"] == "0 24 0 18 0 11"
    # smaller than the same labels stored on the full grid at the same compression
    full = tmp_path / "full.seg.nrrd"
    seg = slicerio.read_segmentation(str(path))
    seg["voxels"] = sitk.GetArrayFromImage(lab).transpose(2, 1, 0)
    seg["referenceImageExtentOffset"] = [0, 0, 0]
    seg["ijkToLPS"] = segio._ijk_to_lps(lab)
    slicerio.write_segmentation(str(full), seg, compression_level=segio.SEG_COMPRESSION_LEVEL)
    assert path.stat().st_size < full.stat().st_size
    # read back on the full reference grid, voxel for voxel, from both files
    for p in (path, full):
        back, names = segio.read_segmentation(p)
        assert names == {"Liver": 1, "Liver tumor": 2}
        _assert_same_grid_and_voxels(back, lab)


def test_empty_result_is_one_voxel_and_reads_back_empty_on_the_full_grid(tmp_path):
    lab = _corner_labelmap() * 0
    path = segio.write_segmentation(lab, tasks.LIVER, tmp_path / "empty.seg.nrrd")
    voxels, header = nrrd.read(str(path))
    assert voxels.shape == (1, 1, 1) and not voxels.any()
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    np.testing.assert_allclose(header["space origin"], lab.GetOrigin(), atol=1e-9)
    # empty extents: Slicer loads every segment, as an empty one
    assert [header[f"Segment{i}_Extent"] for i in range(2)] == ["0 -1 0 -1 0 -1"] * 2
    assert [header[f"Segment{i}_Name"] for i in range(2)] == ["Liver", "Liver tumor"]
    back, names = segio.read_segmentation(path)
    assert names == {"Liver": 1, "Liver tumor": 2}
    _assert_same_grid_and_voxels(back, lab)


def test_cropped_photo_labelmap_reads_back_as_one_full_slice(tmp_path):
    arr = np.zeros((40, 52), np.uint8)
    arr[31:, :7] = 1  # the bottom-left corner
    arr[35, 3] = 0
    lab = sitk.GetImageFromArray(arr)
    lab.SetOrigin((4.0, -2.0))
    path = segio.write_segmentation(lab, tasks.RETINA, tmp_path / "photo.seg.nrrd")
    voxels, header = nrrd.read(str(path))
    assert voxels.shape == (7, 9, 1)
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 31 0"
    np.testing.assert_allclose(header["space origin"], (4.0, 29.0, 0.0), atol=1e-9)
    back, names = segio.read_segmentation(path)
    assert names == {tasks.RETINA.labels[0].name: tasks.RETINA.labels[0].value}
    assert back.GetSize() == (52, 40, 1)
    np.testing.assert_allclose(back.GetOrigin(), (4.0, -2.0, 0.0), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back)[0], arr)


def test_a_reference_geometry_of_another_lattice_keeps_the_stored_grid(tmp_path):
    lab = _corner_labelmap()
    path = segio.write_segmentation(lab, tasks.LIVER, tmp_path / "corner.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    other = sitk.Image(10, 10, 10, sitk.sitkUInt8)  # e.g. a segmentation edited on another volume
    seg["conversionParameters"] = [{"name": "Reference image geometry", "value": segio.reference_geometry_string(other),
                                    "description": "x"}]
    moved = tmp_path / "moved.seg.nrrd"
    slicerio.write_segmentation(str(moved), seg)
    back, _ = segio.read_segmentation(moved)
    assert back.GetSize() == (25, 19, 12)
    np.testing.assert_allclose(back.GetOrigin(), lab.TransformIndexToPhysicalPoint((95, 81, 48)), atol=1e-6)


@pytest.mark.parametrize("voxel", [(3, 2, 1), (6, 5, 4)])
def test_one_labelled_voxel_is_stored_in_two(tmp_path, voxel):
    """Slicer reads any 1-voxel image as "no image data": a single labelled voxel is stored with a neighbour."""
    lab = sitk.Image(7, 6, 5, sitk.sitkUInt8)
    lab.SetSpacing((0.7, 0.8, 2.5))
    lab[voxel] = 1
    path = segio.write_segmentation(lab, tasks.LIVER, tmp_path / "one.seg.nrrd")
    voxels, header = nrrd.read(str(path))
    assert voxels.shape == (2, 1, 1) and voxels.sum() == 1
    back, _ = segio.read_segmentation(path)
    _assert_same_grid_and_voxels(back, lab)
