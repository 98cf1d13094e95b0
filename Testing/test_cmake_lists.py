"""The CMake files list exactly what the tree holds, and the extension metadata agrees everywhere.

When a file is added or removed under KDSegmentationLib or Resources, run ``python scripts/update_cmake_lists.py``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "KDSegmentation"
SKIP = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"}
FIX = "run: python scripts/update_cmake_lists.py"

# Slicer/Slicer:Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json
INDEX_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
INDEX_REQUIRED = {"$schema", "category", "scm_url"}
INDEX_ALLOWED = INDEX_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
                                  "build_subdirectory", "enabled", "tier"}


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())


def cmake_set(text: str, variable: str) -> List[str]:
    """Items of ``set(VARIABLE ...)`` (comments dropped, quotes removed)."""
    match = re.search(rf"\bset\(\s*{re.escape(variable)}\b(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [t.strip('"') for t in re.findall(r'"[^"]*"|[^\s"]+', _strip_comments(match.group(1)))]


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'\bset\(\s*{re.escape(variable)}\s+"([^"]*)"\s*\)', text)
    assert match, f'set({variable} "...") not found'
    return match.group(1)


def _visible(path: Path, root: Path) -> bool:
    return not any(p.startswith(".") or p in SKIP for p in path.relative_to(root).parts)


def tree_scripts() -> List[str]:
    lib = MODULE_DIR / "KDSegmentationLib"
    return sorted(p.relative_to(MODULE_DIR).as_posix() for p in lib.rglob("*.py") if _visible(p, MODULE_DIR))


def tree_resources() -> List[str]:
    root = REPO / "Resources"
    return sorted("../" + p.relative_to(REPO).as_posix() for p in root.rglob("*")
                  if p.is_file() and _visible(p, REPO))


def module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def top_cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def index_entry() -> Dict:
    return json.loads((REPO / "KDSegmentation.json").read_text(encoding="utf-8"))


def _diff(listed: List[str], expected: List[str]) -> str:
    missing = sorted(set(expected) - set(listed))
    stale = sorted(set(listed) - set(expected))
    return f"missing: {missing}; stale: {stale}; {FIX}"


# ---------------------------------------------------------------------------------------------------------------

def test_module_cmake_lists_every_engine_script():
    text = module_cmake()
    name = re.search(r'set\(\s*MODULE_NAME\s+"?(\w+)"?\s*\)', text).group(1)
    assert name == "KDSegmentation"
    scripts = [s.replace("${MODULE_NAME}", name) for s in cmake_set(text, "MODULE_PYTHON_SCRIPTS")]
    assert "KDSegmentation.py" in scripts and (MODULE_DIR / "KDSegmentation.py").is_file()
    listed = sorted(s for s in scripts if s != "KDSegmentation.py")
    assert len(listed) == len(set(listed)), "duplicate entries"
    assert listed == tree_scripts(), _diff(listed, tree_scripts())


def test_module_cmake_lists_every_resource():
    listed = sorted(cmake_set(module_cmake(), "MODULE_PYTHON_RESOURCES"))
    assert len(listed) == len(set(listed)), "duplicate entries"
    assert listed == tree_resources(), _diff(listed, tree_resources())
    for item in listed:
        assert (MODULE_DIR / item).resolve().is_file(), item
    # the panel cannot start without these
    assert "../Resources/UI/KDSegmentation.ui" in listed
    assert "../Resources/Icons/KDSegmentation.png" in listed


def test_module_cmake_builds_module_with_self_test():
    text = _strip_comments(module_cmake())
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME\s+\$\{MODULE_NAME\}", text)
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)",
                     text, re.S)
    # resources outside the module folder are installed beside the scripted-modules folder
    assert re.search(r"install\(FILES .*Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR", text, re.S)


def test_generator_script_agrees_with_this_test():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_cmake_lists", REPO / "scripts" / "update_cmake_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.script_files(REPO) == tree_scripts()
    assert module.resource_files(REPO) == tree_resources()
    # what the script writes is what the tests above accept (markers intact, nothing else touched)
    rendered = module.render(module_cmake(), module.expected_lists(REPO))
    assert sorted(cmake_set(rendered, "MODULE_PYTHON_RESOURCES")) == tree_resources()
    assert sorted(cmake_set(rendered, "MODULE_PYTHON_SCRIPTS"))[1:] == tree_scripts()
    assert re.sub(r"(?s)# BEGIN GENERATED.*?# END GENERATED", "", rendered) == \
        re.sub(r"(?s)# BEGIN GENERATED.*?# END GENERATED", "", module_cmake())


def test_top_cmake_has_extension_metadata():
    text = top_cmake()
    assert re.search(r"\bproject\(\s*KDSegmentation\s*\)", text)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert cmake_value(text, variable).strip(), variable
    assert cmake_value(text, "EXTENSION_ICONURL").startswith("https://")
    assert all(u.startswith("https://") for u in cmake_value(text, "EXTENSION_SCREENSHOTURLS").split())
    assert "PyTorch" in cmake_value(text, "EXTENSION_DEPENDS").split()
    body = _strip_comments(text)
    assert re.search(r"find_package\(\s*Slicer\s+REQUIRED\s*\)", body)
    assert re.search(r"add_subdirectory\(\s*KDSegmentation\s*\)", body)
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in body
    assert "include(${Slicer_EXTENSION_CPACK})" in body


def test_extensions_index_entry_matches_cmake():
    entry = index_entry()
    text = top_cmake()
    assert set(entry) <= INDEX_ALLOWED, f"keys not in the index schema: {sorted(set(entry) - INDEX_ALLOWED)}"
    assert INDEX_REQUIRED <= set(entry)
    assert entry["$schema"] == INDEX_SCHEMA
    # name: the index file is named after the extension (the CMake project)
    project = re.search(r"\bproject\(\s*(\w+)\s*\)", text).group(1)
    assert (REPO / f"{project}.json").is_file()
    assert entry["category"] == cmake_value(text, "EXTENSION_CATEGORY")
    depends = [d for d in re.split(r"[\s;]+", cmake_value(text, "EXTENSION_DEPENDS")) if d and d != "NA"]
    assert sorted(entry.get("build_dependencies", [])) == sorted(depends)
    # homepage: the repository the index builds from is the one the homepage points to
    homepage = cmake_value(text, "EXTENSION_HOMEPAGE")
    repository = entry["scm_url"].rstrip("/")
    repository = repository[:-4] if repository.endswith(".git") else repository
    assert homepage.startswith(repository), (homepage, entry["scm_url"])
    assert cmake_value(text, "EXTENSION_ICONURL").startswith(repository.replace("github.com", "raw.githubusercontent.com"))


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
