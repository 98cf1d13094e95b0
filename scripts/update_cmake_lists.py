#!/usr/bin/env python3
"""Rewrite the file lists in KDSegmentation/CMakeLists.txt from the tree.

The module's CMake lists every ``KDSegmentationLib`` Python file and every file under the top-level ``Resources``
folder; the parts between ``# BEGIN GENERATED: <name>`` and ``# END GENERATED: <name>`` are replaced.

    python scripts/update_cmake_lists.py          # rewrite
    python scripts/update_cmake_lists.py --check  # exit 1 if the file is stale
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "KDSegmentation"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"}


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p in SKIP_DIRS for p in parts)


def script_files(repo: Path = REPO) -> List[str]:
    """``KDSegmentationLib/...py`` paths, relative to the module folder."""
    module_dir = repo / "KDSegmentation"
    lib = module_dir / "KDSegmentationLib"
    files = [p for p in lib.rglob("*.py") if p.is_file() and _visible(p, module_dir)]
    return sorted(p.relative_to(module_dir).as_posix() for p in files)


def resource_files(repo: Path = REPO) -> List[str]:
    """Every file under ``Resources``, as ``../Resources/...`` (the folder sits beside the module folder)."""
    resources = repo / "Resources"
    if not resources.is_dir():
        return []
    files = [p for p in resources.rglob("*") if p.is_file() and _visible(p, repo)]
    return sorted("../" + p.relative_to(repo).as_posix() for p in files)


def _quote(path: str) -> str:
    # CMake splits unquoted arguments on spaces and ';'
    return f'"{path}"' if re.search(r'[\s;()#"$\\]', path) else path


def render(text: str, lists: Dict[str, List[str]], indent: str = "  ") -> str:
    for name, items in lists.items():
        pattern = re.compile(rf"(?P<begin>^[ \t]*# BEGIN GENERATED: {re.escape(name)}[^\n]*\n)(?P<body>.*?)"
                             rf"(?P<end>^[ \t]*# END GENERATED: {re.escape(name)}[^\n]*$)", re.S | re.M)
        match = pattern.search(text)
        if not match:
            raise SystemExit(f"{CMAKE_FILE}: markers '# BEGIN/END GENERATED: {name}' not found")
        body = "".join(f"{indent}{_quote(item)}\n" for item in items)
        text = text[:match.start("body")] + body + text[match.end("body"):]
    return text


def expected_lists(repo: Path = REPO) -> Dict[str, List[str]]:
    return {"scripts": script_files(repo), "resources": resource_files(repo)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = parser.parse_args(argv)
    current = CMAKE_FILE.read_text(encoding="utf-8")
    updated = render(current, expected_lists())
    if updated == current:
        print(f"{CMAKE_FILE.relative_to(REPO)} is up to date")
        return 0
    if args.check:
        print(f"{CMAKE_FILE.relative_to(REPO)} is stale; run: python scripts/update_cmake_lists.py", file=sys.stderr)
        return 1
    CMAKE_FILE.write_text(updated, encoding="utf-8")
    print(f"updated {CMAKE_FILE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
