#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, the binaries the integration tests start
# (`lemur-worker`, `lemur-plan`), then every test in release mode. The fault tests' fail
# points (the `fail` crate) are compiled in, inactive unless a test configures one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
features=(--features lemur-worker/failpoints)
cargo build --release --workspace --bins "${features[@]}"
cargo test --release --workspace "${features[@]}"
