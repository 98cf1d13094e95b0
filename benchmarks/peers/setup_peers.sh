#!/usr/bin/env bash
# Creates a separate virtual environment with the peer tools the benchmark compares against:
# TotalSegmentator 2.18.0 (nnU-Net v2) and MONAI (SegResNet), on the CPU build of torch 2.13.0.
# Usage: benchmarks/peers/setup_peers.sh [VENV_DIR]   (default /work/peers-venv; never inside the repository)
set -euo pipefail
VENV="${1:-/work/peers-venv}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/$(basename "$VENV")" in
  "$REPO"/*) echo "refusing to create the peers environment inside the repository: $VENV" >&2; exit 2;;
esac
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch pinned to the CPU build (a plain 'torch' requirement would pull a CUDA build and its libraries).
TORCH_INDEX="${TORCH_INDEX:-}"
if [ -n "$TORCH_INDEX" ]; then
  "$VENV/bin/pip" install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
else
  "$VENV/bin/pip" install -q "torch==2.13.0"
fi
# TotalSegmentator and nnU-Net v2 with torch held at the installed build (constraint file), MONAI for SegResNet.
CONS="$(mktemp)"; trap 'rm -f "$CONS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONS"
# Versions pinned to those the committed results were measured with (benchmarks/results/peers.md).
"$VENV/bin/pip" install -q -c "$CONS" "TotalSegmentator==2.18.0" "nnunetv2==2.8.1" "monai==1.6.1" psutil
# torchvision from the index is built against CUDA torch and fails to load its C++ operators with CPU torch, so
# `import torchvision` raises. Nothing on TotalSegmentator's inference path uses those operators, but nnU-Net's
# trainer search imports the Primus trainers (timm -> torchvision): run_peers.py starts TotalSegmentator through
# totalseg_cli.py, which leaves that one module out. The check here is only that the packages import.
"$VENV/bin/python" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("nnunetv2", "totalsegmentator", "monai", "SimpleITK"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "ok"))
try:
    import torchvision  # noqa: F401
    print("torchvision", torchvision.__version__)
except Exception as e:  # operators built for another torch
    print("torchvision does not import (", type(e).__name__, str(e)[:120], ") - not needed for inference")
PY
echo "peers environment ready: $VENV"
echo "next: python benchmarks/peers/run_peers.py   (writes the random weights to /work/peers-totalseg-home, then measures)"
