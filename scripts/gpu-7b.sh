#!/usr/bin/env bash
# The 7B measurement behind the README's GPU section, on the GPU machine (see gpu-runs.sh):
#   bash scripts/gpu-7b.sh BINS_DIR PROFILE.toml   (the GPU's measured profile)
set -euo pipefail
B=${1:?bins directory}
P=${2:?the GPU profile}
OUT=${OUT:-/tmp/gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT" "$W/prof"
cp "$P" "$W/prof/"
GPU=$(sed -n 's/^name = "\(.*\)"/\1/p' "$P" | head -1)
printf '[[link]]\nname = "loopback"\nbetween = ["*", "*"]\nbandwidth_gbps = 5.0\nlatency_us = 20.0\n' > "$W/prof/links.toml"

# 4. A Mistral-7B-shaped model with random bf16 weights (14.5 GB), generated here, on one
#    GPU worker: prefill of a 2048-token prompt and 64 decode steps (medians of warm runs).
t0=$(date +%s)
"$B/random_checkpoint" mistral-7b "$W/m7b" 1 bf16 >/dev/null
echo "generated the checkpoint in $(( $(date +%s) - t0 )) s" | tee "$OUT/m7b-gen.txt"
"$B/lemur-plan" --profiles "$W/prof" --machines "$GPU" --model "$W/m7b" --seq 2048 --gen-tokens 64 --dtype bf16 \
  --out "$W/m7b-plan.json" > "$OUT/m7b-plan.txt"
printf 'id = "m7b"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:17620"\nmachine = "%s"\n' "$GPU" > "$W/m7b.toml"
ids=$(python3 -c "print(','.join(str((i*37+11)%32000) for i in range(2048)))")
"$B/lemur-worker" --rank 0 --cluster "$W/m7b.toml" --plan "$W/m7b-plan.json" --model "$W/m7b" --device cuda --dtype bf16 \
  --prompt-ids "$ids" --max-new-tokens 64 --repeat 2 --timings "$OUT/m7b-timings.json" 2>&1 >/dev/null | tee "$OUT/m7b-run.txt"
