#!/usr/bin/env bash
# Here, before a GPU session: download the wheels the GPU machine lacks into .whl/ (which git ignores),
# check that they are complete and that everything that travels fits the device tool's 64 MiB, and
# stamp the source (bench/README.md, "GPU figures in one call"). Run it in the checkout that the
# device tool sends, right before the call. Options: python bench/gpu.py wheels --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's environment: the wheels get the versions its tests pass with.
source "$root/scripts/env.sh"
cd "$root"
exec python bench/gpu.py wheels "$@"
