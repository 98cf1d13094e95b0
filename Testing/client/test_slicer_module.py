"""Static checks of the Slicer module: it compiles, its .ui and code agree, and nothing heavy is imported at start-up.

Whether it runs in Slicer is tested against Slicer's real core libraries in Testing/slicer_core_tier."""
from __future__ import annotations

import ast
import py_compile
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Set

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "KDSegmentation" / "KDSegmentation.py"
LIB_DIR = REPO / "KDSegmentation" / "KDSegmentationLib"
UI_FILE = REPO / "Resources" / "UI" / "KDSegmentation.ui"

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


def _tree(path: Path = MODULE_FILE) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


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
