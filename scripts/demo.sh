#!/usr/bin/env bash
# The main job on the embedded default, from nothing: a local NATS operator and an
# operator-mode nats-server with the global service and the hub catalog, two people (alice and
# bob), alice serving examples/media and sharing it with bob, bob finding the share in his
# inbox, importing everything pending and mounting it at ./mnt (alice's catalog and the hub);
# then ls -lR, presence on the catalog folder and the video's duration read through the mount,
# a wait for Ctrl-C (on a terminal), and a clean teardown.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
bin="$PWD/target/release/natster-mount"
work=$(mktemp -d /tmp/natster-demo.XXXXXX)
export NATSTER_OPERATOR_HOME="$work/operator"
alice="$work/alice"
bob="$work/bob"
mnt="$PWD/mnt"
pids=()

cleanup() {
  set +e
  if grep -qs " $mnt " /proc/mounts; then NATSTER_HOME="$bob" "$bin" umount "$mnt" >/dev/null 2>&1 || fusermount3 -uz "$mnt"; fi
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[i]}" 2>/dev/null; timeout 5 tail --pid="${pids[i]}" -f /dev/null 2>/dev/null; done
  rm -rf "$work"
  rmdir "$mnt" 2>/dev/null
  echo "demo: stopped and cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n$ %s\n' "$*"; }
as() { local who=$1; shift; say "[$who] natster-mount $*"; NATSTER_HOME="$work/$who" "$bin" "$@"; }

say "natster-mount operator init"
"$bin" operator init
"$bin" operator up >"$work/operator-up.log" 2>&1 &
pids+=($!)
port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$work/operator/operator/local-server.json")
for _ in $(seq 200); do grep -q "Ctrl-C to stop" "$work/operator-up.log" && break; sleep 0.05; done
grep -q "Ctrl-C to stop" "$work/operator-up.log" || { cat "$work/operator-up.log"; exit 1; }
say "natster-mount operator up &"
grep -E "^(nats-server v|hub catalog|global service running)" "$work/operator-up.log"
echo "operator-mode nats-server running on nats://127.0.0.1:$port"

as alice operator add-account alice
as bob operator add-account bob
as alice catalog new media examples/media --description "natster-mount samples"
say "[alice] natster-mount catalog serve media &"
NATSTER_HOME="$alice" "$bin" catalog serve media >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do NATSTER_HOME="$alice" "$bin" --timeout 1 catalog contents media >/dev/null 2>&1 && break; sleep 0.05; done
as alice catalog share media bob
as bob catalog inbox
as bob catalog import --all
as bob catalog ls
as bob catalog contents media

mkdir -p "$mnt"
as bob mount ./mnt
say "ls -lR ./mnt"
ls -lR mnt
say "getfattr -d mnt/media   # presence, revision and owner of the catalog folder"
python3 -c 'import os, sys; [print(f"{a}=\"{os.getxattr(sys.argv[1], a).decode()}\"") for a in os.listxattr(sys.argv[1])]' "$mnt/media"
say "ffprobe -v error -show_entries format=duration -of csv=p=0 mnt/media/trailers/natster-demo.mp4"
ffprobe -v error -show_entries format=duration -of csv=p=0 "$mnt/media/trailers/natster-demo.mp4"

if [ -t 0 ]; then
  echo
  echo "demo: bob has alice's catalog mounted at ./mnt; press Ctrl-C to stop"
  while true; do sleep 1; done
fi
