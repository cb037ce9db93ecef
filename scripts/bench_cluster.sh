#!/usr/bin/env bash
# natster-mount on a 3-node NATS cluster vs one nats-server: cold sequential read of one file
# through the FUSE mount, the catalog server on node 1 and the mount on node 3 (every byte
# crosses a route), against the same read with both on one server.
#
# Sourced (by scripts/bench.sh): defines `bench_cluster_rows`, which prints summary rows
# `measure|natster|peer|ratio|note` on stdout (natster = the cluster, peer = one server) and
# its progress on stderr. Run directly: prints those rows as a table.
#
# The function runs in a subshell with its own EXIT trap: every process it starts (operator up,
# catalog servers, mounts) is stopped and every mount unmounted, on success, failure or Ctrl-C.
# Every wait is bounded.
#
# Settings (environment):
#   BENCH_CLUSTER_SIZE=256M   size of the file read (K/M/G suffixes)
#   BENCH_CLUSTER_REPEAT=3    cold reads per setup (median reported)
#   BENCH_BIN=<path>          natster-mount binary (default target/release, else target/debug)
#   BENCH_TMP=$TMPDIR|/tmp    where the work folder is made

bench_cluster_rows() (
  set -euo pipefail
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  local size=${BENCH_CLUSTER_SIZE:-256M} repeat=${BENCH_CLUSTER_REPEAT:-3}
  local bin=${BENCH_BIN:-}
  if [ -z "$bin" ]; then
    bin=$repo/target/release/natster-mount
    [ -x "$bin" ] || bin=$repo/target/debug/natster-mount
  fi
  [ -x "$bin" ] || { echo "bench_cluster: no natster-mount binary at $bin; run cargo build --release" >&2; return 1; }
  [ -e /dev/fuse ] || { echo "bench_cluster: /dev/fuse is missing (scripts/setup.sh installs fuse3)" >&2; return 1; }
  local w
  w=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/natster-bench-cluster.XXXXXX")
  local pids=() mounts=()
  bc_log() { printf '%s\n' "== cluster: $*" >&2; }
  # Stops (newest first) every process started here and unmounts every mount.
  stop_all() {
    local m p i
    for m in "${mounts[@]}"; do
      if mountpoint -q "$m"; then timeout 20 fusermount3 -u "$m" 2>/dev/null || timeout 20 fusermount3 -uz "$m" || true; fi
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
      p=${pids[$i]}
      kill -TERM "$p" 2>/dev/null || continue
      for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    done
    pids=()
    mounts=()
  }
  bc_cleanup() {
    set +e
    stop_all
    rm -rf "$w"
  }
  trap bc_cleanup EXIT
  trap 'exit 130' INT TERM HUP
  local bytes
  bytes=$(numfmt --from=iec "$size") || { echo "bench_cluster: BENCH_CLUSTER_SIZE=$size is not a size" >&2; return 1; }
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  wait_for() { # SECONDS WHAT COMMAND...
    local until=$(($(date +%s) + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
      [ "$(date +%s)" -lt "$until" ] || { echo "bench_cluster: timed out waiting for $what" >&2; return 1; }
      sleep 0.1
    done
  }
  drop_caches() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
  median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

  bc_log "a ${size} file"
  mkdir -p "$w/media"
  head -c "$bytes" /dev/urandom >"$w/media/big.bin"

  # setup NAME NODES: an operator with NODES nats-servers, alice serving, bob importing; writes
  # the median MB/s of cold reads of big.bin through bob's mount to $w/NAME.result, then stops
  # what it started.
  setup() {
    local name=$1 nodes=$2 op=$w/$1/op
    mkdir -p "$op"
    local as_op=(env NATSTER_HOME="$op" NATSTER_OPERATOR_HOME="$op")
    local as_alice=(env NATSTER_HOME="$w/$name/alice" NATSTER_OPERATOR_HOME="$op")
    local as_bob=(env NATSTER_HOME="$w/$name/bob" NATSTER_OPERATOR_HOME="$op")
    timeout 60 "${as_op[@]}" "$bin" operator init --port "$(free_port)" --cluster "$nodes" >/dev/null
    "${as_op[@]}" "$bin" operator up --no-hub --no-global >"$w/$name/up.log" 2>&1 &
    pids+=($!)
    wait_for 60 "operator up ($name)" grep -q "Ctrl-C to stop" "$w/$name/up.log"
    timeout 60 "${as_alice[@]}" "$bin" operator add-account alice >/dev/null 2>&1
    timeout 60 "${as_bob[@]}" "$bin" operator add-account bob >/dev/null 2>&1
    local urls first last
    urls=$(sed -n 's/.* on \(nats:[^ ]*\) with .*/\1/p' "$w/$name/up.log" | head -n 1)
    first=${urls%%,*}
    last=${urls##*,}
    # Alice on node 1, bob on the last node: on the cluster every byte crosses a route.
    timeout 60 "${as_alice[@]}" "$bin" init --server "$first" >/dev/null
    timeout 60 "${as_bob[@]}" "$bin" init --server "$last" >/dev/null
    timeout 300 "${as_alice[@]}" "$bin" catalog new media "$w/media" >/dev/null
    local bob_key alice_key
    bob_key=$(sed -n 's/.*"account_public_key": "\([A-Z0-9]*\)".*/\1/p' "$w/$name/bob/default.context")
    alice_key=$(sed -n 's/.*"account_public_key": "\([A-Z0-9]*\)".*/\1/p' "$w/$name/alice/default.context")
    timeout 60 "${as_alice[@]}" "$bin" catalog share media "$bob_key" >/dev/null 2>&1
    "${as_alice[@]}" "$bin" catalog serve media --no-watch >"$w/$name/serve.log" 2>&1 &
    pids+=($!)
    wait_for 60 "alice's catalog server ($name)" grep -q "serving catalog" "$w/$name/serve.log"
    timeout 60 "${as_bob[@]}" "$bin" catalog import media "$alice_key" >/dev/null 2>&1
    local runs=() mnt=$w/$name/mnt
    mkdir -p "$mnt"
    for _ in $(seq 1 "$repeat"); do
      "${as_bob[@]}" "$bin" mount "$mnt" --foreground >>"$w/$name/mount.log" 2>&1 &
      local mpid=$!
      pids+=($mpid)
      mounts+=("$mnt")
      wait_for 60 "bob's mount ($name)" mountpoint -q "$mnt"
      wait_for 60 "the catalog in bob's mount ($name)" test -e "$mnt/media/big.bin"
      drop_caches
      local t0 t1
      t0=$(date +%s.%N)
      timeout 600 cat "$mnt/media/big.bin" >/dev/null
      t1=$(date +%s.%N)
      runs+=("$(awk -v b="$bytes" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / (z - a) / 1e6 }')")
      kill -TERM "$mpid"
      wait_for 20 "bob's unmount ($name)" bash -c "! mountpoint -q '$mnt'"
      wait "$mpid" 2>/dev/null || true
    done
    bc_log "$name: ${runs[*]} MB/s"
    median "${runs[@]}" >"$w/$name.result"
    stop_all
  }

  local one three
  setup single 1
  setup cluster 3
  one=$(cat "$w/single.result")
  three=$(cat "$w/cluster.result")
  local ratio
  ratio=$(awk -v a="$three" -v b="$one" 'BEGIN { if (b + 0 <= 0) print "n/a"; else printf "%.2fx", a / b }')
  echo "cold sequential read, 3-node cluster, server on node 1, mount on node 3 (MB/s)|$three|$one|$ratio|one nats-server / higher"
)

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  rows=$(bench_cluster_rows)
  {
    echo "measure|natster|peer|ratio|peer is / better is"
    echo "-------|-------|----|-----|-------------------"
    printf '%s\n' "$rows"
  } | column -t -s '|' -o '   '
fi
