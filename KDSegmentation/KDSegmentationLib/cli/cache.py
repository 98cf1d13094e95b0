"""``kdseg cache``: the prepared datasets training keeps in the user's cache folder, their size, and clearing them."""
from __future__ import annotations

import json


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GB"


def cmd_cache(args) -> int:
    from KDSegmentationLib.training.cache import default_cache_root
    from KDSegmentationLib.training.cache_folder import cached_datasets, clear_cache

    if args.action == "clear":
        result = clear_cache()
        print(json.dumps(result) if args.json else
              f"removed {result['removed']} prepared dataset(s), {_human(result['freed_bytes'])}, from "
              f"{result['folder']}")
        return 0
    entries = cached_datasets()
    total = sum(e["bytes"] for e in entries)
    if args.json:
        print(json.dumps({"folder": str(default_cache_root()), "total_bytes": total, "datasets": entries}, indent=2))
        return 0
    print(f"{default_cache_root()}: {len(entries)} prepared dataset(s), {_human(total)}")
    for e in entries:
        what = "incomplete (an interrupted preparation)" if e["incomplete"] else \
            f"{e.get('task')}, {e.get('cases')} cases of {e.get('source')}"
        print(f"    {e['name']:<48} {_human(e['bytes']):>9}  {what}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("cache", help="show the prepared training datasets in the cache folder and their size, or "
                       "clear them (KDSEG_CACHE sets the folder)")
    s.add_argument("action", nargs="?", default="info", choices=["info", "clear"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cache)
