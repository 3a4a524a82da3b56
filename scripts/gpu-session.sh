#!/usr/bin/env bash
# What runs on the GPU machine, in parts that each fit one device call (10 minutes):
#   bash scripts/gpu-session.sh PART     with PART one of profile, tiny, 7b, train-cpu
# Expects .gpu/bins.tar.xz (scripts/build-cuda.sh's gpu-bins plus lemur-plan and the
# random_checkpoint example, all built on the dev machine) and writes to $OUT.
# Files that later parts need (profiles, the 7B checkpoint) stay under /tmp/lemur between
# calls on a warm machine.
set -euo pipefail
PART=${1:?part}
OUT=${OUT:-/tmp/gpu-out}
S=/tmp/lemur
mkdir -p "$OUT" "$S/prof"
[ -x "$S/b/bins/lemur-worker" ] || { mkdir -p "$S/b"; tar -xJf .gpu/bins.tar.xz -C "$S/b"; }
B=$S/b/bins
LINK='[[link]]\nname = "loopback"\nbetween = ["*", "*"]\nbandwidth_gbps = 5.0\nlatency_us = 20.0\n'
printf "$LINK" > "$S/prof/links.toml"
GPU=h100-sxm
ids() { python3 -c "print(','.join(str((i*37+11)%32000) for i in range($1)))"; }
cluster() { # file machine0 [machine1]
  printf 'id = "s"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:17800"\nmachine = "%s"\n' "$2" > "$1"
  [ -z "${3:-}" ] || printf '[[rank]]\nrank = 1\naddr = "127.0.0.1:17801"\nmachine = "%s"\n' "$3" >> "$1"
}

case $PART in
profile)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  nproc | tee -a "$OUT/gpu.txt"
  # H100 SXM: 989 dense bf16 TFLOP/s, 3.35 TB/s, 80 GB (spec sheet).
  "$B/lemur-profile" --device cuda --name $GPU --memory-gb 80 --peak-tflops 989 --peak-gbps 3350 \
    --out "$OUT/$GPU.toml" 2>&1 | tail -2 | tee "$OUT/profile-gpu.log"
  "$B/lemur-profile" --device cpu --name h100-host-cpu --dtype f32,bf16 --out "$OUT/h100-host-cpu.toml" 2>&1 | tail -1 | tee "$OUT/profile-cpu.log"
  # Half the host (8 cores): the "machine" of the training speed-up runs.
  RAYON_NUM_THREADS=8 taskset -c 0-7 "$B/lemur-profile" --device cpu --name host-8-cores \
    --out "$OUT/host-8-cores.toml" 2>&1 | tail -1 | tee "$OUT/profile-cpu8.log"
  cp "$OUT"/*.toml "$S/prof/"
  ;;
tiny)
  # GPU correctness of the fused attention: the tiny random Mistral (GQA 2:1), greedy.
  "$B/random_checkpoint" tiny "$S/tiny" >/dev/null
  "$B/lemur-plan" --profiles "$S/prof" --machines $GPU --model "$S/tiny" --seq 7 --gen-tokens 32 --out "$S/tiny-plan.json" >/dev/null
  cluster "$S/one.toml" $GPU
  for run in "cpu f32" "cuda f32" "cuda bf16"; do
    set -- $run
    "$B/lemur-worker" --rank 0 --cluster "$S/one.toml" --plan "$S/tiny-plan.json" --model "$S/tiny" \
      --prompt-ids 1,17,42,99,3,250,8 --max-new-tokens 32 --device "$1" --dtype "$2" \
      --dump-logits "$OUT/tiny-$1-$2.json" > "$OUT/tiny-$1-$2.ids" 2>/dev/null
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
PY
  ;;
7b)
  # Mistral-7B-shaped, random bf16 weights (14.5 GB) generated here; one GPU worker,
  # prompt 2048 and 64 generated, medians of warm repeats; then the same op by op.
  if [ ! -f "$S/m7b/model.safetensors" ]; then
    t0=$(date +%s); "$B/random_checkpoint" mistral-7b "$S/m7b" 1 bf16 >/dev/null
    echo "generated the checkpoint in $(( $(date +%s) - t0 )) s" | tee "$OUT/m7b-gen.txt"
  fi
  "$B/lemur-plan" --profiles "$S/prof" --machines $GPU --model "$S/m7b" --seq 2048 --gen-tokens 64 --dtype bf16 \
    --out "$S/m7b-plan.json" > "$OUT/m7b-plan.txt"
  cluster "$S/m7b.toml" $GPU
  "$B/lemur-worker" --rank 0 --cluster "$S/m7b.toml" --plan "$S/m7b-plan.json" --model "$S/m7b" --device cuda \
    --dtype bf16 --prompt-ids "$(ids 2048)" --max-new-tokens 64 --repeat 3 2>&1 >/dev/null | grep -E "^time" | tee "$OUT/m7b-run.txt"
  "$B/lemur-worker" --rank 0 --cluster "$S/m7b.toml" --plan "$S/m7b-plan.json" --model "$S/m7b" --device cuda \
    --dtype bf16 --prompt-ids "$(ids 2048)" --max-new-tokens 64 --repeat 2 --timings "$OUT/m7b-timings.json" \
    2>&1 >/dev/null | grep -v "^rank" | tee "$OUT/m7b-timed.txt"
  ;;
het7b)
  # The 7B shape over the GPU and its host CPU, planned from their measured profiles
  # (prompt 256, 16 generated), then a forced split: the last two layers and the head on the CPU.
  "$B/lemur-plan" --profiles "$S/prof" --machines h100-host-cpu,$GPU --model "$S/m7b" --seq 256 --gen-tokens 16 \
    --dtype bf16 --out "$S/het.json" | tee "$OUT/het7b-plan.txt" | sed -n 1,14p
  python3 - "$S" <<'PY'
import json, sys
s = sys.argv[1]
p = json.load(open(f"{s}/het.json"))
for o in p["ops"]:
    cpu = o["kind"] in ("final_norm", "lm_head") or (o["layer"] is not None and o["layer"] >= 30)
    o["machine"] = "h100-host-cpu" if cpu else "h100-sxm"
json.dump(p, open(f"{s}/het-split.json", "w"))
PY
  cluster "$S/h.toml" h100-host-cpu $GPU
  for plan in het het-split; do
    "$B/lemur-worker" --once --rank 1 --cluster "$S/h.toml" --device cuda --wait 300 2>/dev/null &
    sleep 1
    echo "== $plan" | tee -a "$OUT/het7b-run.txt"
    "$B/lemur-worker" --rank 0 --cluster "$S/h.toml" --plan "$S/$plan.json" --model "$S/m7b" --dtype bf16 \
      --prompt-ids "$(ids 256)" --max-new-tokens 16 --repeat 2 --timings "$OUT/$plan-timings.json" 2>&1 >"$OUT/$plan.ids" \
      | grep -E "^time|sent|per layer|sum of ops|end to end|^prefill|^decode" | tee -a "$OUT/het7b-run.txt"
    wait
  done
  ;;
train-cpu)
  # LoRA training of a llama-150m-shaped model (f32, seq 256, 8 micro-batches) on the host
  # CPU, each "machine" 8 cores: the 8-core profile (microbenchmarks), a timed one-worker
  # run against it, that profile refined from the run, then one worker against two
  # (cores 0-7 and 8-15, loopback) planned from the refined profile. All on this machine,
  # in this call: machines of this kind differ by up to 25% between leases.
  [ -f "$S/l150/model.safetensors" ] || "$B/random_checkpoint" llama-150m-shaped "$S/l150" 2 >/dev/null
  python3 -c "
import json
with open('$S/data.jsonl','w') as f:
  for i in range(64): f.write(json.dumps({'input_ids':[(i*131+j*7)%32000 for j in range(257)]})+'\n')"
  mkdir -p "$S/p8" "$S/r8"
  printf "$LINK" > "$S/p8/links.toml"; printf "$LINK" > "$S/r8/links.toml"
  RAYON_NUM_THREADS=8 taskset -c 0-7 "$B/lemur-profile" --device cpu --name host-8-cores --out "$S/p8/host-8-cores.toml" 2>&1 | tail -1
  cp "$S/p8/host-8-cores.toml" "$OUT/"
  plan() { # profiles-dir machines out
    "$B/lemur-plan" --profiles "$1" --machines "$2" --model "$S/l150" --mode train --lora --seq 256 --micro-batches 8 \
      --dtype f32 --out "$3" | grep -E "Schedule|Predicted"
  }
  cluster "$S/t1.toml" host-8-cores
  cluster "$S/t2.toml" host-8-cores host-8-cores#2
  median() { python3 -c "import json,sys; s=sorted(json.loads(l)['seconds'] for l in list(open('$1'))[1:]); print('%.3f' % s[len(s)//2])"; }
  one() { # plan log [extra]
    RAYON_NUM_THREADS=8 taskset -c 0-7 "$B/lemur-worker" --rank 0 --cluster "$S/t1.toml" --plan "$1" --model "$S/l150" \
      --train "$S/data.jsonl" --steps 4 --loss-log "$2" "${@:3}" 2>&1 >/dev/null | grep -E "end to end|sum of ops" || true
  }
  two() { # plan log [threads per worker]
    RAYON_NUM_THREADS=${3:-8} taskset -c 8-15 "$B/lemur-worker" --once --rank 1 --cluster "$S/t2.toml" --wait 120 2>/dev/null &
    sleep 1
    RAYON_NUM_THREADS=${3:-8} taskset -c 0-7 "$B/lemur-worker" --rank 0 --cluster "$S/t2.toml" --plan "$1" --model "$S/l150" \
      --train "$S/data.jsonl" --steps 4 --loss-log "$2" 2>&1 >/dev/null | grep -E "held" || true
    wait
  }
  {
    echo "== microbenchmark profile: one worker, timed"
    plan "$S/p8" host-8-cores "$S/p1.json"
    one "$S/p1.json" "$S/l0.jsonl" --timings "$OUT/train1-timings.json"
    echo "median step $(median "$S/l0.jsonl") s"
    "$B/lemur-profile" refine --profile "$S/p8/host-8-cores.toml" --from "$OUT/train1-timings.json" \
      --out "$S/r8/host-8-cores.toml" 2>&1 | tail -1
    cp "$S/r8/host-8-cores.toml" "$OUT/host-8-cores-refined.toml"
    echo "== refined profile: one worker"
    plan "$S/r8" host-8-cores "$S/r1.json"
    one "$S/r1.json" "$S/l1.jsonl"
    echo "median step $(median "$S/l1.jsonl") s"
    echo "== refined profile: two workers"
    plan "$S/r8" host-8-cores,host-8-cores "$S/r2.json"
    two "$S/r2.json" "$S/l2.jsonl"
    echo "median step $(median "$S/l2.jsonl") s"
    # Seven compute threads per worker leave each a core for its I/O thread.
    echo "== refined profile: two workers, 7 compute threads each"
    two "$S/r2.json" "$S/l3.jsonl" 7
    echo "median step $(median "$S/l3.jsonl") s"
  } | tee "$OUT/train-cpu.txt"
  ;;
*) echo "unknown part $PART" >&2; exit 2 ;;
esac
