#!/usr/bin/env bash
# Start `kvcache dev` on loopback, run a standard load against it, stop it.
#   deploy/loadtest/run.sh [OUT_DIR]
# Writes OUT_DIR/{decode,mixed,prefill}.{json,png} (default: ./loadtest-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-loadtest-out}
mkdir -p "$out"
cargo build --release --quiet -p kvcache
bin=target/release/kvcache
data=$(mktemp -d)
"$bin" dev --listen 127.0.0.1:0 --data-dir "$data" > "$out/dev.log" 2>&1 &
dev=$!
trap 'kill -TERM $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  coord=$(sed -n 's/^ *coordinator *//p' "$out/dev.log" | head -1)
  [ -n "$coord" ] && break
  sleep 0.1
done
[ -n "$coord" ] || { echo "kvcache dev did not start"; cat "$out/dev.log"; exit 1; }
"$bin" load --coordinator "$coord" --scenario decode  --concurrency 8 --duration 15 --context 8192 --json "$out/decode.json"  --plot "$out/decode.png"
"$bin" load --coordinator "$coord" --scenario mixed   --rate 100      --duration 15 --context 4096 --json "$out/mixed.json"   --plot "$out/mixed.png"
"$bin" load --coordinator "$coord" --scenario prefill --concurrency 4 --duration 10 --context 4096 --json "$out/prefill.json" --plot "$out/prefill.png"
echo "reports in $out/"
