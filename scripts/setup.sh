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

# FUSE needs its device; a container may lack the node even when the kernel has the driver.
if [ ! -e /dev/fuse ]; then
  echo "setup: /dev/fuse is missing; FUSE tests will be skipped (load the fuse module or run with --device /dev/fuse)" >&2
fi
