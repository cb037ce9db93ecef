#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets --no-fail-fast 2>&1
