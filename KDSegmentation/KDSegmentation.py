"""KD Segmentation: fast distilled segmentation of the liver, lung nodules and retinal vessels in 3D Slicer.

The panel stays thin: the tensor work runs in a separate Python process (``python -m KDSegmentationLib``) that
reports JSON-lines progress; this file writes the input, starts and polls that process, and loads the result.
"""
import enum
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

# Slicer-free and light (no torch/MONAI): the heavy engine only ever runs in the engine process.
from KDSegmentationLib.client import (
    SLICER_REQUIREMENTS,
    TORCH_REQUIREMENT,
    Run,
    RunManager,
    delete_user_model,
    distill_command,
    engine_python,
    find_samples,
    format_elapsed,
    format_volumes,
    installed_version,
    is_local_model,
    missing_requirements,
    model_card_text,
    model_choices,
    model_label,
    models_list_command,
    next_model_path,
    safe_name,
    terminology_files,
)
from KDSegmentationLib.paths import shipped_models_dir, user_models_dir
from KDSegmentationLib.tasks import TASKS


def resourcesDir() -> Path:
    """``Resources`` beside this file (source tree: one level up; built extension: beside the module folder)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "Resources", here.parent / "Resources"):
        if (candidate / "UI" / "KDSegmentation.ui").is_file():
            return candidate
    return here.parent / "Resources"


#
# Parameter node
#

class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": "Automatic (GPU when available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


class DistillSource(enum.Enum):
    SCENE = "scene"
    FOLDER = "folder"

    def label(self):
        return "Volumes in the scene" if self is DistillSource.SCENE else "A dataset folder"


@parameterNodeWrapper
class KDSegmentationParameterNode:
    """Panel state, saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(list(TASKS)), Default(next(iter(TASKS)))]
    model: Annotated[str, Default("student")]  # "student", "teacher" or a model file
    device: Annotated[Device, Default(Device.AUTO)]
    seedPoints: slicer.vtkMRMLMarkupsFiducialNode  # in MRMLCore since Slicer 5.10, so known at import time
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    keepWorker: Annotated[bool, Default(True)]
    distillSource: Annotated[DistillSource, Default(DistillSource.SCENE)]
    epochs: Annotated[int, WithinRange(0, 10000), Default(0)]
    maxMinutes: Annotated[float, WithinRange(0.0, 1440.0), Default(10.0)]
    alpha: Annotated[float, WithinRange(0.0, 1.0), Default(0.5)]
    temperature: Annotated[float, WithinRange(0.1, 50.0), Default(2.0)]


#
# Module
#

class KDSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "KD Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["KDSegmentation contributors"]
        self.parent.helpText = """
Segments the <b>liver</b> (abdominal CT), a <b>lung nodule</b> (chest CT, around a point you place) or the
<b>retinal vessels</b> (colour fundus photograph) in seconds with a small student network distilled from a larger
teacher.
<ol>
<li>Load an image (or a sample from the Sample Data module, category KDSegmentation).</li>
<li>Choose the input volume and the task; for a lung nodule, place a seed point inside the nodule.</li>
<li>Click <b>Apply</b> (it turns into <b>Cancel</b> while running). Segment sizes are shown when it is done.</li>
</ol>
<b>Local distillation</b> adapts the student to your own images: the teacher labels them once and a copy of the
student learns from it (scored before and after on any reference segmentations you give); the new model appears in
the model list. <b>Models</b> shows each model's card (data, metrics, speed).
"""
        self.parent.acknowledgementText = """
The networks are built with <a href="https://monai.io">MONAI</a> and PyTorch; each model's card (Models section)
lists the data it was trained on. Bundled samples: a TotalSegmentator example CT (Wasserthal et al., Radiology: AI
2023; Apache-2.0), a LIDC-IDRI chest CT crop (Armato et al., Medical Physics 2011; The Cancer Imaging Archive,
doi:10.7937/K9/TCIA.2015.LO9QL9SX; CC BY 3.0) and a CHASE_DB1 fundus photograph (Fraz et al., IEEE TBME 2012;
CC BY 4.0).
"""
        iconPath = resourcesDir() / "Icons" / "KDSegmentation.png"
        if iconPath.is_file():
            self.parent.icon = qt.QIcon(str(iconPath))
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    for step in (registerSampleData, loadTerminologies):
        try:
            step()
        except Exception:
            # a missing optional module must not stop Slicer from starting
            logging.exception("KDSegmentation: %s failed", step.__name__)


def registerSampleData():
    """Offer the bundled samples in the Sample Data module (copied, checksum-verified, from Resources/Samples)."""
    import SampleData

    iconPath = resourcesDir() / "Icons" / "KDSegmentation.png"
    for sample in find_samples(resourcesDir() / "Samples"):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="KDSegmentation",
            sampleName=sample["sample_name"],
            uris=Path(sample["path"]).as_uri(),
            fileNames=sample["file_name"],
            nodeNames=sample["node_name"],
            thumbnailFileName=str(iconPath),
            checksums="SHA256:" + sample["sha256"],
        )


def loadTerminologies():
    """Terminology entries the standard lists lack (e.g. retinal vessels) so segments show proper names."""
    terminologiesLogic = slicer.modules.terminologies.logic()
    for path, kind in terminology_files(resourcesDir() / "Terminology"):
        if kind == "category":
            terminologiesLogic.LoadTerminologyFromFile(path)
        else:
            terminologiesLogic.LoadRegionContextFromFile(path)


#
# Widget
#

class KDSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._modelEntries = []
        self._updatingGui = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resourcesDir() / "UI" / "KDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KDSegmentationLogic()

        for name, spec in TASKS.items():
            self.ui.taskComboBox.addItem(spec.title, name)
        self.ui.seedPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskComboBoxChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelComboBoxChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.distillButton.connect("clicked(bool)", self.onDistillButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.modelsListWidget.connect("currentRowChanged(int)", self.onModelsListRowChanged)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.distillVolumesComboBox.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.distillDataPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)

        self.initializeParameterNode()
        # Listing models starts an engine process; only worth it once the packages are there.
        if not self.logic.missingDependencies():
            self.onRefreshModels()

    def cleanup(self):
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        # the Logic cancels a running segmentation itself; the panel lets go of the parameter node
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        # The task and model lists are filled here (their content depends on the task and the installed models).
        if self._updatingGui:
            return
        self._updatingGui = True
        try:
            if self._parameterNode:
                index = self.ui.taskComboBox.findData(self._parameterNode.task)
                if index >= 0 and index != self.ui.taskComboBox.currentIndex:
                    self.ui.taskComboBox.setCurrentIndex(index)
                self._fillModelComboBox()
        finally:
            self._updatingGui = False
        self.updateButtons()

    def _fillModelComboBox(self):
        parameterNode = self._parameterNode
        choices = model_choices(self._modelEntries, parameterNode.task)
        values = [value for _, value in choices]
        if parameterNode.model not in values:
            if parameterNode.model and os.path.isfile(parameterNode.model):
                choices.append((Path(parameterNode.model).name, parameterNode.model))
                values.append(parameterNode.model)
            else:
                parameterNode.model = "student"
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for label, value in choices:
            self.ui.modelComboBox.addItem(label, value)
        self.ui.modelComboBox.setCurrentIndex(values.index(parameterNode.model))
        self.ui.modelComboBox.blockSignals(wasBlocked)

    def onTaskComboBoxChanged(self, index):
        if self._parameterNode is None or self._updatingGui:
            return
        task = self.ui.taskComboBox.itemData(index)
        if task:
            self._parameterNode.task = task

    def onModelComboBoxChanged(self, index):
        if self._parameterNode is None or self._updatingGui:
            return
        model = self.ui.modelComboBox.itemData(index)
        if model:
            self._parameterNode.model = model

    def updateButtons(self, *args):
        parameterNode = self._parameterNode
        spec = TASKS.get(parameterNode.task) if parameterNode else None
        needsSeed = bool(spec and spec.needs_seed)
        self.ui.seedLabel.setVisible(needsSeed)
        self.ui.seedWidget.setVisible(needsSeed)

        if self.logic.isSegmenting():
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running segmentation."
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = "Apply"
            reason = None
            if parameterNode is None or not parameterNode.inputVolume:
                reason = "Select an input volume."
            elif needsSeed and not parameterNode.seedPoints:
                reason = "Create a seed point list and place a point inside the nodule."
            self.ui.applyButton.enabled = reason is None
            self.ui.applyButton.toolTip = reason or "Segment the input volume."

        distilling = self.logic.isDistilling()
        self.ui.distillButton.text = "Cancel distillation" if distilling else "Start distillation"
        fromScene = parameterNode is None or parameterNode.distillSource == DistillSource.SCENE
        for widget in (self.ui.distillVolumesComboBox, self.ui.distillReferencesComboBox):
            widget.enabled = fromScene and not distilling
        for widget in (self.ui.distillDataPathLineEdit, self.ui.distillUnlabelledPathLineEdit):
            widget.enabled = not fromScene and not distilling
        if not distilling:
            if fromScene:
                ready = len(self.ui.distillVolumesComboBox.checkedNodes()) > 0
            else:
                ready = bool(self.ui.distillDataPathLineEdit.currentPath)
            self.ui.distillButton.enabled = parameterNode is not None and ready
        else:
            self.ui.distillButton.enabled = True

        entry = self._selectedModelEntry()
        self.ui.deleteModelButton.enabled = bool(entry and is_local_model(entry))

    # -- segmentation -------------------------------------------------------------------------------------
    def onApplyButton(self):
        if self.logic.isSegmenting():
            self.ui.statusLabel.text = "Cancelling..."
            self.logic.cancelSegmentation()
            return
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            parameterNode = self._parameterNode
            self.ui.logTextEdit.clear()
            self.ui.resultsLabel.text = ""
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self.logic.segment(
                parameterNode.inputVolume, parameterNode.task, model=parameterNode.model,
                device=parameterNode.device.value, seedNode=parameterNode.seedPoints,
                outputSegmentation=parameterNode.outputSegmentation, keepWorker=parameterNode.keepWorker,
                progressCallback=self.onSegmentProgress, logCallback=self.appendLog,
                finishedCallback=self.onSegmentFinished)
        self.updateButtons()

    def onSegmentProgress(self, run):
        self.ui.progressBar.value = int(round(100 * run.fraction))
        self.ui.statusLabel.text = f"{run.stage or 'Starting'} - {format_elapsed(run.elapsed)}"

    def appendLog(self, message, level="info"):
        prefix = "" if level in ("info", None) else f"{str(level).upper()}: "
        self.ui.logTextEdit.appendPlainText(prefix + str(message))
        if level == "warning":
            # e.g. "the GPU ran out of memory; running again on the CPU": visible even with the log collapsed
            self.ui.statusLabel.text = str(message)
            slicer.util.showStatusMessage(f"KD Segmentation: {message}", 5000)

    def onSegmentFinished(self, run):
        self.updateButtons()
        if run.status == "succeeded":
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"Done in {format_elapsed(run.elapsed)} on {run.device}."
            self.ui.resultsLabel.text = run.message
            if self._parameterNode:
                self._parameterNode.outputSegmentation = run.output
            self.ui.segmentationShow3DButton.setSegmentationNode(run.output)
        elif run.status == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled."
        else:
            self.ui.statusLabel.text = "Failed (see the log)."
            slicer.util.errorDisplay(f"Segmentation failed: {run.message}",
                                     detailedText=self.ui.logTextEdit.toPlainText())

    # -- local distillation -------------------------------------------------------------------------------
    def onDistillButton(self):
        if self.logic.isDistilling():
            self.ui.distillStatusLabel.text = "Stopping (the last good checkpoint is kept)..."
            self.logic.cancelDistillation()
            return
        with slicer.util.tryWithErrorDisplay("Distillation could not start.", waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            parameterNode = self._parameterNode
            fromScene = parameterNode.distillSource == DistillSource.SCENE
            self.ui.logTextEdit.clear()
            self.ui.distillProgressBar.value = 0
            self.logic.distill(
                parameterNode.task,
                teacherPath=self.ui.teacherPathLineEdit.currentPath or None,
                volumeNodes=list(self.ui.distillVolumesComboBox.checkedNodes()) if fromScene else None,
                referenceSegmentations=list(self.ui.distillReferencesComboBox.checkedNodes()) if fromScene else None,
                dataFolder=None if fromScene else self.ui.distillDataPathLineEdit.currentPath,
                unlabelledFolder=None if fromScene else (self.ui.distillUnlabelledPathLineEdit.currentPath or None),
                alpha=parameterNode.alpha, temperature=parameterNode.temperature,
                epochs=parameterNode.epochs, maxMinutes=parameterNode.maxMinutes,
                progressCallback=self.onDistillProgress, logCallback=self.appendLog,
                finishedCallback=self.onDistillFinished)
            self.ui.distillStatusLabel.text = "Starting..."
        self.updateButtons()

    def onDistillProgress(self, run):
        self.ui.distillProgressBar.value = int(round(100 * run.fraction))
        self.ui.distillStatusLabel.text = f"{run.stage or 'Starting'} - {format_elapsed(run.elapsed)}"

    def onDistillFinished(self, run):
        self.updateButtons()
        if run.status == "succeeded":
            self.ui.distillProgressBar.value = 100
            self.ui.distillStatusLabel.text = f"{run.message} ({format_elapsed(run.elapsed)})"
            if self._parameterNode and run.model_path and self._parameterNode.task == run.task:
                self._parameterNode.model = str(run.model_path)
            self.onRefreshModels()
        elif run.status == "cancelled":
            self.ui.distillStatusLabel.text = "Cancelled; no model was overwritten."
        else:
            self.ui.distillStatusLabel.text = "Failed (see the log)."
            slicer.util.errorDisplay(f"Distillation failed: {run.message}",
                                     detailedText=self.ui.logTextEdit.toPlainText())

    # -- model manager ------------------------------------------------------------------------------------
    def onRefreshModels(self):
        self.ui.modelCardTextEdit.setPlainText("Reading the model list...")
        self.logic.listModels(self.onModelsListed)

    def onModelsListed(self, entries, error):
        if error:
            self.ui.modelCardTextEdit.setPlainText(f"Could not read the model list: {error}")
            return
        self._modelEntries = list(entries)
        wasBlocked = self.ui.modelsListWidget.blockSignals(True)
        self.ui.modelsListWidget.clear()
        for entry in self._modelEntries:
            self.ui.modelsListWidget.addItem(model_label(entry))
        self.ui.modelsListWidget.blockSignals(wasBlocked)
        self.ui.modelCardTextEdit.setPlainText("" if entries else "No model installed yet.")
        self.onParameterNodeModified()

    def _selectedModelEntry(self):
        row = self.ui.modelsListWidget.currentRow
        return self._modelEntries[row] if 0 <= row < len(self._modelEntries) else None

    def onModelsListRowChanged(self, row):
        entry = self._selectedModelEntry()
        self.ui.modelCardTextEdit.setPlainText(model_card_text(entry) if entry else "")
        self.updateButtons()

    def onDeleteModel(self):
        entry = self._selectedModelEntry()
        if not entry:
            return
        if not slicer.util.confirmYesNoDisplay(
                f"Delete {model_label(entry)} and its report files? This cannot be undone."):
            return
        with slicer.util.tryWithErrorDisplay("The model could not be deleted.", waitCursor=True):
            self.logic.deleteModel(entry)
            if self._parameterNode and self._parameterNode.model == entry.get("path"):
                self._parameterNode.model = "student"
        self.onRefreshModels()

    def onOpenModelsFolder(self):
        entry = self._selectedModelEntry()
        folder = Path(entry["path"]).parent if entry and entry.get("path") else self.logic.userModelsDir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Python packages could not be installed.", waitCursor=True):
            if self.logic.ensureDependencies(askUser=True):
                slicer.util.infoDisplay("All the Python packages KD Segmentation needs are installed.")
                self.onRefreshModels()


#
# Logic
#

class KDSegmentationLogic(ScriptedLoadableModuleLogic, VTKObservationMixin):
    """Runs the engine process without blocking the GUI; usable from the Python console and scripts.

    >>> logic = KDSegmentationLogic()
    >>> run = logic.segment(volumeNode, "liver", wait=True)
    >>> run.status, run.message, run.output  # output: the segmentation node
    """

    POLL_INTERVAL_MS = 100
    DISTILL_STOP_GRACE_S = 30.0

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        VTKObservationMixin.__init__(self)
        self.keepWorker = True
        # process handling is Slicer-free (KDSegmentationLib.client); this class adds the scene around it
        self.runs = RunManager(python_executable=self.pythonExecutable)
        self.runs.on_segment_result = self._importResult
        self.runs.on_metric = self._updatePlot
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        # Scripts use the Logic without the panel: it must itself let go of the nodes of a closing scene.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

    def getParameterNode(self):
        return KDSegmentationParameterNode(super().getParameterNode())

    # -- environment --------------------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable():
        return engine_python()

    @staticmethod
    def userModelsDir():
        return user_models_dir()

    @staticmethod
    def shippedModelPath(task, role):
        return shipped_models_dir() / TASKS[task].shipped_model_file(role)

    @staticmethod
    def missingDependencies():
        """Python packages to install (checked from package metadata: nothing heavy is imported)."""
        missing = [] if installed_version("torch") else ["torch" + TORCH_REQUIREMENT]
        return missing + missing_requirements(SLICER_REQUIREMENTS)

    def ensureDependencies(self, askUser=True):
        """Install what is missing, after asking; torch through the PyTorch extension so it matches the GPU."""
        missing = self.missingDependencies()
        if not missing:
            return True
        if askUser and not slicer.util.confirmOkCancelDisplay(
                "KD Segmentation needs these Python packages: " + ", ".join(missing) + ".\n\n"
                "Install them now? This downloads several hundred MB and can take a few minutes.",
                windowTitle="Install Python packages"):
            return False
        if any(req.startswith("torch") for req in missing):
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("KD Segmentation needs the PyTorch extension. Install 'PyTorch' from the "
                                   "Extensions Manager, restart Slicer and try again.") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise RuntimeError("PyTorch was not installed. Install it from the PyTorch Utils module and retry.")
        # After torch, so that pip sees it installed and does not fetch another build from PyPI.
        others = [req for req in missing if not req.startswith("torch")]
        if others:
            slicer.util.pip_install(" ".join(others))
        stillMissing = self.missingDependencies()
        if stillMissing:
            raise RuntimeError("These packages are still missing after the installation: " + ", ".join(stillMissing))
        return True

    # -- state --------------------------------------------------------------------------------------------
    def isSegmenting(self):
        return self.runs.busy("segment") is not None

    def isDistilling(self):
        return self.runs.busy("distill") is not None

    def shutdown(self):
        """Stop every child process (module unloaded or application closing)."""
        self.removeObservers()
        self.runs.shutdown()
        self._timer.stop()

    def onSceneStartClose(self, caller=None, event=None):
        """The nodes of a running segmentation are about to disappear: cancel it (a distillation keeps running)."""
        self.cancelSegmentation()
        self.forgetSceneNodes()

    def forgetSceneNodes(self):
        """The scene is closing: drop references to its nodes (a distillation keeps running)."""
        run = self.runs.busy("distill")
        if run is not None:
            run.context.pop("plot", None)

    def waitFor(self, run, timeoutS=None):
        """Block until ``run`` ends, keeping the application responsive (for scripts and tests)."""
        return self.runs.wait(run, timeout_s=timeoutS, idle=slicer.app.processEvents)

    def _poll(self):
        self.runs.poll()
        if not self.runs.active:
            self._timer.stop()

    def _start(self, run, wait):
        self._timer.start()
        if wait:
            self.waitFor(run)
        return run

    # -- segmentation -------------------------------------------------------------------------------------
    def segment(self, inputVolume, task, model="student", device="auto", seedNode=None, outputSegmentation=None,
                keepWorker=None, progressCallback=None, logCallback=None, finishedCallback=None, wait=False):
        """Segment ``inputVolume``; returns the run at once (when it is done with ``wait=True``).

        The result is loaded into ``outputSegmentation`` (a new segmentation node if None) on the input's
        geometry, under the input's study in the subject hierarchy; ``run.output`` is that node.
        """
        if self.isSegmenting():
            raise RuntimeError("A segmentation is already running; cancel it first.")
        spec = self._taskSpec(task)
        if inputVolume is None:
            raise ValueError("Select an input volume.")
        self.checkInputVolume(inputVolume, spec)
        seed = self.seedPointRas(seedNode, inputVolume) if spec.needs_seed else None

        run = Run("segment", progressCallback, self._logger(logCallback), finishedCallback)
        run.task, run.model, run.device, run.seed = task, model, device, seed
        run.use_persistent = self.keepWorker if keepWorker is None else bool(keepWorker)
        run.context.update(inputVolume=inputVolume, outputSegmentation=outputSegmentation)
        run.temp_dir = self._makeTempDir()
        try:
            run.input_path = self.exportVolume(inputVolume, run.temp_dir)
            run.output_path = os.path.join(run.temp_dir, "result.seg.nrrd")
            self.runs.start_segment(run)
        except Exception:
            shutil.rmtree(run.temp_dir, ignore_errors=True)
            raise
        return self._start(run, wait)

    def cancelSegmentation(self):
        run = self.runs.busy("segment")
        if run is not None:
            self.runs.cancel(run)

    def checkInputVolume(self, volumeNode, spec):
        """Refuse an image of the wrong kind before starting (a photograph for CT, or the reverse)."""
        isColour = volumeNode.IsA("vtkMRMLVectorVolumeNode")
        if spec.input_kind == "2d-rgb" and not isColour:
            raise ValueError(f"{spec.title} needs a colour fundus photograph; {volumeNode.GetName()} is a "
                             "grey-level volume. Load the photograph (PNG, JPG, TIFF) with Add Data.")
        if spec.input_kind != "2d-rgb" and isColour:
            raise ValueError(f"{spec.title} needs a CT volume; {volumeNode.GetName()} is a colour image.")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"{volumeNode.GetName()} has no image data.")

    def seedPointRas(self, seedNode, inputVolume=None):
        """First point of ``seedNode`` in RAS millimetres (the frame of the exported volume)."""
        if seedNode is None or seedNode.GetNumberOfControlPoints() < 1:
            raise ValueError("Place a seed point inside the nodule (Nodule seed point, then click in a slice view).")
        if inputVolume is not None and inputVolume.GetParentTransformNode() is not None:
            # The volume is written without its transform, so a world point would not match its voxels.
            raise ValueError(f"{inputVolume.GetName()} is under a transform; harden or remove it (Transforms "
                             "module) before segmenting a nodule.")
        position = [0.0, 0.0, 0.0]
        seedNode.GetNthControlPointPositionWorld(0, position)
        return tuple(float(v) for v in position)

    def exportVolume(self, volumeNode, folder, fileName="input.nrrd"):
        """Write a volume (scalar or colour) to an uncompressed NRRD with its geometry; returns the path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(str(folder), fileName)
        storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(path)
            # Raw is several times faster to write and read than gzip, and the file is deleted after the run.
            storageNode.UseCompressionOff()
            if not storageNode.WriteData(volumeNode):
                raise RuntimeError(f"Could not write {volumeNode.GetName()} to {path}.")
        finally:
            slicer.mrmlScene.RemoveNode(storageNode)
        return path

    def importSegmentation(self, path, inputVolume, outputSegmentation=None, name=None):
        """Load a ``.seg.nrrd`` into ``outputSegmentation`` (or a new node), tied to ``inputVolume``.

        Read by Slicer's own segmentation reader, as a file dropped on the application would be.
        """
        loaded = slicer.modules.segmentations.logic().LoadSegmentationFromFile(
            str(path), True, slicer.mrmlScene.GenerateUniqueName(name or "Segmentation"))
        if loaded is None:
            raise RuntimeError(f"Slicer could not read the result {path}.")
        if outputSegmentation is None:
            outputSegmentation = loaded
        else:
            outputSegmentation.GetSegmentation().DeepCopy(loaded.GetSegmentation())
            slicer.mrmlScene.RemoveNode(loaded)
        storageNode = outputSegmentation.GetStorageNode()
        if storageNode is not None:
            # It points into the temporary folder; without it, Save marks the segmentation as new data.
            outputSegmentation.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storageNode)
        outputSegmentation.CreateDefaultDisplayNodes()
        # Reference geometry = the input volume: needed to edit on its grid and to export DICOM SEG.
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        outputSegmentation.SetNodeReferenceID(outputSegmentation.GetReferenceImageGeometryReferenceRole(),
                                              inputVolume.GetID())
        outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
        shNode.SetItemParent(shNode.GetItemByDataNode(outputSegmentation), studyItem)
        return outputSegmentation

    def _importResult(self, run):
        """RunManager hook: the engine wrote the result; load it into the scene and return the summary."""
        inputVolume = run.context["inputVolume"]
        name = f"{inputVolume.GetName()} {TASKS[run.task].title.split(' (')[0]}"
        path = run.result.get("path") or run.output_path
        run.output = self.importSegmentation(path, inputVolume, run.context.get("outputSegmentation"), name)
        return format_volumes(run.result)

    # -- local distillation -------------------------------------------------------------------------------
    def distill(self, task, teacherPath=None, dataFolder=None, unlabelledFolder=None, volumeNodes=None,
                referenceSegmentations=None, alpha=0.5, temperature=2.0, epochs=0, maxMinutes=10.0,
                outputPath=None, progressCallback=None, logCallback=None, finishedCallback=None, wait=False,
                initPath="student", teacherTargets="stored"):
        """Distil a new student from ``teacherPath`` (default: the shipped teacher) on scene volumes or a folder.

        The new student starts from ``initPath`` ("student": the shipped one; None: a new network) and is scored on
        the labelled cases before and after; the teacher's soft labels are computed once per image
        (``teacherTargets`` "stored", several times faster per step than "online"). The new model goes to a new
        versioned file in the user's model folder (never over an existing one).
        """
        if self.isDistilling():
            raise RuntimeError("A distillation is already running; cancel it first.")
        spec = self._taskSpec(task)
        # one teacher file, or an ensemble of them joined by commas (the engine averages their probabilities)
        teachers = [Path(p.strip()) for p in str(teacherPath).split(",")] if teacherPath else \
            [self.shippedModelPath(task, "teacher")]
        for teacher in teachers:
            if not teacher.is_file():
                raise ValueError(f"Teacher model {teacher} not found; choose a teacher model file (*.kdseg.pt).")
        teacher = ",".join(str(t) for t in teachers)
        init = self.shippedModelPath(task, "student") if initPath == "student" else initPath
        if init and not Path(init).is_file():
            raise ValueError(f"Student model {init} not found; choose a student model file (*.kdseg.pt).")
        if not epochs and not maxMinutes:
            raise ValueError("Set a number of epochs or a time budget.")
        outputPath = Path(outputPath) if outputPath else next_model_path(self.userModelsDir(), task)
        if outputPath.exists():
            raise ValueError(f"{outputPath} already exists; models are never overwritten.")

        run = Run("distill", progressCallback, self._logger(logCallback), finishedCallback)
        run.task, run.model_path = task, outputPath
        run.temp_dir = self._makeTempDir()
        try:
            if volumeNodes:
                dataFolder, unlabelledFolder = self.exportDistillationData(
                    volumeNodes, referenceSegmentations or [], spec, run.temp_dir)
            elif not dataFolder:
                raise ValueError("Choose volumes from the scene or a dataset folder.")
            elif not Path(dataFolder).is_dir():
                raise ValueError(f"Folder {dataFolder} does not exist.")
            outputPath.parent.mkdir(parents=True, exist_ok=True)
            command = distill_command(
                self.pythonExecutable(), task, teacher, dataFolder, outputPath, unlabelled=unlabelledFolder,
                alpha=alpha, temperature=temperature, max_minutes=maxMinutes or None, epochs=epochs or None,
                init=init, teacher_targets=teacherTargets)
            self.runs.start_command(run, command)
        except Exception:
            shutil.rmtree(run.temp_dir, ignore_errors=True)
            raise
        run.context["plot"] = self._createPlot(task)
        return self._start(run, wait)

    def exportDistillationData(self, volumeNodes, referenceSegmentations, spec, folder):
        """Write scene volumes for the engine; returns ``(dataFolder, unlabelledFolder or None)``.

        A volume with a reference segmentation (one whose reference geometry is that volume) goes to
        ``data/images`` + ``data/labels`` (labelmap with the task's label values); the others to ``unlabelled``.
        """
        references = {}
        for segmentationNode in referenceSegmentations:
            referenced = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
            if referenced is not None:
                references[referenced.GetID()] = segmentationNode
        dataDir = Path(folder) / "data"
        unlabelledDir = Path(folder) / "unlabelled"
        labelled = unlabelled = 0
        for index, volumeNode in enumerate(volumeNodes):
            self.checkInputVolume(volumeNode, spec)
            name = f"{index:03d}_{safe_name(volumeNode.GetName())}"
            segmentationNode = references.get(volumeNode.GetID())
            if segmentationNode is not None:
                self.exportVolume(volumeNode, dataDir / "images", name + ".nrrd")
                self.exportReferenceLabelmap(segmentationNode, volumeNode, spec, dataDir / "labels", name + ".nrrd")
                labelled += 1
            else:
                self.exportVolume(volumeNode, unlabelledDir, name + ".nrrd")
                unlabelled += 1
        if not labelled:
            return str(unlabelledDir), None
        return str(dataDir), (str(unlabelledDir) if unlabelled else None)

    def exportReferenceLabelmap(self, segmentationNode, volumeNode, spec, folder, fileName):
        """A labelmap on the volume's grid whose values are the task's label values, matched by segment name."""
        import numpy as np

        segmentation = segmentationNode.GetSegmentation()
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            combined = None
            for label in spec.labels:
                segmentId = segmentation.GetSegmentIdBySegmentName(label.name)
                if not segmentId:
                    continue
                if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                        segmentationNode, [segmentId], labelmapNode, volumeNode,
                        slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                    raise RuntimeError(f"Could not export segment {label.name} of {segmentationNode.GetName()}.")
                mask = slicer.util.arrayFromVolume(labelmapNode) > 0
                if combined is None:
                    combined = np.zeros(mask.shape, np.uint8)
                combined[mask] = label.value
            if combined is None:
                names = ", ".join(label.name for label in spec.labels)
                raise ValueError(f"{segmentationNode.GetName()} has no segment named {names}; rename its segments "
                                 "to match the task.")
            slicer.util.updateVolumeFromArray(labelmapNode, combined)
            return self.exportVolume(labelmapNode, folder, fileName)
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)

    def cancelDistillation(self):
        """Ask the trainer to stop cleanly; it is killed if it has not stopped after a grace period."""
        run = self.runs.busy("distill")
        if run is not None:
            self.runs.request_stop(run, self.DISTILL_STOP_GRACE_S)
            self._timer.start()

    def _createPlot(self, task):
        """Live plot of the training loss and the validation Dice (Slicer plot nodes, shown in the layout)."""
        scene = slicer.mrmlScene
        title = f"KD distillation ({task})"
        plot = {"lossTable": scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} loss"),
                "diceTable": scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} validation Dice"),
                "chart": scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title),
                "lastUpdate": 0.0}
        plot["chart"].SetTitle(title)
        for tableKey, column, color in (("lossTable", "loss", (0.85, 0.3, 0.1)),
                                        ("diceTable", "val_dice", (0.1, 0.45, 0.85))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{title} {column}")
            series.SetAndObserveTableNodeID(plot[tableKey].GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeLine)
            series.SetColor(*color)
            plot["chart"].AddAndObservePlotSeriesNodeID(series.GetID())
        slicer.modules.plots.logic().ShowChartInLayout(plot["chart"])
        return plot

    def _updatePlot(self, run):
        """RunManager hook, called on each metric: refresh the plot at most once a second (and at the end)."""
        plot = run.context.get("plot")
        if plot is None:
            return
        now = time.monotonic()
        if run.process.running and now - plot["lastUpdate"] < 1.0:
            return
        plot["lastUpdate"] = now
        import numpy as np

        history = run.metrics
        if history.loss:
            slicer.util.updateTableFromArray(plot["lossTable"], [np.array(history.loss_x), np.array(history.loss)],
                                             ["step", "loss"])
        if history.dice:
            slicer.util.updateTableFromArray(plot["diceTable"], [np.array(history.dice_x), np.array(history.dice)],
                                             ["step", "val_dice"])

    # -- model list ---------------------------------------------------------------------------------------
    def listModels(self, callback):
        """Ask the engine for the shipped and local models (with their cards); ``callback(entries, error)``."""
        def finished(run):
            callback(run.result or [], None if run.status == "succeeded" else (run.message or run.status))

        run = Run("models", finished_callback=finished)
        self.runs.start_command(run, models_list_command(self.pythonExecutable()))
        return self._start(run, wait=False)

    def deleteModel(self, entry):
        return delete_user_model(entry, self.userModelsDir())

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _logger(logCallback):
        def log(message, level="info"):
            {"warning": logging.warning, "error": logging.error}.get(level, logging.info)("KDSegmentation: %s", message)
            if logCallback:
                logCallback(message, level)
        return log

    @staticmethod
    def _taskSpec(task):
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
        return TASKS[task]

    @staticmethod
    def _makeTempDir():
        return tempfile.mkdtemp(prefix="KDSegmentation-", dir=slicer.app.temporaryPath)


#
# Test
#

class KDSegmentationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: each bundled sample through its task, checking names, sizes and geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExportAndImportKeepGeometry()
        self.setUp()
        self.test_SegmentBundledSamples()

    def test_ExportAndImportKeepGeometry(self):
        import numpy as np

        logic = KDSegmentationLogic()
        volume = slicer.util.addVolumeFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6),
                                                ijkToRAS=np.diag([0.7, 0.8, 2.5, 1.0]), name="geometry")
        folder = tempfile.mkdtemp(prefix="KDSegmentationTest-", dir=slicer.app.temporaryPath)
        try:
            path = logic.exportVolume(volume, folder)
            reloaded = slicer.util.loadVolume(path)
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(reloaded),
                                           slicer.util.arrayFromVolume(volume)))
            for loadedSpacing, spacing in zip(reloaded.GetSpacing(), volume.GetSpacing()):
                self.assertAlmostEqual(loadedSpacing, spacing, places=5)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def test_SegmentBundledSamples(self):
        logic = KDSegmentationLogic()
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay("Skipped: Python packages missing: " + ", ".join(missing))
            return
        samples = find_samples(resourcesDir() / "Samples")
        self.assertTrue(samples, "no bundled samples")
        try:
            for sample in samples:
                self._segmentSample(logic, sample)
        finally:
            logic.shutdown()

    def _segmentSample(self, logic, sample):
        task = sample["task"]
        spec = TASKS[task]
        if not logic.shippedModelPath(task, "student").is_file():
            self.delayDisplay(f"Skipped {task}: no shipped student model")
            return
        self.delayDisplay(f"Segmenting the {task} sample")
        volume = slicer.util.loadVolume(sample["path"])
        seedNode = None
        if spec.needs_seed:
            seedNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
            seedNode.AddControlPoint(vtk.vtkVector3d(*sample["seed_ras"]))
        run = logic.segment(volume, task, seedNode=seedNode, wait=True)
        self.assertEqual(run.status, "succeeded", run.message)

        segmentation = run.output.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertIn(spec.labels[0].name, names)
        self.assertTrue(set(names) <= {label.name for label in spec.labels}, names)

        stats = run.result["segments"][spec.labels[0].name]
        if "volume_ml" in stats:
            # plausible sizes: a liver (possibly cut by the field of view) 0.1-5 L, a nodule a few mm3 to tens of mL
            low, high = (100.0, 5000.0) if task == "liver" else (0.005, 50.0)
            self.assertTrue(low <= stats["volume_ml"] <= high, stats)
        else:
            self.assertTrue(0.02 <= stats["fraction_of_fov"] <= 0.4, stats)

        segmentationNode = run.output
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentationNode.GetNodeReference(role).GetID(), volume.GetID())
        volumeBounds = [0.0] * 6
        segmentBounds = [0.0] * 6
        volume.GetRASBounds(volumeBounds)
        segmentationNode.GetRASBounds(segmentBounds)
        tolerance = max(volume.GetSpacing())
        for axis in range(3):
            self.assertGreaterEqual(segmentBounds[2 * axis], volumeBounds[2 * axis] - tolerance)
            self.assertLessEqual(segmentBounds[2 * axis + 1], volumeBounds[2 * axis + 1] + tolerance)
        self.delayDisplay(f"{task}: {run.message}")
