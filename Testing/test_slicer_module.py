"""Checks of the Slicer module that need no Slicer: it compiles, its .ui and code agree, every Slicer API name it uses
is on the checked list (Testing/slicer_api_names.json), and nothing heavy is imported at start-up."""
from __future__ import annotations

import ast
import json
import py_compile
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "KDSegmentation" / "KDSegmentation.py"
LIB_DIR = REPO / "KDSegmentation" / "KDSegmentationLib"
UI_FILE = REPO / "Resources" / "UI" / "KDSegmentation.ui"
NAMES_FILE = REPO / "Testing" / "slicer_api_names.json"

# Modules whose names must be checked against Slicer's source.
WATCHED_MODULES = {"slicer", "qt", "ctk", "vtk", "SampleData", "PyTorchUtils", "vtkSlicerMarkupsModuleMRMLPython"}
HEAVY_MODULES = {"torch", "monai", "SimpleITK", "numpy", "scipy", "nibabel", "skimage", "PyTorchUtils",
                 "SampleData"}
# Widgets a user changes; each must be used by the code or bound to the parameter node.
INPUT_WIDGET_CLASSES = {
    "QComboBox", "ctkComboBox", "QSpinBox", "QDoubleSpinBox", "ctkDoubleSpinBox", "QCheckBox", "ctkCheckBox",
    "QRadioButton", "QLineEdit", "QPushButton", "QToolButton", "QListWidget", "QTableWidget", "QSlider",
    "ctkSliderWidget", "ctkRangeWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "ctkPathLineEdit",
    "ctkDirectoryButton", "qSlicerMarkupsPlaceWidget", "qSlicerSimpleMarkupsWidget",
    "qMRMLSegmentationShow3DButton", "QPlainTextEdit", "QTextEdit",
}
VTK_STYLE = re.compile(r"^[A-Z](?=.*[a-z])[A-Za-z0-9]*$")  # GetName, IsA, SetAndObserve...; not CONSTANTS


def _tree(path: Path = MODULE_FILE) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _chain(node: ast.AST):
    """``a.b.c`` for an attribute chain rooted at a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return list(reversed(parts))
    return None


def _imports(tree: ast.Module):
    """(watched aliases -> module, names imported from watched modules -> dotted name, other imported names)."""
    aliases, from_names, others = {}, {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in WATCHED_MODULES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                else:
                    others.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                if module.split(".")[0] in WATCHED_MODULES:
                    from_names[a.asname or a.name] = f"{module}.{a.name}"
                else:
                    others.add(a.asname or a.name)
    return aliases, from_names, others


def used_api_names(tree: ast.Module) -> Dict[str, Set[str]]:
    """``names``: dotted names from Slicer's modules; ``methods``: VTK/MRML-style methods called on objects."""
    aliases, from_names, others = _imports(tree)
    local_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner.add(id(node.value))
    names, methods = set(from_names.values()), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        if chain and chain[0] in aliases:
            if id(node) not in inner:  # only the longest chain
                names.add(".".join([aliases[chain[0]]] + chain[1:]))
            continue
        if chain and chain[0] in from_names:
            if id(node) not in inner:
                names.add(".".join([from_names[chain[0]]] + chain[1:]))
            continue
        if chain and (chain[0] in others or chain[0] in local_classes):
            continue  # os.path..., Path..., worker..., Device.AUTO
        if VTK_STYLE.match(node.attr):
            methods.add(node.attr)
    return {"names": names, "methods": methods}


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for w in root.iter("widget"):
        props = {}
        for p in w.findall("property"):
            value = p.find("string")
            if value is None:
                value = p.find("bool")
            props[p.get("name")] = value.text if value is not None else None
        widgets[w.get("name")] = (w.get("class"), props)
    layouts = {lay.get("name") for lay in root.iter("layout")}
    return root, widgets, layouts


def ui_attributes_used(tree: ast.Module) -> Set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            value = node.value
            if (isinstance(value, ast.Attribute) and value.attr == "ui" and isinstance(value.value, ast.Name)
                    and value.value.id == "self"):
                used.add(node.attr)
    return used


def parameter_names(tree: ast.Module) -> Set[str]:
    """Fields of the classes decorated with parameterNodeWrapper."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
                or (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "parameterNodeWrapper")
                for d in node.decorator_list):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
    return names


def load_checked_names():
    return json.loads(NAMES_FILE.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------

def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "KDSegmentation.pyc"), doraise=True)
    names = {n.name for n in _tree().body if isinstance(n, ast.ClassDef)}
    # the four classes of Slicer's scripted-module template
    assert {"KDSegmentation", "KDSegmentationWidget", "KDSegmentationLogic", "KDSegmentationTest"} <= names


def test_every_ui_name_used_in_code_exists_in_the_ui():
    _, widgets, layouts = ui_widgets()
    missing = ui_attributes_used(_tree()) - set(widgets) - layouts
    assert not missing, f"self.ui names not in {UI_FILE.name}: {sorted(missing)}"


def test_every_input_widget_is_wired():
    tree = _tree()
    _, widgets, _ = ui_widgets()
    used = ui_attributes_used(tree)
    params = parameter_names(tree)
    unwired = []
    for name, (cls, props) in widgets.items():
        if cls not in INPUT_WIDGET_CLASSES:
            continue
        if cls in ("QPlainTextEdit", "QTextEdit") and props.get("readOnly") == "true" and name not in used:
            unwired.append(name)  # an output field nobody writes to
            continue
        if name in used or props.get("SlicerParameterName") in params:
            continue
        unwired.append(name)
    assert not unwired, f"input widgets neither used in code nor bound to the parameter node: {sorted(unwired)}"


def test_parameter_bindings_and_ui_connections_are_valid():
    tree = _tree()
    root, widgets, _ = ui_widgets()
    params = parameter_names(tree)
    bound = {props["SlicerParameterName"] for _, props in widgets.values() if props.get("SlicerParameterName")}
    # connectGui raises at run time for a name the parameter node does not have
    assert bound <= params, f"SlicerParameterName not declared in the parameter node: {sorted(bound - params)}"
    top = root.find("widget").get("name")
    for conn in root.iter("connection"):
        for role in ("sender", "receiver"):
            name = conn.find(role).text
            assert name == top or name in widgets, f"connection {role} {name} is not a widget of the .ui"


def test_every_slicer_api_name_is_on_the_checked_list():
    checked = load_checked_names()
    used = used_api_names(_tree())
    for kind in ("names", "methods"):
        listed = set(checked[kind])
        unlisted = used[kind] - listed
        assert not unlisted, (f"{kind} used by KDSegmentation.py but not checked against Slicer's source "
                              f"(add them to {NAMES_FILE.name} with the file you checked): {sorted(unlisted)}")
        stale = listed - used[kind]
        assert not stale, f"{kind} listed in {NAMES_FILE.name} but no longer used: {sorted(stale)}"


def test_every_ui_widget_class_is_on_the_checked_list():
    _, widgets, _ = ui_widgets()
    root = ET.parse(UI_FILE).getroot()
    classes = {cls for cls, _ in widgets.values()} | {c.find("class").text for c in root.iter("customwidget")}
    checked = set(load_checked_names()["ui_classes"])
    assert classes <= checked, f"widget classes not checked: {sorted(classes - checked)}"


def test_checked_list_says_where_each_name_was_checked():
    checked = load_checked_names()
    for kind in ("names", "methods", "ui_classes"):
        for name, source in checked[kind].items():
            assert isinstance(source, str) and re.match(r"^[\w.-]+/[\w.-]+:\S", source), (kind, name, source)


def test_no_heavy_import_at_module_scope_or_in_constructors():
    tree = _tree()

    def heavy_imports(nodes):
        found = []
        for node in nodes:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    found += [a.name for a in sub.names if a.name.split(".")[0] in HEAVY_MODULES]
                elif isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in HEAVY_MODULES:
                    found.append(sub.module)
        return found

    top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not heavy_imports(top_level), "heavy import at module scope"
    constructors = [f for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
                    if isinstance(f, ast.FunctionDef) and f.name in ("__init__", "setup")]
    assert not heavy_imports(constructors), "heavy import in a constructor or setup()"


def test_engine_modules_imported_by_the_panel_stay_light():
    modules = set()
    for node in _tree().body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("KDSegmentationLib"):
            if node.module == "KDSegmentationLib":
                modules |= {f"KDSegmentationLib.{a.name}" for a in node.names}
            else:
                modules.add(node.module)
    assert modules
    code = ("import importlib, sys\n"
            f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
            f"print(','.join(sorted(m for m in {sorted(HEAVY_MODULES)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO / "KDSegmentation"), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {sorted(modules)} loads {out.stdout.strip()}"


@pytest.mark.parametrize("path", sorted(LIB_DIR.rglob("*.py")), ids=lambda p: p.relative_to(LIB_DIR).as_posix())
def test_engine_never_imports_slicer(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        bad = roots & {"slicer", "qt", "ctk", "vtk", "SampleData", "PyTorchUtils"}
        assert not bad, f"{path.name} imports {bad}: KDSegmentationLib must run without Slicer"


def test_collector_sees_chains_and_methods():
    # guard the guard: the collector must not silently miss names
    tree = ast.parse("import slicer, qt\nfrom slicer.util import VTKObservationMixin\nimport os\n"
                     "def f(n):\n"
                     "    slicer.util.loadSegmentation('x').GetSegmentation()\n"
                     "    qt.QTimer.singleShot(1, f)\n"
                     "    n.SetName('a'); n.GetID(); os.path.join('a')\n"
                     "    VTKObservationMixin.addObserver\n")
    used = used_api_names(tree)
    assert used["names"] == {"slicer.util.loadSegmentation", "qt.QTimer.singleShot", "slicer.util.VTKObservationMixin",
                             "slicer.util.VTKObservationMixin.addObserver"}
    assert used["methods"] == {"GetSegmentation", "SetName", "GetID"}
