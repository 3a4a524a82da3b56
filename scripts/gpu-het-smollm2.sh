#!/usr/bin/env bash
# SmolLM2 on the GPU machine, heterogeneous: the planner's placement over the H200 and its
# host CPU, then a forced split (embedding and layers 0-14 on the CPU); both timed op by op.
# Expects bins in .gpu/bins.tar.xz and the GGUF halves in /tmp/smolpart.00 and .01.
set -e; mkdir -p /tmp/b; tar -xJf .gpu/bins.tar.xz -C /tmp/b; B=/tmp/b/bins
cat /tmp/smolpart.00 /tmp/smolpart.01 > /tmp/smol.gguf
$B/lemur-plan --profiles profiles/gpu --machines gpu-host-cpu,h200 --model /tmp/smol.gguf --seq 64 --gen-tokens 32 --dtype f32 --out /tmp/het.json | sed -n 8,13p
python3 - <<'PY'
import json
p = json.load(open("/tmp/het.json"))
for o in p["ops"]:
    cpu = o["kind"] == "embedding" or (o["layer"] is not None and o["layer"] < 15)
    o["machine"] = "gpu-host-cpu" if cpu else "h200"
json.dump(p, open("/tmp/het-split.json", "w"))
PY
printf 'id = "h"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:17710"\nmachine = "gpu-host-cpu"\n[[rank]]\nrank = 1\naddr = "127.0.0.1:17711"\nmachine = "h200"\n' > /tmp/h.toml
ids=$(python3 -c "print(','.join(str((i*37+11)%49152) for i in range(64)))")
for plan in het het-split; do
  $B/lemur-worker --once --rank 1 --cluster /tmp/h.toml --device cuda --wait 120 2>/dev/null &
  sleep 1
  echo "== $plan"
  $B/lemur-worker --rank 0 --cluster /tmp/h.toml --plan /tmp/$plan.json --model /tmp/smol.gguf --prompt-ids "$ids" --max-new-tokens 32 --repeat 3 --timings /tmp/$plan-t.json 2>&1 >/tmp/$plan.ids | grep -E "time |sent|per layer|sum of ops|end to end|^prefill|^decode"
  wait
done
cmp /tmp/het.ids /tmp/het-split.ids && echo "same tokens on both placements"
