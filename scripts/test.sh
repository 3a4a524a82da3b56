#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, the binaries the integration tests start
# (`lemur-worker`, `lemur-plan`), then every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins
cargo test --release --workspace
