#!/usr/bin/env bash
# Runs every test of the workspace: the whole suite on each Linux back end, the GLib feature,
# the NBD server against real clients, and the library's suite for Windows under Wine.
# Installs what is missing first (Debian packages, the Windows target), so it works on a fresh
# machine. Usage, from anywhere: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

# --- what the tests need --------------------------------------------------------------------
need=()
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists glib-2.0 2>/dev/null || need+=(libglib2.0-dev)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Linux: every crate, default back end (epoll) -------------------------------------------
step "cargo test --workspace --all-features (epoll back end)"
cargo test --workspace --all-features

# --- Linux: the library again on the portable poll(2) back end ------------------------------
step "cargo test -p aioctx --all-features with AIOCTX_BACKEND=poll"
AIOCTX_BACKEND=poll cargo test -p aioctx --all-features

# --- Linux: the library on io_uring (falls back to epoll, saying so, where the kernel refuses
# io_uring; its own io_uring tests then print SKIPPED) -----------------------------------------
step "cargo test -p aioctx --all-features with AIOCTX_BACKEND=io_uring"
AIOCTX_BACKEND=io_uring cargo test -p aioctx --all-features

# --- Linux: the library with busy-polling on, on every back end -----------------------------
step "cargo test -p aioctx --all-features with AIOCTX_POLL_MAX_NS=32768"
AIOCTX_POLL_MAX_NS=32768 cargo test -p aioctx --all-features
AIOCTX_POLL_MAX_NS=32768 AIOCTX_BACKEND=poll cargo test -p aioctx --all-features
AIOCTX_POLL_MAX_NS=32768 AIOCTX_BACKEND=io_uring cargo test -p aioctx --all-features

# --- Windows, under Wine --------------------------------------------------------------------
wine_script=../shared/windows/cargo-test-wine.sh
if [ -f "$wine_script" ]; then
  step "cargo test -p aioctx for x86_64-pc-windows-gnu under Wine"
  status=0
  bash "$wine_script" -p aioctx || status=$?
  if [ "$status" -eq 3 ]; then
    echo "!!!!! WINDOWS TESTS NOT RUN: the x86_64-pc-windows-gnu target could not be installed !!!!!" >&2
    exit 1
  fi
  [ "$status" -eq 0 ] || exit "$status"
elif [ "${CI:-}" = "true" ]; then
  echo "!!!!! $wine_script is missing: CI must run the Windows suite !!!!!" >&2
  exit 1
else
  echo "Windows suite skipped: $wine_script not found (it lives in the project's shared folder)."
fi

step "all tests passed"
