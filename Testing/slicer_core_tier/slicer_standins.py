"""Stand-ins for the parts of 3D Slicer that the ``slicer-core`` wheel does not ship, and nothing else.

The wheel has MRML and the module logics but no Qt (``qt``, ``ctk``), no application object (``slicer.app``), no
module registry (``slicer.modules``) and none of Slicer's pure-Python scripted-module support. This file provides:

- ``SampleData``: the Sample Data module's registry (a Qt module);
- ``qt`` / ``ctk``: a ``QTimer`` whose timeouts fire when ``slicer.app.processEvents()`` is called (Qt's event loop),
  and inert placeholders for widget classes (the panel's widgets need a real Slicer; see Testing/SLICER.md);
- ``slicer.app``: temporary folder, ``processEvents``, ``startupCompleted`` connections, testing mode;
- ``slicer.modules.<name>.logic()``: the *real* logics of the wheel, bound to the test's real ``vtkMRMLScene``;
- ``vtkSlicer*ModuleMRMLPython`` / ``...LogicPython`` names: Slicer exposes each loadable module's wrapped library
  under that top-level name; the wheel has the same libraries under ``slicer_core``. Only classes that really are in
  those libraries can be imported from them, as in Slicer 5.10+;
- Slicer's pure-Python ``ScriptedLoadableModule``, ``parameterNodeWrapper`` and ``i18n`` from ``../shared/slicer-5.12``
  (Slicer's own files, test fixtures only).
"""
from __future__ import annotations

import importlib
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable, Dict, List

SLICER_FILES = Path(__file__).resolve().parents[3] / "shared" / "slicer-5.12"
SLICER_PYTHON = SLICER_FILES / "Base" / "Python" / "slicer"
MODULE_FILE = Path(__file__).resolve().parents[2] / "KDSegmentation" / "KDSegmentation.py"
TERMINOLOGY_LISTS = SLICER_FILES / "Modules" / "Loadable" / "Terminologies" / "Resources"


class _Placeholder:
    """Any Qt/CTK class or constant the code names but these tests never drive (widgets, enums)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __getattr__(self, name):
        return _Placeholder()

    def __or__(self, other):
        return self


class _LenientModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {})
        setattr(self, name, placeholder)
        return placeholder


class QTimer:
    """Qt's timer as far as a scripted module uses it: timeouts fire from :meth:`App.processEvents`."""

    active: List["QTimer"] = []

    def __init__(self, *args):
        self.interval = 0
        self.singleShot = False
        self._slots: List[Callable[[], None]] = []

    def setInterval(self, ms):
        self.interval = int(ms)

    def connect(self, signal, slot):
        assert signal == "timeout()", signal
        self._slots.append(slot)

    def start(self, *args):
        if self not in QTimer.active:
            QTimer.active.append(self)

    def stop(self):
        if self in QTimer.active:
            QTimer.active.remove(self)

    def isActive(self):
        return self in QTimer.active

    def fire(self):
        for slot in list(self._slots):
            slot()


class App:
    """``slicer.app`` as far as the Logic needs it."""

    def __init__(self, temporary_path: str):
        self.temporaryPath = temporary_path
        self.applicationName = "Slicer"
        self._startup_slots: List[Callable[[], None]] = []

    def processEvents(self, *args):
        for timer in list(QTimer.active):
            timer.fire()

    def connect(self, signal, slot):
        if signal == "startupCompleted()":
            self._startup_slots.append(slot)

    def completeStartup(self):
        for slot in self._startup_slots:
            slot()

    def translate(self, context, text):
        return text  # Qt's translator with no translation installed

    def coreIOManager(self):
        return IOManager()

    ioManager = coreIOManager

    def testingEnabled(self):
        return True

    def setOverrideCursor(self, *args):
        pass

    def restoreOverrideCursor(self):
        pass


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def add_photo_volume(slicer, path, name=None):
    """A colour photograph as Slicer's reader loads it: a one-slice vector volume, IJK-to-RAS ``diag(-1, -1, 1)``
    (ITK's LPS identity). The wheel has no PNG/JPEG reader, so the pixels come through an array."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))[None]  # (1, rows, columns, 3)
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return slicer.util.addVolumeFromArray(rgb, ijkToRAS=ijk_to_ras, name=name or Path(path).stem,
                                          nodeClassName="vtkMRMLVectorVolumeNode")


class IOManager:
    """The application's IO manager, delegating to the wheel's real readers (photographs through an array)."""

    def fileType(self, filename):
        return "SegmentationFile" if str(filename).lower().endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes, userMessages=None):
        import slicer

        path = str(properties["fileName"])
        name = properties.get("name") or Path(path).name.split(".")[0]
        if fileType == "SegmentationFile":
            node = slicer.modules.segmentations.logic().LoadSegmentationFromFile(path, True, name)
        elif path.lower().endswith(PHOTO_SUFFIXES):
            node = add_photo_volume(slicer, path, name)
        else:
            node = slicer.modules.volumes.logic().AddArchetypeVolume(path, name, 0)
        if node is None:
            return False
        loadedNodes.AddItem(node)
        return True


class SampleDataLogic:
    """The Sample Data module's registry (a Qt module, not in the wheel): records what modules register."""

    sources: List[dict] = []

    @classmethod
    def registerCustomSampleDataSource(cls, **kwargs):
        cls.sources.append(kwargs)


class _ModuleEntry:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def _real_logics(scene, slicer, home: Path) -> Dict[str, object]:
    """The wheel's module logics on ``scene`` (as Slicer's application logic would set them up); ``home`` is an
    empty Slicer home folder (no user colour tables, no extensions)."""
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    application_logic.SetHomeDirectory(str(home))
    application_logic.SetShareDirectory("share")
    logics = {"application": application_logic}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic),
                      ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("terminologies", slicer.vtkSlicerTerminologiesModuleLogic),
                      ("plots", slicer.vtkSlicerPlotsLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(application_logic)
        if name == "terminologies":
            logic.SetModuleShareDirectory(_terminology_share_directory())
        logic.SetMRMLScene(scene)
        application_logic.SetModuleLogic(name.capitalize(), logic)  # how logics find each other (Volumes -> Colors)
        logics[name] = logic
    return logics


def _create_hierarchy_items_for_new_nodes(slicer, scene) -> None:
    """Slicer's subject-hierarchy plugin logic (Qt, not in the wheel) gives each new data node an item under the
    scene; the same here, for the node kinds whose plugins Slicer has (volumes, segmentations, markups, tables,
    charts)."""
    import vtk

    owned = ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsNode", "vtkMRMLTableNode",
             "vtkMRMLPlotChartNode", "vtkMRMLModelNode")

    def on_node_added(caller, event, node):
        if node is None or node.GetHideFromEditors() or not any(node.IsA(kind) for kind in owned):
            return
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)

    on_node_added.CallDataType = vtk.VTK_OBJECT
    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, on_node_added)


def _terminology_share_directory() -> str:
    """Slicer's terminology lists under the ``.term.json`` names the logic loads at start-up."""
    folder = Path(tempfile.gettempdir()) / "slicer-core-terminologies"
    folder.mkdir(exist_ok=True)
    for source in TERMINOLOGY_LISTS.glob("*.json"):
        target = folder / (source.stem + ".term.json")
        if not target.exists():
            target.symlink_to(source)
    return str(folder)


def _alias_wrapped_libraries() -> None:
    """``vtkSlicerXModuleMRMLPython`` -> ``slicer_core.vtkSlicerXModuleMRML`` (Slicer's names for the same libraries)."""
    import slicer_core

    folder = Path(slicer_core.__file__).parent
    for library in folder.glob("vtk*.cpython-*.so"):
        name = library.name.split(".")[0]
        sys.modules.setdefault(name + "Python", importlib.import_module(f"slicer_core.{name}"))


def _add_widget_placeholders(slicer) -> None:
    """``slicer.qMRML*``/``slicer.qSlicer*`` widget classes (Qt, not in the wheel) that Slicer's Python files name."""
    names = set()
    for path in list(SLICER_PYTHON.rglob("*.py")) + [MODULE_FILE]:
        names.update(re.findall(r"slicer\.(q[A-Z]\w+)", path.read_text(encoding="utf-8")))
    for name in names:
        if not hasattr(slicer, name):
            setattr(slicer, name, type(name, (_Placeholder,), {}))


def install(temporary_path: str | None = None):
    """Make ``import slicer`` look like Slicer's Python to a scripted module; returns the ``slicer`` module.

    Idempotent: a second call gives a fresh scene and logics.
    """
    import slicer


    sys.modules.setdefault("qt", _LenientModule("qt"))
    sys.modules["qt"].QTimer = QTimer
    sys.modules.setdefault("SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    sys.modules.setdefault("ctk", _LenientModule("ctk"))
    _add_widget_placeholders(slicer)
    if str(SLICER_PYTHON) not in slicer.__path__:
        slicer.__path__.append(str(SLICER_PYTHON))
    _alias_wrapped_libraries()
    new_scene(slicer, temporary_path or tempfile.mkdtemp(prefix="slicer-app-"))
    return slicer


def new_scene(slicer, temporary_path: str):
    """A fresh real scene with the real logics, as ``slicer.mrmlScene`` / ``slicer.modules``."""
    QTimer.active.clear()
    SampleDataLogic.sources.clear()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    slicer.app = App(temporary_path)
    logics = _real_logics(scene, slicer, Path(temporary_path) / "slicer-home")
    slicer.app.applicationLogic = lambda: logics["application"]
    _create_hierarchy_items_for_new_nodes(slicer, scene)
    slicer.modules = types.SimpleNamespace(**{name: _ModuleEntry(logic) for name, logic in logics.items()
                                              if name != "application"})
    return scene
