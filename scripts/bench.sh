#!/usr/bin/env bash
# natster-mount benchmark: speed side by side with peers, in one run, reported as ratios.
#
#   1. Whole-file download through v2 (`catalog download`) vs `cat` of the local file from the
#      page cache, and vs the raw NATS ceiling (examples/raw_nats_ceiling.rs: the same bytes in
#      messages of the same size through the same nats-server, no crypto); then a table of
#      chunk sizes x windows (plus 64 KiB read latency per chunk size) to choose defaults.
#   2. Latency of 64 KiB and 4 KiB ranged reads at random offsets through the library
#      (examples/ranged_latency.rs); every such read is a cold fetch (no cache in the client).
#   3. The FUSE mount vs sshfs over a throwaway loopback sshd:
#      (a) cold sequential read, (b) warm sequential read (vs local page cache too),
#      (c) random 4 KiB pread latency (examples/random_reads.rs; beside it the floor NATS sets,
#      examples/nats_read_floor.rs), (d) `ls -lR` of a catalog of
#      BENCH_ENTRIES tiny files in BENCH_ENTRIES/100 folders, (e) 8 concurrent cold sequential
#      readers of 8 different files (BENCH_SIZE/8 each) vs one cold reader of the big file.
#   4. If scripts/bench_listing.sh exists, its rows (listing_bench_all: ls -lR, a 100k folder, a 1M-entry mount, re-index).
#   5. Cold sequential read across a 3-node cluster vs one server (scripts/bench_cluster.sh).
#
# Everything lives in a temporary folder; a trap on EXIT unmounts what was mounted and stops
# every process started here (nats-server, catalog servers, the mount, sshfs, sshd), on success,
# failure or Ctrl-C. Every step is bounded by `timeout`; every wait polls with a deadline.
#
# Settings (environment):
#   BENCH_SIZE=1G            size of the big random file (K/M/G suffixes: powers of 1024)
#   BENCH_ENTRIES=100000     files in the listing catalog (part 3d)
#   BENCH_DIRS=ENTRIES/100   folders they are spread over
#   BENCH_CHUNKS="64K 256K 512K 1M"   chunk sizes for the table (1M is clamped to the
#                                     server's maximum, 1M-16K, so a sealed chunk fits NATS' 1 MiB payload)
#   BENCH_WINDOWS="16 32 64" windows (chunks in flight) for the table
#   BENCH_REPEAT=3           runs of the headline download/cat and of each cold sequential read (median reported)
#   BENCH_LAT_N=200          64 KiB ranged reads (part 2)
#   BENCH_RANDOM_N=500       4 KiB random preads per filesystem (part 3c)
#   BENCH_STEP_TIMEOUT=600   seconds any single step may take
#   BENCH_SEED=<random>      seed of the random offsets (same offsets for natster and sshfs)
#   BENCH_TMP=$TMPDIR|/tmp   where the work folder is made (needs ~2 x BENCH_SIZE free)
#   BENCH_PARTS="1 2 3a 3c 3d 3e 4 5"  parts to run (3a includes 3b; 1 includes the table unless
#                                     BENCH_TABLE=0)
#   BENCH_BIN=<built>        natster-mount binary to measure (e.g. an older build, for before/after)
#
# nats-server: the one natster-mount itself runs (examples/nats_server_path.rs: a current
# server from its cache before Debian's 2.9, which is ~1.7x slower), unless NATS_SERVER is set.
#
# Needs root (or a user allowed to use FUSE and to run sshd) for the sshfs comparison; dropping
# the page cache (`/proc/sys/vm/drop_caches`) needs root and is skipped, with a note, otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_ENTRIES=${BENCH_ENTRIES:-100000}
BENCH_DIRS=${BENCH_DIRS:-}
BENCH_CHUNKS=${BENCH_CHUNKS:-"64K 256K 512K 1M"}
BENCH_WINDOWS=${BENCH_WINDOWS:-"16 32 64"}
BENCH_REPEAT=${BENCH_REPEAT:-3}
BENCH_LAT_N=${BENCH_LAT_N:-200}
BENCH_RANDOM_N=${BENCH_RANDOM_N:-500}
BENCH_STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-600}
BENCH_SEED=${BENCH_SEED:-$((RANDOM * 32768 + RANDOM))}
BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}}
BENCH_PARTS=" ${BENCH_PARTS:-1 2 3a 3c 3d 3e 4 5} "
BENCH_TABLE=${BENCH_TABLE:-1}
export BENCH_SEED
part() { [[ $BENCH_PARTS == *" $1 "* ]]; }
unset NATSTER_CONTEXT

# The server's largest chunk (src/server/mod.rs MAX_CHUNK_SIZE: whole 16 KiB tree leaves, room
# for the chunk's proof).
MAX_CHUNK=$((1024 * 1024 - 16384))

# ---------------------------------------------------------------------------------------------
# State the cleanup needs.
W=""            # work folder
SHM=""          # download target on tmpfs (keeps disk writes out of the network figures)
MOUNTS=()       # every mountpoint used (unmounted at exit if still mounted)
PIDS=()         # long-running processes started here, in start order
STEP_PID=""     # the bounded step currently running
MADE_RUN_SSHD=0 # created /run/sshd (sshd's privilege-separation folder) and must remove it
SUMMARY=()      # rows: label|natster|peer|ratio|note

log() { printf '%s\n' "== $*" >&2; }
die() {
  printf 'bench: error: %s\n' "$*" >&2
  exit 1
}

is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# wait_mounted DIR PID SECONDS WHAT LOG: until DIR is a mountpoint; dies if PID exits or time runs out.
wait_mounted() {
  local deadline=$(($(date +%s) + $3))
  until is_mounted "$1"; do
    alive "$2" || die "$4 exited; see $5"
    [ "$(date +%s)" -lt "$deadline" ] || die "$4 did not mount within $3s"
    sleep 0.05
  done
}

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# Stops one process we started: TERM, up to 5 s, then KILL; reaps it.
stop_pid() {
  local pid=$1 i
  alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.1; fi
  wait "$pid" 2>/dev/null || true
}

# Stops a process and its direct children (sshd's per-connection processes).
stop_tree() {
  local pid=$1 child
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do stop_pid "$child"; done
  stop_pid "$pid"
}

unmount() {
  local mp=$1
  is_mounted "$mp" || return 0
  timeout 20 fusermount3 -u "$mp" 2>/dev/null || timeout 20 fusermount3 -uz "$mp" 2>/dev/null || true
}

print_summary() {
  [ ${#SUMMARY[@]} -gt 0 ] || return 0
  echo
  echo "SUMMARY (BENCH_SIZE=$BENCH_SIZE, BENCH_ENTRIES=$BENCH_ENTRIES, $(nproc) CPUs, load average at start ${LOAD_START:-?}, at end $(cut -d' ' -f1-3 /proc/loadavg); ratio = natster / peer)"
  {
    echo "measure|natster|peer|ratio|peer is / better is"
    echo "-------|-------|----|-----|-------------------"
    printf '%s\n' "${SUMMARY[@]}"
  } | column -t -s '|' -o '   '
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  set +e
  if alive "$STEP_PID"; then stop_pid "$STEP_PID"; fi
  local mp i child
  for mp in "${MOUNTS[@]}"; do unmount "$mp"; done
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_tree "${PIDS[i]}"; done
  # Anything else still attached to this shell (a step's leftovers).
  for child in $(ps -o pid= --ppid $$ 2>/dev/null); do
    [ "$child" = "$BASHPID" ] || stop_pid "$child"
  done
  for mp in "${MOUNTS[@]}"; do unmount "$mp"; done
  if [ $rc -ne 0 ]; then
    print_summary
    [ -n "$W" ] && [ -d "$W/logs" ] && for f in "$W"/logs/*.log; do
      [ -s "$f" ] && { echo "--- last lines of $(basename "$f"):" >&2; tail -n 5 "$f" >&2; }
    done
  fi
  if [ -n "$W" ] && [ -d "$W" ]; then
    if grep -q " $W/" /proc/self/mountinfo; then
      echo "bench: something is still mounted under $W; leaving it in place" >&2
    else
      rm -rf --one-file-system "$W"
    fi
  fi
  [ -n "$SHM" ] && rm -rf --one-file-system "$SHM"
  [ $MADE_RUN_SSHD = 1 ] && rmdir /run/sshd 2>/dev/null
  exit $rc
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Runs one bounded step in the background and waits for it, so a signal interrupts the wait at
# once (the trap then stops it). Usage: step SECONDS CMD...   (redirect as for any command)
step() {
  local secs=$1 rc=0
  shift
  timeout -k 5 "$secs" "$@" &
  STEP_PID=$!
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  return $rc
}

# timed CMD... : a step bounded by BENCH_STEP_TIMEOUT; sets T to its wall time in seconds.
T=0
timed() {
  local t0 t1 rc=0
  t0=$(date +%s%N)
  step "$BENCH_STEP_TIMEOUT" "$@" || rc=$?
  t1=$(date +%s%N)
  T=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }')
  return $rc
}

# poll SECONDS WHAT CMD... : until CMD succeeds, or die after SECONDS.
poll() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not happen within ${secs}s"
    sleep 0.1
  done
}

to_bytes() {
  local s=${1^^} n u
  s=${s%IB}
  s=${s%B}
  n=${s%[KMGT]}
  u=${s:${#n}}
  [[ $n =~ ^[0-9]+$ ]] || die "'$1' is not a size (e.g. 1G, 256M, 65536)"
  case $u in
  "") echo "$n" ;;
  K) echo $((n << 10)) ;;
  M) echo $((n << 20)) ;;
  G) echo $((n << 30)) ;;
  T) echo $((n << 40)) ;;
  esac
}
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u, " "); i = 1; while (b >= 1024 && i < 5) { b /= 1024; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s <= 0) print "n/a"; else printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 <= 0) print "n/a"; else printf "%.2fx", a / b }'; }
ms() { awk -v s="$1" 'BEGIN { printf "%.0f", s * 1000 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# field KEY FILE: value of KEY=... on the file's RESULT line.
field() { sed -n "s/^RESULT.* $1=\([^ ]*\).*/\1/p" "$2" | tail -n 1; }
row() { SUMMARY+=("$1|$2|$3|$4|$5"); }

DROP_NOTE=""
drop_caches() {
  timeout 60 sync || true
  if [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
    return 0
  fi
  DROP_NOTE="(page cache NOT dropped: /proc/sys/vm/drop_caches is not writable; 'cold' means freshly mounted only)"
}

# ---------------------------------------------------------------------------------------------
SIZE=$(to_bytes "$BENCH_SIZE")
[ "$SIZE" -ge $((1 << 20)) ] || die "BENCH_SIZE must be at least 1M"
[[ $BENCH_ENTRIES =~ ^[0-9]+$ ]] && [ "$BENCH_ENTRIES" -ge 1 ] || die "BENCH_ENTRIES must be a positive number"
[ -n "$BENCH_DIRS" ] || BENCH_DIRS=$(((BENCH_ENTRIES + 99) / 100))
[[ $BENCH_DIRS =~ ^[0-9]+$ ]] && [ "$BENCH_DIRS" -ge 1 ] || die "BENCH_DIRS must be a positive number"

log "setup (NATSTER_BENCH=1 scripts/setup.sh)"
NATSTER_BENCH=1 timeout 900 scripts/setup.sh
[ "$(id -u)" -eq 0 ] || die "run as root: the sshfs comparison starts an sshd (needs /run/sshd) and cold reads drop the page cache"
for tool in fusermount3 sshfs ssh ssh-keygen perl column ss; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
[ -x "$SSHD" ] || die "sshd is not installed (openssh-server)"
[ -e /dev/fuse ] || die "/dev/fuse is missing; the mount benchmarks need FUSE"

log "building release (binary and examples)"
step 1800 cargo build --release --quiet --bins --examples || die "cargo build failed"
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=${BENCH_BIN:-$TARGET/release/natster-mount}
LATENCY=$TARGET/release/examples/ranged_latency
RANDOM_READS=$TARGET/release/examples/random_reads
CEILING=$TARGET/release/examples/raw_nats_ceiling
FLOOR=$TARGET/release/examples/nats_read_floor
for b in "$BIN" "$LATENCY" "$RANDOM_READS" "$CEILING"; do [ -x "$b" ] || die "$b was not built"; done
NATS_SERVER=${NATS_SERVER:-$("$TARGET/release/examples/nats_server_path")}
[ -x "$NATS_SERVER" ] || die "nats-server not found ($NATS_SERVER); run scripts/setup.sh"
echo "nats-server: $NATS_SERVER ($("$NATS_SERVER" --version))"

W=$(mktemp -d "$BENCH_TMP/natster-bench.XXXXXX")
if [ -d /dev/shm ] && [ -w /dev/shm ]; then SHM=$(mktemp -d /dev/shm/natster-bench.XXXXXX); else SHM=$W/out; fi
mkdir -p "$W/logs" "$W/home" "$W/data/media" "$W/data/tree" "$W/mnt/natster" "$W/mnt/sshfs" "$W/ssh" "$SHM"
export NATSTER_HOME=$W/home
MNT_N=$W/mnt/natster
MNT_S=$W/mnt/sshfs
MOUNTS=("$MNT_N" "$MNT_S")
BIG=$W/data/media/big.bin
echo "work folder $W, downloads to $SHM; size $(human "$SIZE"), seed $BENCH_SEED, $(nproc) CPUs"
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_START=$(loadavg)
if awk -v l="${LOAD_START%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  echo "WARNING: load average is $LOAD_START on $(nproc) CPUs before the bench starts; figures will be noisy"
fi

# ---- nats-server on a random free loopback port (the server picks it: -p -1) --------------
log "starting nats-server"
"$NATS_SERVER" -a 127.0.0.1 -p -1 >"$W/logs/nats-server.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
nats_port() { sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$W/logs/nats-server.log" | head -n 1; }
nats_up() { [ -n "$(nats_port)" ]; }
poll 15 "nats-server start" nats_up
NATS_PORT=$(nats_port)
step 30 "$BIN" init --server "nats://127.0.0.1:$NATS_PORT" >/dev/null || die "init failed"

# ---- the big file, indexed and served ------------------------------------------------------
log "creating $(human "$SIZE") of random data"
step "$BENCH_STEP_TIMEOUT" head -c "$SIZE" /dev/urandom >"$BIG" || die "cannot create $BIG"
# Eight other files for the concurrent readers (3e), each an eighth of the big one.
PART_SIZE=$((SIZE / 8))
if part 3e; then
  mkdir -p "$W/data/media/eight"
  for ((k = 0; k < 8; k++)); do
    step "$BENCH_STEP_TIMEOUT" head -c "$PART_SIZE" /dev/urandom >"$W/data/media/eight/part$k.bin" || die "cannot create part $k"
  done
fi
timed "$BIN" catalog new media "$W/data/media" >"$W/logs/index-media.log" 2>&1 || die "catalog new media failed"
echo "indexed media ($(human "$SIZE")) in ${T}s"

SERVE_PID=""
# Its last refusal is kept in the logs, so a server that never answers says why.
serve_ready() { timeout 10 "$BIN" catalog contents "$1" >/dev/null 2>"$W/logs/contents-$1.err"; }
# start_serve CATALOG [--chunk-size N]: starts `catalog serve` and waits until it answers.
start_serve() {
  local name=$1
  shift
  "$BIN" catalog serve "$name" "$@" >>"$W/logs/serve-$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  poll 60 "catalog '$name' answering" serve_ready "$name"
  alive "$pid" || die "catalog serve $name exited; see the log"
  LAST_SERVE=$pid
}
stop_serve() {
  stop_pid "$1"
  forget_pid "$1"
}
start_serve media
SERVE_PID=$LAST_SERVE

# ---------------------------------------------------------------------------------------------
# 1. Download throughput.
download() { # download WINDOW [BATCH]: sets T; checks the size and removes the copy
  local out=$SHM/big.bin extra=()
  [ -n "${2:-}" ] && extra=(--batch "$2")
  rm -f "$out"
  timed "$BIN" catalog download media /big.bin "$out" --force --window "$1" "${extra[@]}" >>"$W/logs/download.log" 2>&1 ||
    die "download (window $1) failed; see $W/logs/download.log"
  [ "$(stat -c %s "$out")" = "$SIZE" ] || die "download produced $(stat -c %s "$out") bytes, expected $SIZE"
  rm -f "$out"
}

if part 1; then
log "1. download throughput (v2) vs cat of the local file (page cache warm) and the raw NATS ceiling"
# The defaults are whatever the binary says (ClientOptions::default(), DEFAULT_CHUNK_SIZE).
DEFAULT_WINDOW=$("$BIN" catalog download --help | sed -n 's/.*--window.*\[default: \([0-9]*\)\].*/\1/p' | head -n 1)
DEFAULT_BATCH=$("$BIN" catalog download --help | sed -n 's/.*--batch.*\[default: \([0-9]*\)\].*/\1/p' | head -n 1)
DEFAULT_CHUNK=$("$BIN" catalog serve --help | sed -n 's/.*--chunk-size.*\[default: \([0-9]*\)\].*/\1/p' | head -n 1)
: "${DEFAULT_WINDOW:=32}" "${DEFAULT_BATCH:=8}" "${DEFAULT_CHUNK:=262144}"
step "$BENCH_STEP_TIMEOUT" cat "$BIG" >/dev/null
cat_rates=()
dl_rates=()
for ((r = 0; r < BENCH_REPEAT; r++)); do
  timed cat "$BIG" >/dev/null
  cat_rates+=("$(mbps "$SIZE" "$T")")
  download "$DEFAULT_WINDOW"
  dl_rates+=("$(mbps "$SIZE" "$T")")
done
CAT_MBPS=$(median "${cat_rates[@]}")
DL_MBPS=$(median "${dl_rates[@]}")
echo "download (chunk $(human "$DEFAULT_CHUNK"), window $DEFAULT_WINDOW, batch $DEFAULT_BATCH): ${DL_MBPS} MB/s" \
  "(runs: ${dl_rates[*]});  cat from page cache: ${CAT_MBPS} MB/s (runs: ${cat_rates[*]});  ratio $(ratio "$DL_MBPS" "$CAT_MBPS")"
echo "(wall time of the whole command: process start, connect, listing, transfer, sha256 check, write to tmpfs)"
row "1. download MB/s (defaults, median of $BENCH_REPEAT)" "$DL_MBPS" "$CAT_MBPS" "$(ratio "$DL_MBPS" "$CAT_MBPS")" "cat, page cache / higher"

# The raw NATS ceiling: the same bytes, in messages of a sealed chunk's size (data, proof of
# up to 2*log2(leaves) hashes, nonce, tag), through the same nats-server, same window.
LEAVES=$(((SIZE + 16383) / 16384))
PROOF_HASHES=$(awk -v n="$LEAVES" 'BEGIN { l = 0; while (2 ^ l < n) l++; print 2 * l }')
MSG_BYTES=$((DEFAULT_CHUNK + 2 + 32 * PROOF_HASHES + 24 + 16))
NATS_URL="nats://127.0.0.1:$NATS_PORT"
ceil_rates=()
for ((r = 0; r < BENCH_REPEAT; r++)); do
  step "$BENCH_STEP_TIMEOUT" "$CEILING" "$NATS_URL" "$SIZE" "$MSG_BYTES" "$DEFAULT_WINDOW" >"$W/ceiling.txt" 2>&1 ||
    die "raw_nats_ceiling failed: $(tail -n 3 "$W/ceiling.txt")"
  ceil_rates+=("$(field mbps "$W/ceiling.txt")")
done
CEIL_MBPS=$(median "${ceil_rates[@]}")
echo "raw NATS ceiling (messages of $MSG_BYTES bytes, window $DEFAULT_WINDOW, no crypto): ${CEIL_MBPS} MB/s (runs: ${ceil_rates[*]});" \
  "download/ceiling $(ratio "$DL_MBPS" "$CEIL_MBPS")"
row "1. download MB/s vs raw NATS ceiling (goal >= 0.6x)" "$DL_MBPS" "$CEIL_MBPS" "$(ratio "$DL_MBPS" "$CEIL_MBPS")" "raw NATS, same msgs / higher"

fi

if part 1 && [ "$BENCH_TABLE" = 1 ]; then
log "1b. chunk size x window table"
read -r -a WINDOWS <<<"$BENCH_WINDOWS"
read -r -a CHUNKS <<<"$BENCH_CHUNKS"
TABLE=()
CLAMPED=0
header="chunk"
for w in "${WINDOWS[@]}"; do header+="|win $w MB/s"; done
header+="|64K read p50 ms|64K read p99 ms"
TABLE+=("$header")
for c in "${CHUNKS[@]}"; do
  cs=$(to_bytes "$c")
  label=$c
  if [ "$cs" -gt "$MAX_CHUNK" ]; then
    cs=$MAX_CHUNK
    label="$c*"
    CLAMPED=1
  fi
  stop_serve "$SERVE_PID"
  start_serve media --chunk-size "$cs"
  SERVE_PID=$LAST_SERVE
  line=$label
  for w in "${WINDOWS[@]}"; do
    download "$w"
    line+="|$(mbps "$SIZE" "$T")"
  done
  step "$BENCH_STEP_TIMEOUT" "$LATENCY" media /big.bin "$BENCH_LAT_N" 65536 >"$W/lat.txt" 2>&1 ||
    die "ranged_latency failed: $(tail -n 3 "$W/lat.txt")"
  line+="|$(field p50_ms "$W/lat.txt")|$(field p99_ms "$W/lat.txt")"
  TABLE+=("$line")
  echo "  chunk $label: ${line#*|}" | tr '|' ' '
done
echo
echo "download MB/s by chunk size and window (batch ${DEFAULT_BATCH:-default}; one run each; $(human "$SIZE") file):"
printf '%s\n' "${TABLE[@]}" | column -t -s '|' -o '   '
[ $CLAMPED = 0 ] ||
  echo "(* clamped to the server's largest chunk, $MAX_CHUNK bytes, so that a sealed chunk fits NATS' 1 MiB max_payload)"

# Back to the product's defaults for everything after this.
stop_serve "$SERVE_PID"
start_serve media
SERVE_PID=$LAST_SERVE
fi

# ---------------------------------------------------------------------------------------------
# 2. Ranged-read latency through the library.
if part 2; then
log "2. latency of $BENCH_LAT_N random 64 KiB ranged reads through the library (default chunk size)"
step "$BENCH_STEP_TIMEOUT" "$LATENCY" media /big.bin "$BENCH_LAT_N" 65536 >"$W/lat.txt" 2>&1 ||
  die "ranged_latency failed: $(tail -n 3 "$W/lat.txt")"
grep -v '^RESULT' "$W/lat.txt" || true
echo "(each read is a cold fetch: the library client has no cache; it requests, receives, verifies and decrypts the covering 16 KiB leaves, or chunks for a range over a quarter chunk)"
row "2. 64K ranged read p50 ms (library)" "$(field p50_ms "$W/lat.txt")" "-" "-" "- / lower"
row "2. 64K ranged read p99 ms (library)" "$(field p99_ms "$W/lat.txt")" "-" "-" "- / lower"
# The same for 4 KiB ranges: one leaf per read, the library's share of part 3c's mount figure.
step "$BENCH_STEP_TIMEOUT" "$LATENCY" media /big.bin "$BENCH_LAT_N" 4096 >"$W/lat4k.txt" 2>&1 ||
  die "ranged_latency (4 KiB) failed: $(tail -n 3 "$W/lat4k.txt")"
grep -v '^RESULT' "$W/lat4k.txt" || true
row "2. 4K ranged read p50 ms (library)" "$(field p50_ms "$W/lat4k.txt")" "-" "-" "- / lower"
row "2. 4K ranged read p99 ms (library)" "$(field p99_ms "$W/lat4k.txt")" "-" "-" "- / lower"
fi

# ---------------------------------------------------------------------------------------------
# 3. The mount vs sshfs.
MOUNT_PID=""
mount_natster() {
  unmount_natster
  local t0 t1
  t0=$(date +%s%N)
  "$BIN" mount "$MNT_N" --foreground >>"$W/logs/mount.log" 2>&1 &
  MOUNT_PID=$!
  PIDS+=("$MOUNT_PID")
  wait_mounted "$MNT_N" "$MOUNT_PID" 120 "natster mount" "$W/logs/mount.log"
  t1=$(date +%s%N)
  MOUNT_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
}
unmount_natster() {
  [ -n "$MOUNT_PID" ] || return 0
  if is_mounted "$MNT_N"; then
    timeout 20 "$BIN" umount "$MNT_N" >/dev/null 2>&1 || unmount "$MNT_N"
  fi
  local i
  for ((i = 0; i < 100; i++)); do
    alive "$MOUNT_PID" || break
    sleep 0.1
  done
  stop_pid "$MOUNT_PID"
  forget_pid "$MOUNT_PID"
  MOUNT_PID=""
}
mount_rss() { # peak RSS of the mount process, MiB
  awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$MOUNT_PID/status" 2>/dev/null || echo "?"
}

# ---- throwaway sshd on a random free loopback port -----------------------------------------
log "3. starting a throwaway sshd for sshfs"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host_ed25519" -C natster-bench-host
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/client_ed25519" -C natster-bench-client
cp "$W/ssh/client_ed25519.pub" "$W/ssh/authorized_keys"
chmod 600 "$W/ssh/authorized_keys"
SFTP_SERVER=internal-sftp
for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server; do
  [ -x "$p" ] && { SFTP_SERVER=$p; break; }
done
if [ ! -d /run/sshd ]; then
  mkdir -p -m 0755 /run/sshd
  MADE_RUN_SSHD=1
fi
SSHD_PID=""
for attempt in 1 2 3 4 5; do
  SSH_PORT=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
  ss -ltnH "sport = :$SSH_PORT" | grep -q . && continue
  cat >"$W/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $W/ssh/host_ed25519
PidFile $W/ssh/sshd.pid
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp $SFTP_SERVER
LogLevel ERROR
EOF
  timeout 10 "$SSHD" -t -f "$W/ssh/sshd_config" || die "sshd rejects the generated config"
  "$SSHD" -D -e -f "$W/ssh/sshd_config" >>"$W/logs/sshd.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    ss -ltnH "sport = :$SSH_PORT" | grep -q . && break
    sleep 0.1
  done
  if alive "$pid" && ss -ltnH "sport = :$SSH_PORT" | grep -q .; then
    SSHD_PID=$pid
    break
  fi
  stop_pid "$pid"
  forget_pid "$pid"
done
[ -n "$SSHD_PID" ] || die "sshd did not start; see $W/logs/sshd.log"

SSHFS_PID=""
mount_sshfs() {
  unmount_sshfs
  sshfs -f -F /dev/null -p "$SSH_PORT" \
    -o ro,IdentityFile="$W/ssh/client_ed25519",IdentitiesOnly=yes,BatchMode=yes \
    -o StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR \
    "root@127.0.0.1:$W/data" "$MNT_S" >>"$W/logs/sshfs.log" 2>&1 &
  SSHFS_PID=$!
  PIDS+=("$SSHFS_PID")
  wait_mounted "$MNT_S" "$SSHFS_PID" 30 "sshfs" "$W/logs/sshfs.log"
}
unmount_sshfs() {
  [ -n "$SSHFS_PID" ] || return 0
  unmount "$MNT_S"
  local i
  for ((i = 0; i < 100; i++)); do
    alive "$SSHFS_PID" || break
    sleep 0.1
  done
  stop_pid "$SSHFS_PID"
  forget_pid "$SSHFS_PID"
  SSHFS_PID=""
}

# ---- (a) cold and (b) warm sequential read -------------------------------------------------
# Per filesystem: fresh mount, page cache dropped (both ends: the server reads from disk too),
# read once (cold), read again through the same mount (warm).
seq_read() { # seq_read FILE WHAT: sets RATE
  timed dd if="$1" of=/dev/null bs=1M status=none || die "dd of $2 failed"
  RATE=$(mbps "$SIZE" "$T")
}
N_COLD=""
if part 3a; then
log "3a/3b. sequential read: cold (fresh mount, page cache dropped; median of $BENCH_REPEAT, natster and sshfs alternated), then warm (read again)"
n_colds=()
s_colds=()
# seq_pass MOUNT WHAT PASS: a cold read of MOUNT's big file (sets COLD) and, on pass 0, a
# warm one right after (sets WARM).
seq_pass() {
  drop_caches
  seq_read "$1/media/big.bin" "$2 (cold)"
  COLD=$RATE
  if [ "$3" -eq 0 ]; then
    seq_read "$1/media/big.bin" "$2 (warm)"
    WARM=$RATE
  fi
}
for ((r = 0; r < BENCH_REPEAT; r++)); do
  mount_natster
  [ "$r" -eq 0 ] && echo "natster mount up in ${MOUNT_SECS}s"
  seq_pass "$MNT_N" "the natster mount" "$r"
  n_colds+=("$COLD")
  if [ "$r" -eq 0 ]; then
    N_WARM=$WARM
    echo "natster mount peak RSS after the sequential reads: $(mount_rss) MiB (cache budget 256M by default)"
  fi
  unmount_natster
  mount_sshfs
  seq_pass "$MNT_S" "sshfs" "$r"
  s_colds+=("$COLD")
  [ "$r" -eq 0 ] && S_WARM=$WARM
  unmount_sshfs
done
N_COLD=$(median "${n_colds[@]}")
S_COLD=$(median "${s_colds[@]}")
echo "cold sequential runs MB/s: natster ${n_colds[*]}; sshfs ${s_colds[*]}"
drop_caches
seq_read "$BIG" "the local file (cold)"
L_COLD=$RATE
# Warm: read once more into the page cache, then timed with the same dd as the mounts.
step "$BENCH_STEP_TIMEOUT" cat "$BIG" >/dev/null
seq_read "$BIG" "the local file (warm)"
L_WARM=$RATE
echo "cold sequential MB/s: natster ${N_COLD}, sshfs ${S_COLD}, local disk ${L_COLD}; natster/sshfs $(ratio "$N_COLD" "$S_COLD") $DROP_NOTE"
echo "warm sequential MB/s: natster ${N_WARM}, sshfs ${S_WARM}, local page cache ${L_WARM};" \
  "natster/local $(ratio "$N_WARM" "$L_WARM"), natster/sshfs $(ratio "$N_WARM" "$S_WARM")"
row "3a. cold sequential read MB/s (median of $BENCH_REPEAT; goal >= 1.5x)" "$N_COLD" "$S_COLD" "$(ratio "$N_COLD" "$S_COLD")" "sshfs / higher"
row "3a. (reference) local disk, cold" "$N_COLD" "$L_COLD" "$(ratio "$N_COLD" "$L_COLD")" "local disk / higher"
row "3b. warm sequential read MB/s" "$N_WARM" "$L_WARM" "$(ratio "$N_WARM" "$L_WARM")" "local page cache / higher"
row "3b. warm sequential read MB/s" "$N_WARM" "$S_WARM" "$(ratio "$N_WARM" "$S_WARM")" "sshfs / higher"
fi

# ---- (c) random 4 KiB reads ----------------------------------------------------------------
if part 3c; then
log "3c. $BENCH_RANDOM_N random 4 KiB preads (both remounted, page cache dropped before each run, same offsets)"
mount_natster
mount_sshfs
drop_caches
step "$BENCH_STEP_TIMEOUT" "$RANDOM_READS" "$MNT_N/media/big.bin" "$BENCH_RANDOM_N" 4096 >"$W/rand-n.txt" 2>&1 ||
  die "random_reads on the natster mount failed: $(tail -n 3 "$W/rand-n.txt")"
drop_caches
step "$BENCH_STEP_TIMEOUT" "$RANDOM_READS" "$MNT_S/media/big.bin" "$BENCH_RANDOM_N" 4096 >"$W/rand-s.txt" 2>&1 ||
  die "random_reads on sshfs failed: $(tail -n 3 "$W/rand-s.txt")"
drop_caches
step "$BENCH_STEP_TIMEOUT" "$RANDOM_READS" "$BIG" "$BENCH_RANDOM_N" 4096 >"$W/rand-l.txt" 2>&1 ||
  die "random_reads on the local file failed"
for f in n s l; do grep -v '^RESULT' "$W/rand-$f.txt" || true; done
N_P50=$(field p50_ms "$W/rand-n.txt")
N_P99=$(field p99_ms "$W/rand-n.txt")
S_P50=$(field p50_ms "$W/rand-s.txt")
S_P99=$(field p99_ms "$W/rand-s.txt")
L_P50=$(field p50_ms "$W/rand-l.txt")
L_P99=$(field p99_ms "$W/rand-l.txt")
echo "random 4K p50/p99 ms: natster ${N_P50}/${N_P99}, sshfs ${S_P50}/${S_P99}, local disk ${L_P50}/${L_P99};" \
  "p99 natster/sshfs $(ratio "$N_P99" "$S_P99") $DROP_NOTE"
echo "(sshfs: remounted with default options, i.e. its attribute/dir caches on; no data cache survives a remount)"
# The floor NATS itself sets for one leaf read here: a request answered by one record of a
# sealed leaf's size (data, a proof of log2(leaves) hashes, nonce, tag) as its reply, as an
# inline read is, through the same nats-server, with nothing else done.
LEAF_HASHES=$(awk -v n="$(((SIZE + 16383) / 16384))" 'BEGIN { l = 0; while (2 ^ l < n) l++; print l }')
step "$BENCH_STEP_TIMEOUT" "$FLOOR" "nats://127.0.0.1:$NATS_PORT" "$BENCH_RANDOM_N" $((16384 + 2 + 32 * LEAF_HASHES + 40)) >"$W/floor.txt" 2>&1 ||
  die "nats_read_floor failed: $(tail -n 3 "$W/floor.txt")"
grep -v '^RESULT' "$W/floor.txt" || true
F_P50=$(field reply_p50_ms "$W/floor.txt")
F_P99=$(field reply_p99_ms "$W/floor.txt")
row "3c. random 4K pread p50 ms (goal <= 1x)" "$N_P50" "$S_P50" "$(ratio "$N_P50" "$S_P50")" "sshfs / lower"
row "3c. random 4K pread p99 ms (goal <= 1x)" "$N_P99" "$S_P99" "$(ratio "$N_P99" "$S_P99")" "sshfs / lower"
row "3c. (reference) local disk p99 ms" "$N_P99" "$L_P99" "$(ratio "$N_P99" "$L_P99")" "local disk / lower"
row "3c. (reference) NATS floor of a leaf read, p50 ms" "$N_P50" "$F_P50" "$(ratio "$N_P50" "$F_P50")" "raw NATS, same msgs / lower"
row "3c. (reference) NATS floor of a leaf read, p99 ms" "$N_P99" "$F_P99" "$(ratio "$N_P99" "$F_P99")" "raw NATS, same msgs / lower"
fi

# ---- (e) 8 concurrent sequential readers of different files ------------------------------
if part 3e; then
  log "3e. 8 concurrent cold sequential readers of 8 different files ($(human "$PART_SIZE") each)"
  unmount_sshfs
  mount_natster
  if [ -z "$N_COLD" ]; then
    drop_caches
    seq_read "$MNT_N/media/big.bin" "the natster mount (cold, one reader)"
    N_COLD=$RATE
    unmount_natster
    mount_natster
  fi
  drop_caches
  eight() { # eight DIR: the 8 parts read at once; each dd must succeed
    local k pids=() rc=0
    for ((k = 0; k < 8; k++)); do
      dd if="$1/part$k.bin" of=/dev/null bs=1M status=none &
      pids+=("$!")
    done
    for k in "${pids[@]}"; do wait "$k" || rc=1; done
    return $rc
  }
  export -f eight
  timed bash -c 'eight "$1"' _ "$MNT_N/media/eight" || die "8 concurrent readers on the natster mount failed"
  N_EIGHT=$(mbps $((PART_SIZE * 8)) "$T")
  unmount_natster
  mount_sshfs
  drop_caches
  timed bash -c 'eight "$1"' _ "$MNT_S/media/eight" || die "8 concurrent readers on sshfs failed"
  S_EIGHT=$(mbps $((PART_SIZE * 8)) "$T")
  unmount_sshfs
  echo "8 concurrent cold readers, aggregate MB/s: natster ${N_EIGHT} (one reader: ${N_COLD}), sshfs ${S_EIGHT};" \
    "natster 8 / natster 1 $(ratio "$N_EIGHT" "$N_COLD")"
  row "3e. 8 concurrent readers MB/s (goal >= 1x)" "$N_EIGHT" "$N_COLD" "$(ratio "$N_EIGHT" "$N_COLD")" "natster, 1 reader / higher"
  row "3e. 8 concurrent readers MB/s" "$N_EIGHT" "$S_EIGHT" "$(ratio "$N_EIGHT" "$S_EIGHT")" "sshfs, 8 readers / higher"
fi

# ---- (d) ls -lR of a large listing ---------------------------------------------------------
if part 3d; then
log "3d. ls -lR of $BENCH_ENTRIES files in $BENCH_DIRS folders"
unmount_natster
unmount_sshfs
timed perl -e '
  my ($root, $n, $d) = @ARGV;
  for my $i (0 .. $n - 1) {
    my $dir = sprintf("%s/d%05d", $root, $i % $d);
    mkdir $dir unless -d $dir;
    open(my $f, ">", sprintf("%s/f%07d.txt", $dir, $i)) or die "$dir: $!";
    print $f "$i\n";
    close $f or die;
  }' "$W/data/tree" "$BENCH_ENTRIES" "$BENCH_DIRS" || die "cannot create the tree"
echo "created $BENCH_ENTRIES files in ${T}s"
timed "$BIN" catalog new tree "$W/data/tree" >"$W/logs/index-tree.log" 2>&1 || die "catalog new tree failed"
INDEX_TREE=$T
echo "indexed tree in ${INDEX_TREE}s"
start_serve tree
mount_natster
TREE_MOUNT_SECS=$MOUNT_SECS
echo "natster mount (listing $BENCH_ENTRIES entries) up in ${TREE_MOUNT_SECS}s"
mount_sshfs
drop_caches
ls_count() { grep -c '^-' "$1" || true; }
timed ls -lR "$MNT_N/tree" >"$W/ls-n.txt" || die "ls -lR on the natster mount failed"
N_LS=$T
timed ls -lR "$MNT_N/tree" >"$W/ls-n2.txt" || die "second ls -lR on the natster mount failed"
N_LS2=$T
timed ls -lR "$MNT_S/tree" >"$W/ls-s.txt" || die "ls -lR on sshfs failed"
S_LS=$T
timed ls -lR "$MNT_S/tree" >"$W/ls-s2.txt" || die "second ls -lR on sshfs failed"
S_LS2=$T
timed ls -lR "$W/data/tree" >"$W/ls-l.txt"
L_LS=$T
NF=$(ls_count "$W/ls-n.txt")
SF=$(ls_count "$W/ls-s.txt")
[ "$NF" = "$BENCH_ENTRIES" ] || echo "WARNING: ls -lR through the natster mount listed $NF files, expected $BENCH_ENTRIES"
[ "$SF" = "$BENCH_ENTRIES" ] || echo "WARNING: ls -lR through sshfs listed $SF files, expected $BENCH_ENTRIES"
echo "ls -lR seconds: natster ${N_LS} (again: ${N_LS2}), sshfs ${S_LS} (again: ${S_LS2}), local ${L_LS};" \
  "natster/sshfs $(ratio "$N_LS" "$S_LS") cold, $(ratio "$N_LS2" "$S_LS2") again"
echo "natster mount peak RSS with the $BENCH_ENTRIES-entry catalog: $(mount_rss) MiB"
row "3d. ls -lR s, fresh mount" "$N_LS" "$S_LS" "$(ratio "$N_LS" "$S_LS")" "sshfs / lower"
row "3d. ls -lR s, again" "$N_LS2" "$S_LS2" "$(ratio "$N_LS2" "$S_LS2")" "sshfs / lower"
row "3d. (reference) local ls -lR s" "$N_LS2" "$L_LS" "$(ratio "$N_LS2" "$L_LS")" "local, warm / lower"
row "3d. mount time s ($BENCH_ENTRIES entries)" "$TREE_MOUNT_SECS" "-" "-" "- / lower"
fi

unmount_natster
unmount_sshfs

# ---- 4. the listing rows, if their script is there (scripts/bench_listing.sh) ---------------
if part 4 && [ -f scripts/bench_listing.sh ]; then
  # shellcheck source=/dev/null
  . scripts/bench_listing.sh && listing_bench_all
fi

# ---- 5. a 3-node cluster vs one server (scripts/bench_cluster.sh) --------------------------
if part 5 && [ -f scripts/bench_cluster.sh ]; then
  # shellcheck source=/dev/null
  . scripts/bench_cluster.sh
  while IFS= read -r line; do
    [ -n "$line" ] && SUMMARY+=("$line")
  done < <(BENCH_BIN=${BENCH_BIN:-$BIN} bench_cluster_rows || echo "5. cluster rows failed (see above)|n/a|n/a|n/a|-")
fi
print_summary
[ -z "$DROP_NOTE" ] || echo "$DROP_NOTE"
