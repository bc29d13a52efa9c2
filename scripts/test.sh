#!/usr/bin/env bash
# The test command: set up (or reuse) .venv, then run the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec python -m pytest -n 2 --timeout 900 "$@"
