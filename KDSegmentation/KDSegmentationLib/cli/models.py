"""``kdseg models``: the installed and locally distilled models, and one model's card."""
from __future__ import annotations

import contextlib
import json
import sys

from KDSegmentationLib.errors import InputError


def cmd_models(args) -> int:
    from KDSegmentationLib.models.catalog import find_model, list_models

    if args.action == "show":
        if not args.name:
            raise InputError("'kdseg models show' needs a model name (see 'kdseg models list')")
        entry = find_model(args.name)
        print(json.dumps(entry, indent=2))
        return 0
    # With --json stdout holds exactly one JSON document (the client parses it strictly): anything a library
    # prints while the model files are read goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        entries = list_models()
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        if not entries:
            print("no models installed")
        for e in entries:
            card = e.get("card", {})
            if e.get("error"):
                print(f"{e['name']:<40} {'?':<12} {'?':<8} {e['source']:<7} unusable: {e['error']}")
                continue
            print(f"{e['name']:<40} {e['task']:<12} {e['role']:<8} {e['source']:<7} "
                  f"{card.get('parameters', '?')} params")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("models", help="list installed and locally distilled models, or show one's card")
    s.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)
