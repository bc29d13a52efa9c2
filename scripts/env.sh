#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install latentdiff into it.
# Sourced by scripts/main.sh and scripts/test.sh. Re-installs only when pyproject.toml changed.
#
# LATENTDIFF_TORCH picks the torch build to install instead of the newest the index offers, in a
# virtual environment of its own (.venv-<spec>), so that the suite can run against any torch the
# project accepts:
#   LATENTDIFF_TORCH=lowest bash scripts/test.sh                                   # scripts/torch-lowest.txt
#   LATENTDIFF_TORCH="torch==2.7.1 torchvision==0.22.1" bash scripts/test.sh       # any pip requirements
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_spec="${LATENTDIFF_TORCH:-}"
if [ "$torch_spec" = lowest ]; then
  torch_spec="$(grep -v '^\s*#' "$root/scripts/torch-lowest.txt" | xargs)"
fi
if [ -n "$torch_spec" ]; then
  venv="${LATENTDIFF_VENV:-$root/.venv-$(echo "$torch_spec" | sed -E 's/[^A-Za-z0-9.]+/-/g; s/-$//')}"
else
  venv="${LATENTDIFF_VENV:-$root/.venv}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[latentdiff] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.latentdiff-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ -n "$torch_spec" ]; then want="$want $torch_spec"; fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[latentdiff] installing latentdiff and its dependencies into $venv (first time: several minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  if [ -n "$torch_spec" ]; then
    # The chosen torch first, then the project with that torch held fixed (a constraints file), so
    # that no dependency's resolution replaces it.
    echo "[latentdiff] torch: $torch_spec"
    constraints="$venv/torch-constraints.txt"
    printf '%s\n' $torch_spec > "$constraints"
    "$venv/bin/python" -m pip install --quiet -c "$constraints" $torch_spec
    "$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$root[test]"
  else
    # torch comes from the registry's standard build (its CUDA build also runs on a CPU).
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Nothing here downloads weights or data sets: everything is built locally.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
