#!/usr/bin/env bash
# Regenerate docs/report-digits.png, the README's picture of a report: the top of the digits demo's report.html
# (with --show-real), rendered by headless Chromium.
#   .venv/bin/fedfactory run --config digits run.out=runs/digits
#   docs/make-report-screenshot.sh runs/digits
# The run directory is copied first, so its own report.html stays the server-side (synthetic-only) one.
set -euo pipefail
run=${1:?usage: $0 RUN_DIR}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
copy="$tmp/$(basename "$run")"
cp -r "$run" "$copy"
.venv/bin/fedfactory report --show-real "$copy" >/dev/null
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --disable-quic --hide-scrollbars --user-data-dir="$tmp/profile" \
  --window-size=1280,1100 --screenshot="$tmp/top.png" "file://$(realpath "$copy")/report.html" 2>/dev/null
size=$(stat -c %s "$tmp/top.png")
if [ "$size" -ge 300000 ]; then
  echo "screenshot is $size bytes, over the 300 KB README budget; lower --window-size" >&2
  exit 1
fi
cp "$tmp/top.png" docs/report-digits.png
echo "docs/report-digits.png: $size bytes"
