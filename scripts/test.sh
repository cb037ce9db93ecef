#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, runs every test
# (real nats-server, real FUSE mounts), and closes with one line totalling all test binaries.
# A FUSE test that cannot run here appends `SKIPPED <test>: <reason>` to $NATSTER_SKIP_LOG;
# those are listed and counted as skipped, not passed (under CI=true they fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export NATSTER_SKIP_LOG="$skips"
status=0
cargo test --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# The sharing tests once more on Debian's nats-server when the first run used another one
# (the global service needs 2.10; `operator up` runs without it there).
debian=/usr/sbin/nats-server
default=$(cargo run --quiet --example nats_server_path 2>/dev/null || true)
if [ -x "$debian" ] && [ -n "$default" ] && [ "$(readlink -f "$default")" != "$(readlink -f "$debian")" ]; then
    echo "sharing tests on $("$debian" --version)"
    NATSTER_NATS_SERVER="$debian" cargo test --test sharing --no-fail-fast 2>&1 | tee -a "$log" || status=$?
fi
skipped=$(grep -c '^SKIPPED ' "$skips" || true)
if [ "$skipped" -gt 0 ]; then
    echo "skipped tests:"
    sed 's/^/  /' "$skips"
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
