#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install latentdiff into it.
# Sourced by scripts/main.sh and scripts/test.sh. Re-installs only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LATENTDIFF_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[latentdiff] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.latentdiff-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[latentdiff] installing latentdiff and its dependencies into $venv (first time: several minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch comes from the registry's standard build (its CUDA build also runs on a CPU).
  "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Nothing here downloads weights or data sets: everything is built locally.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
