#!/usr/bin/env bash
# natster-mount listing benchmarks (issue 16's listing rows), side by side with peers:
#
#   listing_bench_lslr     `ls -lR` of BENCH_ENTRIES files in BENCH_ENTRIES/100 folders: fresh
#                          mount vs sshfs fresh; again vs a local warm `ls -lR`
#   listing_bench_bigdir   `ls` of one folder of BENCH_BIGDIR entries vs local (fresh mount; again)
#   listing_bench_million  mount of a BENCH_MILLION-entry catalog (half in one folder): time until
#                          the whole listing shows, RSS then (before any read); `ls` of the big folder
#   listing_bench_reindex  `catalog new` of an unchanged BENCH_REINDEX-file tree
#
# Sourced by scripts/bench.sh, these functions use its helpers and state (timed, step, poll, row,
# mount_natster/unmount_natster, mount_sshfs/unmount_sshfs, stop_serve, BIN, W, MNT_N, MNT_S,
# MOUNT_PID, PIDS, alive, drop_caches) and add rows to its SUMMARY. Run on its own
# (`scripts/bench_listing.sh [lslr|bigdir|million|reindex]...`, default all), it builds, starts
# its own nats-server and sshd with the same definitions, and prints the same table. Rows:
#   measure | natster | peer | ratio | peer is / better is
#
# Settings (environment): BENCH_ENTRIES=100000, BENCH_BIGDIR=100000, BENCH_MILLION=1000000,
# BENCH_REINDEX=10000, BENCH_STEP_TIMEOUT=600.

BENCH_ENTRIES=${BENCH_ENTRIES:-100000}
BENCH_BIGDIR=${BENCH_BIGDIR:-100000}
BENCH_MILLION=${BENCH_MILLION:-1000000}
BENCH_REINDEX=${BENCH_REINDEX:-10000}

# make_tree DIR N FOLDERS: N one-line files spread over FOLDERS folders (FOLDERS=1: all in DIR).
listing_make_tree() {
  timed perl -e '
    my ($root, $n, $d) = @ARGV;
    for my $i (0 .. $n - 1) {
      my $dir = $d == 1 ? $root : sprintf("%s/d%05d", $root, $i % $d);
      mkdir $dir unless -d $dir;
      open(my $f, ">", sprintf("%s/f%07d.txt", $dir, $i)) or die "$dir: $!";
      print $f "$i\n";
      close $f or die;
    }' "$1" "$2" "$3" || die "cannot create the tree in $1"
}

listing_files() { grep -c '^-' "$1" || true; }

# listing_index NAME DIR: writes catalog NAME's index for the files under DIR with their real
# paths, sizes and mtimes but made-up hashes: listing costs nothing of the content, and
# `catalog new` of 100,000 files spends minutes syncing their tree files, which is not what
# these rows measure (listing_bench_reindex times `catalog new` itself).
listing_index() {
  timed perl -MFile::Find -e '
    my ($path, $name, $root) = @ARGV;
    my @files;
    find({ no_chdir => 1, wanted => sub { push @files, $File::Find::name if -f $_ } }, $root);
    @files = sort @files;
    open(my $f, ">", $path) or die "$path: $!";
    print $f "{\"name\":\"$name\",\"root_dir\":\"$root\",\"description\":\"\",\"last_modified\":1,\"entries\":[";
    my $i = 0;
    for my $abs (@files) {
      my @st = stat($abs);
      my $rel = substr($abs, length($root));
      my $h = sprintf("%064x", ++$i);
      print $f "," if $i > 1;
      print $f "{\"path\":\"$rel\",\"mime_type\":\"text/plain\",\"hash\":\"$h\",\"byte_size\":$st[7],\"mtime_ns\":",
        $st[9] * 1000000000, ",\"tree\":\"$h\"}";
    }
    print $f "]}\n";
    close $f or die;' "$NATSTER_HOME/$1.json" "$1" "$2" || die "cannot write the index of $1"
}

# The natster mount's FUSE request counts (user.natster.calls on its root).
listing_calls() {
  python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.natster.calls").decode())' "$MNT_N" 2>/dev/null || echo "?"
}

# listing_serve NAME: `catalog serve NAME --no-watch`, until it says it serves (a listing of a
# million entries is too long for a `catalog contents` probe); sets LISTING_SERVE.
listing_serve() {
  local name=$1 log=$W/logs/serve-$1.log
  : >"$log"
  "$BIN" catalog serve "$name" --no-watch >>"$log" 2>&1 &
  LISTING_SERVE=$!
  PIDS+=("$LISTING_SERVE")
  listing_serving() {
    alive "$LISTING_SERVE" || die "catalog serve $name exited; see $log"
    grep -q "serving catalog '$name'" "$log"
  }
  poll "$BENCH_STEP_TIMEOUT" "catalog '$name' served" listing_serving
}

listing_bench_lslr() {
  log "listing: ls -lR of $BENCH_ENTRIES files in $(((BENCH_ENTRIES + 99) / 100)) folders"
  unmount_natster
  unmount_sshfs
  local tree=$W/data/lslr
  rm -rf "$tree" && mkdir -p "$tree"
  listing_make_tree "$tree" "$BENCH_ENTRIES" $(((BENCH_ENTRIES + 99) / 100))
  listing_index lslr "$tree"
  listing_serve lslr
  local serve=$LISTING_SERVE
  mount_natster
  mount_sshfs
  drop_caches
  timed ls -lR "$MNT_N/lslr" >"$W/lslr-n.txt" || die "ls -lR on the natster mount failed"
  local n1=$T
  timed ls -lR "$MNT_N/lslr" >"$W/lslr-n2.txt" || die "second ls -lR on the natster mount failed"
  local n2=$T
  timed ls -lR "$MNT_S/lslr" >"$W/lslr-s.txt" || die "ls -lR on sshfs failed"
  local s1=$T
  timed ls -lR "$tree" >/dev/null
  timed ls -lR "$tree" >"$W/lslr-l.txt"
  local l2=$T
  local nf sf
  nf=$(listing_files "$W/lslr-n.txt")
  sf=$(listing_files "$W/lslr-s.txt")
  [ "$nf" = "$BENCH_ENTRIES" ] || echo "WARNING: ls -lR through the natster mount listed $nf files, expected $BENCH_ENTRIES"
  [ "$sf" = "$BENCH_ENTRIES" ] || echo "WARNING: ls -lR through sshfs listed $sf files, expected $BENCH_ENTRIES"
  echo "ls -lR s: natster fresh ${n1}, again ${n2}; sshfs fresh ${s1}; local warm ${l2}"
  echo "natster FUSE requests after both: $(listing_calls)"
  row "L1. ls -lR ${BENCH_ENTRIES} s, fresh mount" "$n1" "$s1" "$(ratio "$n1" "$s1")" "sshfs fresh / lower (goal <= 0.5x)"
  row "L1. ls -lR ${BENCH_ENTRIES} s, again" "$n2" "$l2" "$(ratio "$n2" "$l2")" "local warm / lower (goal <= 1.5x)"
  unmount_natster
  unmount_sshfs
  stop_serve "$serve"
}

listing_bench_bigdir() {
  log "listing: ls of one folder of $BENCH_BIGDIR entries"
  unmount_natster
  local tree=$W/data/bigdir
  rm -rf "$tree" && mkdir -p "$tree"
  listing_make_tree "$tree" "$BENCH_BIGDIR" 1
  listing_index bigdir "$tree"
  listing_serve bigdir
  local serve=$LISTING_SERVE
  mount_natster
  timed ls "$MNT_N/bigdir" >"$W/bigdir-n.txt" || die "ls on the natster mount failed"
  local n1=$T
  timed ls "$MNT_N/bigdir" >/dev/null || die "second ls on the natster mount failed"
  local n2=$T
  timed ls "$tree" >/dev/null
  timed ls "$tree" >"$W/bigdir-l.txt"
  local l=$T
  local got
  got=$(wc -l <"$W/bigdir-n.txt")
  [ "$got" = "$BENCH_BIGDIR" ] || echo "WARNING: ls through the natster mount listed $got entries, expected $BENCH_BIGDIR"
  echo "ls of a $BENCH_BIGDIR-entry folder s: natster fresh ${n1}, again ${n2}; local warm ${l}"
  row "L2. ls of a ${BENCH_BIGDIR}-entry folder s" "$n1" "$l" "$(ratio "$n1" "$l")" "local warm / lower (goal <= 2x)"
  row "L2. (again) ls of that folder s" "$n2" "$l" "$(ratio "$n2" "$l")" "local warm / lower"
  unmount_natster
  stop_serve "$serve"
}

listing_bench_million() {
  local n=$BENCH_MILLION half=$((BENCH_MILLION / 2))
  log "listing: mount of a $n-entry catalog ($half in one folder), before any read"
  unmount_natster
  # An index written directly (no files to hash): the server lists it, pages and all; nothing
  # is read.
  mkdir -p "$W/data/million"
  timed perl -e '
    my ($path, $root, $n, $half) = @ARGV;
    open(my $f, ">", $path) or die "$path: $!";
    print $f "{\"name\":\"million\",\"root_dir\":\"$root\",\"description\":\"\",\"last_modified\":1,\"entries\":[";
    for my $i (0 .. $n - 1) {
      my $p = $i < $half ? sprintf("/half/f%07d.mkv", $i) : sprintf("/d%04d/f%07d.mkv", $i % 1000, $i);
      my $h = sprintf("%064x", $i + 1);
      print $f "," if $i;
      print $f "{\"path\":\"$p\",\"description\":\"\",\"mime_type\":\"video/x-matroska\",\"hash\":\"$h\",\"byte_size\":",
        1000 + $i, ",\"mtime_ns\":1700000000000000000,\"tree\":\"$h\"}";
    }
    print $f "]}\n";
    close $f or die;' "$NATSTER_HOME/million.json" "$W/data/million" "$n" "$half" || die "cannot write the index"
  listing_serve million
  local serve=$LISTING_SERVE
  local t0 t1
  t0=$(date +%s%N)
  mount_natster
  local want=$((half + 2))
  listing_complete() { [ "$(stat -c %h "$MNT_N/million/half" 2>/dev/null)" = "$want" ]; }
  poll "$BENCH_STEP_TIMEOUT" "the $n-entry listing in the mount" listing_complete
  t1=$(date +%s%N)
  local up rss hwm
  up=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  sleep 2 # let the first refresh (one page: the same revision) settle
  rss=$(awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$MOUNT_PID/status")
  hwm=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$MOUNT_PID/status")
  timed ls "$MNT_N/million/half" >"$W/million-ls.txt" || die "ls of the big folder failed"
  local ls1=$T
  timed ls "$MNT_N/million/half" >/dev/null || die "second ls of the big folder failed"
  local ls2=$T
  echo "mount of $n entries: listing complete in ${up}s; RSS ${rss} MiB (peak ${hwm} MiB) before any read;" \
    "ls of its $half-entry folder ${ls1}s, again ${ls2}s"
  row "L3. mount of ${n} entries, s until listed" "$up" "5" "$(ratio "$up" 5)" "goal 5 s / lower"
  row "L3. mount RSS MiB before any read" "$rss" "400" "$(ratio "$rss" 400)" "goal 400 MiB / lower (peak ${hwm})"
  row "L3. ls of its ${half}-entry folder s" "$ls1" "-" "-" "- / lower (again ${ls2} s)"
  unmount_natster
  stop_serve "$serve"
  rm -f "$NATSTER_HOME/million.json"
}

listing_bench_reindex() {
  log "listing: re-index of an unchanged $BENCH_REINDEX-file tree"
  local tree=$W/data/reindex
  rm -rf "$tree" && mkdir -p "$tree"
  listing_make_tree "$tree" "$BENCH_REINDEX" $(((BENCH_REINDEX + 99) / 100))
  timed "$BIN" catalog new reindex "$tree" >"$W/logs/index-reindex.log" 2>&1 || die "catalog new reindex failed"
  local first=$T
  timed "$BIN" catalog new reindex "$tree" >>"$W/logs/index-reindex.log" 2>&1 || die "re-index failed"
  local again=$T
  echo "catalog new of $BENCH_REINDEX files: ${first}s; again, unchanged: ${again}s"
  row "L4. re-index ${BENCH_REINDEX} unchanged files s" "$again" "1" "$(ratio "$again" 1)" "goal 1 s / lower (first index ${first} s)"
}

listing_bench_all() {
  # The million first: a mount shows every catalog of the home, and the others' indexes would
  # be loaded too.
  listing_bench_million
  listing_bench_reindex
  listing_bench_bigdir
  listing_bench_lslr
}

# ---------------------------------------------------------------------------------------------
# Standalone: the same setup as scripts/bench.sh, for these rows only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  cd "$(dirname "$0")/.."
  REPO=$PWD
  BENCH_STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-600}
  BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}}
  BENCH_SIZE=-
  unset NATSTER_CONTEXT
  W="" MOUNTS=() PIDS=() STEP_PID="" MADE_RUN_SSHD=0 SUMMARY=() DROP_NOTE="" T=0
  log() { printf '%s\n' "== $*" >&2; }
  die() {
    printf 'bench_listing: error: %s\n' "$*" >&2
    exit 1
  }
  is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
  alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
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
  stop_tree() {
    local pid=$1 child
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do stop_pid "$child"; done
    stop_pid "$pid"
  }
  unmount() {
    is_mounted "$1" || return 0
    timeout 20 fusermount3 -u "$1" 2>/dev/null || timeout 20 fusermount3 -uz "$1" 2>/dev/null || true
  }
  print_summary() {
    [ ${#SUMMARY[@]} -gt 0 ] || return 0
    echo
    echo "SUMMARY (listing rows; $(nproc) CPUs, load average at start ${LOAD_START:-?}, at end $(cut -d' ' -f1-3 /proc/loadavg); ratio = natster / peer)"
    {
      echo "measure|natster|peer|ratio|peer is / better is"
      echo "-------|-------|----|-----|-------------------"
      printf '%s\n' "${SUMMARY[@]}"
    } | column -t -s '|' -o '   '
  }
  cleanup() {
    local rc=$? mp i
    trap - EXIT INT TERM HUP
    set +e
    if alive "$STEP_PID"; then stop_pid "$STEP_PID"; fi
    for mp in "${MOUNTS[@]}"; do unmount "$mp"; done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_tree "${PIDS[i]}"; done
    for mp in "${MOUNTS[@]}"; do unmount "$mp"; done
    [ $rc -ne 0 ] && print_summary
    if [ -n "$W" ] && [ -d "$W" ]; then
      if grep -q " $W/" /proc/self/mountinfo; then echo "bench_listing: something is still mounted under $W" >&2; else rm -rf --one-file-system "$W"; fi
    fi
    [ $MADE_RUN_SSHD = 1 ] && rmdir /run/sshd 2>/dev/null
    exit $rc
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  step() {
    local secs=$1 rc=0
    shift
    timeout -k 5 "$secs" "$@" &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    return $rc
  }
  timed() {
    local t0 t1 rc=0
    t0=$(date +%s%N)
    step "$BENCH_STEP_TIMEOUT" "$@" || rc=$?
    t1=$(date +%s%N)
    T=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }')
    return $rc
  }
  poll() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + secs))
    until "$@"; do
      [ "$(date +%s)" -lt "$deadline" ] || die "$what did not happen within ${secs}s"
      sleep 0.05
    done
  }
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 <= 0) print "n/a"; else printf "%.2fx", a / b }'; }
  row() { SUMMARY+=("$1|$2|$3|$4|$5"); }
  drop_caches() {
    timeout 60 sync || true
    [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || DROP_NOTE="(page cache not dropped)"
  }

  [ "$(id -u)" -eq 0 ] || die "run as root: the sshfs comparison starts an sshd"
  for tool in nats-server fusermount3 sshfs ssh-keygen perl column ss; do
    command -v "$tool" >/dev/null || PATH=$HOME/.cache/natster-mount/bin:$PATH
    command -v "$tool" >/dev/null || die "$tool is not installed (scripts/setup.sh)"
  done
  SSHD=$(command -v sshd || echo /usr/sbin/sshd)
  log "building release"
  step 1800 cargo build --release --quiet --bins || die "cargo build failed"
  BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/natster-mount}
  W=$(mktemp -d "$BENCH_TMP/natster-bench-listing.XXXXXX")
  mkdir -p "$W/logs" "$W/home" "$W/data" "$W/mnt/natster" "$W/mnt/sshfs" "$W/ssh"
  export NATSTER_HOME=$W/home
  MNT_N=$W/mnt/natster
  MNT_S=$W/mnt/sshfs
  MOUNTS=("$MNT_N" "$MNT_S")
  LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "work folder $W; $(nproc) CPUs; load average $LOAD_START"

  : >"$W/logs/nats-server.log"
  nats-server -a 127.0.0.1 -p -1 >"$W/logs/nats-server.log" 2>&1 &
  PIDS+=("$!")
  nats_port() { sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$W/logs/nats-server.log" | head -n 1; }
  nats_up() { [ -n "$(nats_port)" ]; }
  poll 15 "nats-server start" nats_up
  step 30 "$BIN" init --server "nats://127.0.0.1:$(nats_port)" >/dev/null || die "init failed"

  stop_serve() {
    stop_pid "$1"
    forget_pid "$1"
  }
  MOUNT_PID=""
  mount_natster() {
    unmount_natster
    "$BIN" mount "$MNT_N" --foreground >>"$W/logs/mount.log" 2>&1 &
    MOUNT_PID=$!
    PIDS+=("$MOUNT_PID")
    wait_mounted "$MNT_N" "$MOUNT_PID" 300 "natster mount" "$W/logs/mount.log"
  }
  unmount_natster() {
    [ -n "$MOUNT_PID" ] || return 0
    is_mounted "$MNT_N" && { timeout 20 "$BIN" umount "$MNT_N" >/dev/null 2>&1 || unmount "$MNT_N"; }
    stop_pid "$MOUNT_PID"
    forget_pid "$MOUNT_PID"
    MOUNT_PID=""
  }

  ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/client_ed25519"
  cp "$W/ssh/client_ed25519.pub" "$W/ssh/authorized_keys"
  chmod 600 "$W/ssh/authorized_keys"
  SFTP_SERVER=internal-sftp
  for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server; do [ -x "$p" ] && SFTP_SERVER=$p && break; done
  [ -d /run/sshd ] || { mkdir -p -m 0755 /run/sshd && MADE_RUN_SSHD=1; }
  SSH_PORT=""
  for attempt in 1 2 3 4 5; do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    ss -ltnH "sport = :$port" | grep -q . && continue
    printf '%s\n' "Port $port" "ListenAddress 127.0.0.1" "HostKey $W/ssh/host_ed25519" "PidFile $W/ssh/sshd.pid" \
      "AuthorizedKeysFile $W/ssh/authorized_keys" "PermitRootLogin prohibit-password" "PasswordAuthentication no" \
      "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" "Subsystem sftp $SFTP_SERVER" "LogLevel ERROR" \
      >"$W/ssh/sshd_config"
    "$SSHD" -D -e -f "$W/ssh/sshd_config" >>"$W/logs/sshd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < 100; i++)); do
      alive "$pid" || break
      ss -ltnH "sport = :$port" | grep -q . && break
      sleep 0.1
    done
    if alive "$pid" && ss -ltnH "sport = :$port" | grep -q .; then SSH_PORT=$port && break; fi
    stop_pid "$pid"
    forget_pid "$pid"
  done
  [ -n "$SSH_PORT" ] || die "sshd did not start; see $W/logs/sshd.log"
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
    stop_pid "$SSHFS_PID"
    forget_pid "$SSHFS_PID"
    SSHFS_PID=""
  }

  [ $# -gt 0 ] || set -- all
  for what in "$@"; do
    case $what in
    all) listing_bench_all ;;
    lslr | bigdir | million | reindex) "listing_bench_$what" ;;
    *) die "unknown part '$what' (lslr, bigdir, million, reindex, all)" ;;
    esac
  done
  print_summary
  [ -z "$DROP_NOTE" ] || echo "$DROP_NOTE"
fi
