#!/usr/bin/env bash
# The measurements behind the README's GPU section, run on the GPU machine from the bins
# that scripts/build-cuda.sh makes (carried as gpu-bins.tar.xz, with lemur-plan and the
# random_checkpoint example). Writes what it measures to $OUT (default /tmp/gpu-out).
#   bash scripts/gpu-runs.sh BINS_DIR
set -euo pipefail
B=${1:?bins directory}
OUT=${OUT:-/tmp/gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

# 1. Profiles: the GPU (from nvidia-smi: H100 SXM 989 dense bf16 TFLOP/s, 3.35 TB/s, 80 GB;
#    H200 989 TFLOP/s, 4.8 TB/s, 141 GB) and the host CPU.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  GPU=h200; MEM=141; BW=4800
else
  GPU=h100-sxm; MEM=80; BW=3350
fi
"$B/lemur-profile" --device cuda --name "$GPU" --memory-gb $MEM --peak-tflops 989 --peak-gbps $BW \
  --out "$OUT/$GPU.toml" 2>&1 | tee "$OUT/profile-gpu.log"
"$B/lemur-profile" --device cpu --name gpu-host-cpu --out "$OUT/gpu-host-cpu.toml" 2>&1 | tee "$OUT/profile-cpu.log"

# 2. Correctness on the GPU: the tiny random Mistral, greedy, CPU f32 against GPU f32 and bf16.
"$B/random_checkpoint" tiny "$W/tiny" >/dev/null
"$B/lemur-plan" --profiles profiles --model "$W/tiny" --seq 7 --gen-tokens 32 --out "$W/tiny-plan.json" >/dev/null
python3 - "$W/tiny-plan.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1])); p["machines"] = p["machines"][:1]
for o in p["ops"]: o["machine"] = p["machines"][0]["name"]
json.dump(p, open(sys.argv[1], "w"))
PY
m=$(python3 -c "import json;print(json.load(open('$W/tiny-plan.json'))['machines'][0]['name'])")
printf 'id = "one"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:17600"\nmachine = "%s"\n' "$m" > "$W/one.toml"
ids=1,17,42,99,3,250,8
for run in "cpu f32" "cuda f32" "cuda bf16"; do
  set -- $run
  "$B/lemur-worker" --rank 0 --cluster "$W/one.toml" --plan "$W/tiny-plan.json" --model "$W/tiny" --prompt-ids $ids \
    --max-new-tokens 32 --device "$1" --dtype "$2" --dump-logits "$OUT/tiny-$1-$2.json" > "$OUT/tiny-$1-$2.ids" 2>/dev/null
done
python3 - "$OUT" <<'PY' | tee "$OUT/tiny-compare.txt"
import json, sys
o = sys.argv[1]
ids = {k: open(f"{o}/tiny-{k}.ids").read().strip() for k in ["cpu-f32", "cuda-f32", "cuda-bf16"]}
lg = {k: json.load(open(f"{o}/tiny-{k}.json")) for k in ids}
def maxdiff(a, b): return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
print("greedy tokens, GPU f32 == CPU f32:", ids["cuda-f32"] == ids["cpu-f32"])
print("max |logit| difference GPU f32 vs CPU f32 over 32 steps: %.2e" % maxdiff(lg["cuda-f32"], lg["cpu-f32"]))
print("first-step max |logit| difference GPU bf16 vs CPU f32: %.3f (logits span %.1f)" % (
    maxdiff(lg["cuda-bf16"][:1], lg["cpu-f32"][:1]), max(lg["cpu-f32"][0]) - min(lg["cpu-f32"][0])))
print("greedy tokens agreeing GPU bf16 vs CPU f32: %d of 32" % sum(
    a == b for a, b in zip(ids["cuda-bf16"].split(","), ids["cpu-f32"].split(","))))
PY

# 3. A heterogeneous run: rank 0 on the GPU, rank 1 on the host CPU, planned from their
#    measured profiles (llama-150m-shaped, random f32 weights), then timed op by op.
mkdir -p "$W/prof"
cp "$OUT/$GPU.toml" "$OUT/gpu-host-cpu.toml" "$W/prof/"
printf '[[link]]\nname = "loopback"\nbetween = ["*", "*"]\nbandwidth_gbps = 5.0\nlatency_us = 20.0\n' > "$W/prof/links.toml"
"$B/random_checkpoint" llama-150m-shaped "$W/m150" >/dev/null
"$B/lemur-plan" --profiles "$W/prof" --model "$W/m150" --seq 512 --gen-tokens 32 --dtype f32 --out "$W/het.json" \
  | tee "$OUT/het-plan.txt"
printf 'id = "het"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:17610"\nmachine = "gpu-host-cpu"\n[[rank]]\nrank = 1\naddr = "127.0.0.1:17611"\nmachine = "%s"\n' "$GPU" > "$W/het.toml"
ids=$(python3 -c "print(','.join(str((i*37+11)%32000) for i in range(512)))")
# The planner's choice, then a forced split (the first 4 layers on the CPU) to time a real
# two-device run against its prediction.
python3 - "$W/het.json" "$W/het-split.json" "$GPU" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
for o in p["ops"]:
    cpu = o["kind"] == "embedding" or (o["layer"] is not None and o["layer"] < 4)
    o["machine"] = "gpu-host-cpu" if cpu else sys.argv[3]
json.dump(p, open(sys.argv[2], "w"))
PY
for plan in het het-split; do
  "$B/lemur-worker" --once --rank 1 --cluster "$W/het.toml" --device cuda --wait 120 2>/dev/null &
  sleep 1
  echo "== $plan" | tee -a "$OUT/het-run.txt"
  "$B/lemur-worker" --rank 0 --cluster "$W/het.toml" --plan "$W/$plan.json" --model "$W/m150" --prompt-ids "$ids" \
    --max-new-tokens 32 --repeat 3 --timings "$OUT/$plan-timings.json" 2>&1 >/dev/null | tee -a "$OUT/het-run.txt"
  wait
done


# 4. The 7B measurement.
bash "$(dirname "$0")/gpu-7b.sh" "$B" "$OUT/$GPU.toml"
