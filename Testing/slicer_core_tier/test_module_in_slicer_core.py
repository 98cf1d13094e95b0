"""The Slicer module against Slicer's real core libraries (``slicer-core``): import, Logic, scene, results.

Every MRML call reaches the real library; see Testing/SLICER.md for what is a stand-in and why.
"""
from __future__ import annotations

import dataclasses

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import cli_labelmap, find_sample
from .slicer_standins import SampleDataLogic, add_photo_volume

TASKS = ("liver", "lung_nodule", "retina")


# ---------------------------------------------------------------------------------------------------------------
# helpers: what a clinician does in Slicer, done with the real logics
# ---------------------------------------------------------------------------------------------------------------

def load_sample_volume(slicer, sample):
    """Slicer's volume reader for CT; the photograph through an array (the wheel has no JPEG reader)."""
    path = sample["path"]
    if sample["task"] == "retina":
        return add_photo_volume(slicer, path, sample["node_name"])
    volume = slicer.modules.volumes.logic().AddArchetypeVolume(path, sample["node_name"], 0)
    assert volume is not None, path
    return volume


def put_under_study(slicer, volume):
    """Patient > study > volume, as a DICOM import arranges them; returns the study item."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    return study


def seed_node(slicer, sample):
    if not sample.get("seed_ras"):
        return None
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodule seed")
    node.AddControlPoint(*sample["seed_ras"])
    return node


def exported_labelmap(slicer, segmentation_node, volume, task_spec):
    """The segmentation exported onto the input volume's grid by Slicer's segmentations logic, as (z, y, x) task
    label values (matched by segment name)."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    labelmap_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    combined = None
    try:
        for label in task_spec.labels:
            segment_id = segmentation.GetSegmentIdBySegmentName(label.name)
            assert segment_id, f"no segment {label.name}"
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap_node, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            mask = slicer.util.arrayFromVolume(labelmap_node) > 0
            if combined is None:
                combined = np.zeros(mask.shape, np.uint8)
            combined[mask] = label.value
    finally:
        slicer.mrmlScene.RemoveNode(labelmap_node)
    return combined


def voxel_volume_ml(volume) -> float:
    return float(np.prod(volume.GetSpacing())) / 1000.0


def scene_node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def pump_until(slicer, condition, timeout_s=120.0):
    """Run the (stand-in) Qt event loop until ``condition()`` holds."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "timed out"
        slicer.app.processEvents()
        time.sleep(0.02)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------

def test_module_file_imports_and_registers(vtk_messages, kdseg_module, slicer_core, scene):
    """Imported as Slicer imports it; the module class and its start-up hooks (run by the ``scene`` fixture, as at
    Slicer's start-up) work against the real logics, with no error logged."""
    import types

    parent = types.SimpleNamespace(path=kdseg_module.__file__)
    module = kdseg_module.KDSegmentation(parent)
    assert parent.title == "KD Segmentation" and parent.categories == ["Segmentation"]
    assert slicer_core.selfTests["KDSegmentation"] == module.runTest
    terminologies = slicer_core.modules.terminologies.logic()
    import vtk

    names = vtk.vtkStringArray()
    terminologies.GetLoadedTerminologyNames(names)
    assert "KDSegmentation - retina" in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    regions = vtk.vtkStringArray()
    terminologies.GetLoadedRegionContextNames(regions)
    assert "KDSegmentation - anatomic regions" in [regions.GetValue(i) for i in range(regions.GetNumberOfValues())]
    assert vtk_messages() == ""
    registered = {source["sampleName"]: source for source in SampleDataLogic.sources}
    assert sorted(registered) == ["KD liver sample", "KD lung nodule sample", "KD retina sample"]
    for source in registered.values():
        assert source["category"] == "KDSegmentation"
        path = Path(source["uris"].removeprefix("file://"))
        assert source["checksums"] == "SHA256:" + sha256(path)


def test_the_markups_import_that_slicer_removed_fails_here(slicer_core):
    """Slicer 5.10 moved the Markups MRML classes into MRMLCore: the old import must fail in this tier too, so the
    tier catches it if it comes back."""
    with pytest.raises(ImportError):
        exec("from vtkSlicerMarkupsModuleMRMLPython import vtkMRMLMarkupsFiducialNode", {})
    assert slicer_core.vtkMRMLMarkupsFiducialNode is not None


def test_parameter_node_on_a_real_scene(kdseg_module, scene):
    logic = kdseg_module.KDSegmentationLogic()
    try:
        parameters = logic.getParameterNode()
        seed = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
        parameters.task = "lung_nodule"
        parameters.seedPoints = seed
        parameters.inputVolume = volume
        parameters.alpha = 0.25
        raw = parameters.parameterNode
        assert raw.IsA("vtkMRMLScriptedModuleNode") and scene.IsNodePresent(raw)
        assert raw.GetNodeReferenceID("seedPoints") == seed.GetID()
        assert logic.getParameterNode().seedPoints.GetID() == seed.GetID()  # read back from the MRML node
        assert float(raw.GetParameter("alpha")) == 0.25
        with pytest.raises(ValueError):
            parameters.task = "brain"
        with pytest.raises(ValueError):
            parameters.alpha = 1.5
    finally:
        logic.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# segmenting the bundled samples through the real worker process
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_segment_bundled_sample(kdseg_module, slicer_core, scene, vtk_messages, task, tmp_path):
    from KDSegmentationLib.tasks import TASKS as SPECS

    spec = SPECS[task]
    sample = find_sample(task)
    volume = load_sample_volume(slicer_core, sample)
    study = put_under_study(slicer_core, volume)
    before = slicer_core.util.arrayFromVolume(volume).copy()
    seed = seed_node(slicer_core, sample)

    logic = kdseg_module.KDSegmentationLogic()
    try:
        run = logic.segment(volume, task, seedNode=seed, wait=True)
    finally:
        logic.shutdown()
    assert run.status == "succeeded", run.message
    segmentation_node = run.output

    # a label the model withholds is no segment at all, and the panel says why
    withheld = run.result.get("withheld") or {}
    for name in withheld:
        assert not segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
        assert f"{name}: not available with this model" in run.message
    spec = dataclasses.replace(spec, labels=tuple(lab for lab in spec.labels if lab.name not in withheld))

    # voxel for voxel what the command line writes for the same input
    labels = exported_labelmap(slicer_core, segmentation_node, volume, spec)
    expected = cli_labelmap(sample, tmp_path / "cli.nii.gz")
    assert labels.shape == expected.reshape(labels.shape).shape
    np.testing.assert_array_equal(labels, expected.reshape(labels.shape))
    assert labels.any(), "empty result on the bundled sample"

    # the sizes the panel shows are those of the segments in the scene
    for label in spec.labels:
        stats = run.result["segments"][label.name]
        count = int((labels == label.value).sum())
        if "volume_ml" in stats:
            assert stats["volume_ml"] == pytest.approx(count * voxel_volume_ml(volume), abs=0.051)
            assert f"{label.name}: {stats['volume_ml']:.1f} mL" in run.message
        else:
            assert stats["area_px"] == count
            assert f"{label.name}: {count} px" in run.message

    # placed where DICOM SEG export and the Data module expect it
    sh = slicer_core.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation_node)) == study
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    assert segmentation_node.GetNodeReferenceID(role) == volume.GetID()
    assert segmentation_node.GetStorageNode() is None  # not tied to the worker's temporary file

    assert_terminology_resolves(slicer_core, segmentation_node, spec)
    np.testing.assert_array_equal(slicer_core.util.arrayFromVolume(volume), before)
    assert vtk_messages() == ""


def assert_terminology_resolves(slicer, segmentation_node, spec):
    """Each segment's terminology tag parses and is found, code and meaning, in the lists Slicer has loaded."""
    import vtk

    terminologies = slicer.modules.terminologies.logic()
    segmentation = segmentation_node.GetSegmentation()
    for label in spec.labels:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(label.name))
        tag = vtk.mutable("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag), label.name
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(str(tag), entry), str(tag)
        term = label.terminology
        assert terminologies.UpdateEntryFromLoadedTerminologies(entry, [term.context], [term.region_context]), \
            f"{label.name}: {tag} is not in the lists Slicer has loaded"
        assert entry.GetTerminologyContextName() == term.context
        assert entry.GetTypeObject().GetCodeValue() == term.type[1]
        assert entry.GetTypeObject().GetCodeMeaning() == term.type[2]
        if term.region:
            assert entry.GetRegionContextName() == term.region_context
            assert entry.GetRegionObject().GetCodeValue() == term.region[1]
            assert entry.GetRegionObject().GetCodeMeaning() == term.region[2]


def test_result_file_carries_the_reference_geometry_slicer_would_store(kdseg_module, slicer_core, scene, tmp_path):
    """A ``.seg.nrrd`` opened on its own (drag and drop) knows its input's grid, as Slicer's own writer stores it."""
    import SimpleITK as sitk
    from KDSegmentationLib.io import segmentations as segio
    from KDSegmentationLib.tasks import LIVER

    image = sitk.Image(7, 6, 5, sitk.sitkUInt8)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((12.0, -30.0, 40.0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((-c, -s, 0.0, s, -c, 0.0, 0.0, 0.0, -1.0))  # oblique and flipped
    image[3, 2, 1] = 1
    path = segio.write_segmentation(image, LIVER, tmp_path / "result.seg.nrrd")
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    volume = slicer_core.util.addVolumeFromArray(sitk.GetArrayFromImage(image), name="input",
                                                 ijkToRAS=np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps)

    loaded = slicer_core.modules.segmentations.logic().LoadSegmentationFromFile(str(path), True, "result")
    reference = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    name = slicer_core.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    ours = [float(v) for v in loaded.GetSegmentation().GetConversionParameter(name).split(";") if v]
    slicers = [float(v) for v in reference.GetSegmentation().GetConversionParameter(name).split(";") if v]
    np.testing.assert_allclose(ours, slicers, atol=1e-6)
    # and the segment sits on that grid
    loaded.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    np.testing.assert_array_equal(slicer_core.util.arrayFromSegmentBinaryLabelmap(loaded, "Segment_1", volume),
                                  sitk.GetArrayFromImage(image))


# ---------------------------------------------------------------------------------------------------------------
# cancel, failure, closing the scene: the scene stays as it was
# ---------------------------------------------------------------------------------------------------------------

def _start_liver(kdseg_module, slicer_core):
    volume = load_sample_volume(slicer_core, find_sample("liver"))
    logic = kdseg_module.KDSegmentationLogic()
    run = logic.segment(volume, "liver", keepWorker=False)
    pump_until(slicer_core, lambda: run.done or run.fraction > 0 or bool(run.stage))
    return logic, run, volume


def test_cancel_during_segmentation(kdseg_module, slicer_core, scene):
    logic, run, volume = _start_liver(kdseg_module, slicer_core)
    try:
        nodes = scene_node_ids(scene)
        before = slicer_core.util.arrayFromVolume(volume).copy()
        temp_dir = run.temp_dir
        assert not run.done, "finished before it could be cancelled"
        logic.cancelSegmentation()
        assert run.status == "cancelled" and not logic.isSegmenting()
        pump_until(slicer_core, lambda: not run.process.running, timeout_s=10)
        for _ in range(5):
            slicer_core.app.processEvents()
        assert scene_node_ids(scene) == nodes
        assert not Path(temp_dir).exists()
        np.testing.assert_array_equal(slicer_core.util.arrayFromVolume(volume), before)
        # and the next run works
        sample = find_sample("lung_nodule")
        ct = load_sample_volume(slicer_core, sample)
        again = logic.segment(ct, "lung_nodule", seedNode=seed_node(slicer_core, sample), wait=True)
        assert again.status == "succeeded", again.message
    finally:
        logic.shutdown()


def test_failed_run_leaves_the_scene_as_it_was(kdseg_module, slicer_core, scene, tmp_path):
    sample = find_sample("lung_nodule")
    volume = load_sample_volume(slicer_core, sample)
    seed = seed_node(slicer_core, sample)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "earlier result")
    existing.CreateDefaultDisplayNodes()
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    existing.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(slicer_core.util.arrayFromVolume(volume).shape, np.uint8)
    mask[10:14, 50:60, 50:60] = 1
    slicer_core.util.updateSegmentBinaryLabelmapFromArray(mask, existing, "kept", volume)
    broken = tmp_path / "broken.kdseg.pt"
    broken.write_bytes(b"not a model")
    nodes = scene_node_ids(scene)

    logic = kdseg_module.KDSegmentationLogic()
    try:
        run = logic.segment(volume, "lung_nodule", model=str(broken), seedNode=seed, outputSegmentation=existing,
                            wait=True)
    finally:
        logic.shutdown()
    assert run.status == "failed" and run.message
    assert scene_node_ids(scene) == nodes
    assert existing.GetSegmentation().GetNumberOfSegments() == 1
    np.testing.assert_array_equal(slicer_core.util.arrayFromSegmentBinaryLabelmap(existing, "kept", volume), mask)
    assert broken.read_bytes() == b"not a model"


def test_closing_the_scene_mid_run(kdseg_module, slicer_core, scene):
    logic, run, _ = _start_liver(kdseg_module, slicer_core)
    try:
        assert not run.done
        scene.Clear(False)
        assert run.status == "cancelled"
        for _ in range(10):
            slicer_core.app.processEvents()
        assert scene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None
        assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is None
    finally:
        logic.shutdown()


def test_cancel_during_distillation(kdseg_module, slicer_core, scene, tmp_path):
    """Local distillation on a photograph from the scene, cancelled while it trains: teacher and input untouched."""
    volume = load_sample_volume(slicer_core, find_sample("retina"))
    before = slicer_core.util.arrayFromVolume(volume).copy()
    logic = kdseg_module.KDSegmentationLogic()
    teacher, student = logic.shippedModelPath("retina", "teacher"), logic.shippedModelPath("retina", "student")
    teacher_hash, student_hash = sha256(teacher), sha256(student)
    output = tmp_path / "models" / "retina_student_local_v1.kdseg.pt"
    try:
        run = logic.distill("retina", volumeNodes=[volume], maxMinutes=5.0, outputPath=output)
        # the shipped student is adapted (not a new network), from soft labels computed once per image
        assert f"--init={student}" in run.process.command
        assert "stored" in run.process.command
        pump_until(slicer_core, lambda: run.done or "train" in (run.stage or "").lower() or run.metrics.loss,
                   timeout_s=180)
        assert not run.done, run.message
        logic.cancelDistillation()
        pump_until(slicer_core, lambda: run.done, timeout_s=60)
    finally:
        logic.shutdown()
    assert run.status == "cancelled", run.message
    assert not run.process.running
    assert sha256(teacher) == teacher_hash and sha256(student) == student_hash
    np.testing.assert_array_equal(slicer_core.util.arrayFromVolume(volume), before)
    assert not any(output.parent.glob(".*tmp*")) if output.parent.exists() else True


# ---------------------------------------------------------------------------------------------------------------
# the module's own self-test, unchanged
# ---------------------------------------------------------------------------------------------------------------

def test_module_self_test(kdseg_module, slicer_core, scene):
    kdseg_module.KDSegmentationTest().runTest()
    # it segmented every bundled sample (it would skip silently without the packages)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3
