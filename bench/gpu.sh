#!/usr/bin/env bash
# Every figure that needs a GPU, in one call of under 9 minutes (bench/README.md, "GPU figures in one call").
#
#   bash bench/gpu.sh --out DIR             on the GPU machine: install the wheels carried in .whl/ and this
#                                           checkout into /tmp/site, then run every part (python bench/gpu.py run)
#   bash bench/gpu.sh --dry-run --out DIR   here: the same plan on the CPU, tiny model and sizes, in the
#                                           environment as it is (nothing is installed)
#   bash bench/gpu.sh --install --dry-run --out DIR
#                                           the dry run after the installs, as on the GPU machine: with
#                                           PYTHON set to a bare environment's python, it checks the wheel set
#
# Other options go to `python bench/gpu.py run` (--workdir, --long-vae, --budget-s; see its --help).
# The 9-minute budget counts from here, so the installs are inside it.
set -uo pipefail
started="$(date +%s.%N)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
command_line="bash bench/gpu.sh $*"

dry_run=0
install=0
forward=()
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=1; forward+=("$argument") ;;
    --install) install=1 ;;
    *) forward+=("$argument") ;;
  esac
done
if [ "$dry_run" = 0 ]; then install=1; fi

if [ "$install" = 1 ]; then
  site="${LATENTDIFF_GPU_SITE:-/tmp/site}"
  wheels="${LATENTDIFF_WHEELS:-$root/.whl}"
  if compgen -G "$wheels/*.whl" > /dev/null; then
    echo "[gpu.sh] installing the carried wheels into $site: $(cd "$wheels" && ls -- *.whl | tr '\n' ' ')"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || { echo "[gpu.sh] the carried wheels did not install"; exit 1; }
  else
    echo "[gpu.sh] no wheels in $wheels: run 'bash bench/gpu_wheels.sh' before the GPU session and carry .whl"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  # This checkout itself, built by the carried setuptools (PYTHONPATH); nothing is fetched.
  echo "[gpu.sh] installing this checkout into $site"
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root" || echo "[gpu.sh] this checkout did not install: the env step says what is missing"
  echo "[gpu.sh] installs took $(awk "BEGIN {printf \"%.0f\", $(date +%s.%N) - $started}") s"
fi
exec "$python" "$root/bench/gpu.py" run --started-at "$started" --command-line "$command_line" ${forward[@]+"${forward[@]}"}
