#!/usr/bin/env bash
# Start the web demo on a trained model, use it in headless Chromium (type the prompt, click Generate,
# wait for the images) and save a screenshot.
#
#   bash scripts/demo_screenshot.sh [MODEL] [OUT] [PROMPT]
#   bash scripts/demo_screenshot.sh runs/shapes/pipeline docs/demo.png "a red circle at the top left"
#
# Needs Debian's chromium (apt-get install chromium; no browser download) and the demo extra
# (pip install 'latentdiff[demo]', part of the test extra that scripts/env.sh installs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"

model="${1:-runs/shapes/pipeline}"
out="${2:-docs/demo.png}"
prompt="${3:-a red circle at the top left}"
port="${DEMO_PORT:-7861}"
if [ ! -f "$model/model_index.json" ]; then
  echo "demo_screenshot.sh: no pipeline folder at $model (train one first: bash scripts/main.sh)" >&2
  exit 2
fi
command -v chromium >/dev/null || { echo "demo_screenshot.sh: chromium not found: apt-get install chromium" >&2; exit 2; }

log="$(mktemp -t latentdiff-demo.XXXXXX.log)"
GRADIO_ANALYTICS_ENABLED=False latentdiff demo "$model" --host 127.0.0.1 --port "$port" --device cpu >"$log" 2>&1 &
demo_pid=$!
trap 'kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true' EXIT

# Wait for the page to answer (loading the model takes a few seconds).
for _ in $(seq 1 120); do
  if python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$demo_pid" 2>/dev/null; then
    echo "demo_screenshot.sh: the demo exited:" >&2; cat "$log" >&2; exit 1
  fi
  sleep 1
done

python scripts/demo_screenshot.py "http://127.0.0.1:$port/" "$out" --prompt "$prompt"
