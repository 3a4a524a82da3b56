#!/usr/bin/env bash
# Checks the cost model against real runs on this machine's CPU:
#   1. profile the CPU (lemur-profile), 2. plan a llama-150m-shaped model with random f32
#   weights (620 MB) on that profile, 3. run it with every op timed (lemur-worker --timings,
#   medians over warm repeats) and print predicted against measured, 4. refine the profile
#   from runs at prompts 64 and 512, 5. validate again at prompt 256, which refinement did
#   not see. Output goes to $OUT (default target/validate).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/validate}
mkdir -p "$OUT/base" "$OUT/refined"
cargo build --release --workspace --bins --examples -q
bin=target/release
[ -f "$OUT/model/model.safetensors" ] || $bin/examples/random_checkpoint llama-150m-shaped "$OUT/model" >/dev/null
$bin/lemur-profile --name dev-cpu --out "$OUT/base/dev-cpu.toml"
port=$((20000 + RANDOM % 20000))
printf '[[link]]\nname = "loopback"\nbetween = ["*", "*"]\nbandwidth_gbps = 3.0\nlatency_us = 10.0\n' > "$OUT/base/links.toml"
cp "$OUT/base/links.toml" "$OUT/refined/links.toml"
printf 'id = "validate"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:%s"\nmachine = "dev-cpu"\n' "$port" > "$OUT/cluster.toml"
run() { # profiles-dir prompt-length tag
  local ids
  ids=$(python3 -c "print(','.join(str((i * 37 + 11) % 32000) for i in range($2)))")
  $bin/lemur-plan --profiles "$1" --model "$OUT/model" --seq "$2" --gen-tokens 16 --dtype f32 --out "$OUT/plan-$3.json" >/dev/null
  $bin/lemur-worker --rank 0 --cluster "$OUT/cluster.toml" --plan "$OUT/plan-$3.json" --model "$OUT/model" \
    --prompt-ids "$ids" --max-new-tokens 16 --repeat 4 --timings "$OUT/timings-$3.json" 2>&1 >/dev/null \
    | grep -v -E '^(rank|time)'
}
for s in 64 256 512; do
  echo "== microbenchmark profile, prompt $s"
  run "$OUT/base" "$s" "base-$s"
done
$bin/lemur-profile refine --profile "$OUT/base/dev-cpu.toml" --from "$OUT/timings-base-64.json" \
  --from "$OUT/timings-base-512.json" --out "$OUT/refined/dev-cpu.toml"
echo "== refined from prompts 64 and 512, validated at prompt 256"
run "$OUT/refined" 256 refined-256
