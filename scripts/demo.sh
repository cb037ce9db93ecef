#!/usr/bin/env bash
# The main job on the embedded default, from nothing: a nats-server on loopback, the sample
# catalog (examples/media) indexed and served, every readable catalog mounted at ./mnt, a look
# at it with ls and ffprobe, then (on a terminal) a wait for Ctrl-C, and a clean teardown.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
bin="$PWD/target/release/natster-mount"
work=$(mktemp -d /tmp/natster-demo.XXXXXX)
export NATSTER_HOME="$work/home"
mnt="$PWD/mnt"
pids=()

cleanup() {
  set +e
  if grep -qs " $mnt " /proc/mounts; then "$bin" umount "$mnt" >/dev/null 2>&1 || fusermount3 -uz "$mnt"; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do timeout 5 tail --pid="$p" -f /dev/null 2>/dev/null; done
  rm -rf "$work"
  rmdir "$mnt" 2>/dev/null
  echo "demo: stopped and cleaned up"
}
trap cleanup EXIT INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

echo "\$ natster-mount init --server nats://127.0.0.1:$port"
"$bin" init --server "nats://127.0.0.1:$port"
echo "\$ natster-mount catalog new media examples/media --description 'natster-mount samples'"
"$bin" catalog new media examples/media --description "natster-mount samples"
"$bin" catalog serve media >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do "$bin" --timeout 1 catalog contents media >/dev/null 2>&1 && break; sleep 0.1; done
echo "\$ natster-mount catalog contents media"
"$bin" catalog contents media

mkdir -p "$mnt"
echo "\$ natster-mount mount ./mnt"
"$bin" mount "$mnt"
echo "\$ ls -lR ./mnt"
(cd "$PWD" && ls -lR mnt)
echo "\$ ffprobe -v error -show_entries format=duration -of csv=p=0 mnt/media/trailers/natster-demo.mp4"
ffprobe -v error -show_entries format=duration -of csv=p=0 "$mnt/media/trailers/natster-demo.mp4"

if [ -t 0 ]; then
  echo "demo: the catalog is mounted at ./mnt; press Ctrl-C to stop"
  while true; do sleep 1; done
fi
