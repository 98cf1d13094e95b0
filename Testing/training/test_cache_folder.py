"""``kdseg cache``: the prepared datasets are listed with their size and cleared, and nothing else is touched."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import LIB_PARENT


def _kdseg(*args, cache):
    env = {"PYTHONPATH": str(LIB_PARENT), "KDSEG_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "KDSegmentationLib", "cache", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cache_info_shows_sizes_and_clear_removes_only_prepared_datasets(tmp_path):
    from test_ddp import _tiny_retina_cache

    root = tmp_path / "cache"
    _tiny_retina_cache(root / "retina-DRIVE-0123456789ab")
    (root / ".tmp-retina-x").mkdir()                         # an interrupted preparation
    (root / "notes").mkdir()                                 # the user's own folder
    (root / "notes" / "keep.txt").write_text("mine")
    info = json.loads(_kdseg("info", "--json", cache=root).stdout)
    sizes = {d["name"]: d["bytes"] for d in info["datasets"]}
    assert set(sizes) == {"retina-DRIVE-0123456789ab", ".tmp-retina-x"} and sizes["retina-DRIVE-0123456789ab"] > 0
    assert info["total_bytes"] == sum(sizes.values())
    text = _kdseg("info", cache=root).stdout
    assert "retina, 4 cases" in text and "interrupted" in text
    cleared = _kdseg("clear", "--json", cache=root)
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["removed"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["notes"] and (root / "notes" / "keep.txt").exists()
