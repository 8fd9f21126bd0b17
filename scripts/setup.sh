#!/usr/bin/env bash
# One-time (idempotent) set-up for tests and the demo on a fresh Linux machine
# that has Node.js (20+) and python3: pnpm, the workspace's node_modules, the
# Python dev venv and, when running as root, the Debian packages the real-
# component tests use (PostgreSQL, Chromium, debootstrap, systemd-nspawn, ...).
set -u

PNPM_VERSION=10.34.9
# What the tests and the demo use from Debian: a real PostgreSQL server, a
# real headless browser, the throwaway-host tools, and the archive tools.
# cloud-init: its schema validator checks the rendered #cloud-config user-data
# (installed disabled, see ensure_system_packages: it never acts on this machine).
SYSTEM_PACKAGES="postgresql chromium debootstrap systemd-container btrfs-progs xz-utils zstd python3-venv curl ca-certificates sudo util-linux cloud-init"

say() { printf 'setup: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || err "need '$1' (command not found): $2"
}

ensure_pnpm() {
  if command -v pnpm >/dev/null 2>&1 && [ "$(pnpm --version 2>/dev/null)" = "$PNPM_VERSION" ]; then
    return 0
  fi
  say "installing pnpm $PNPM_VERSION"
  npm install -g --silent "pnpm@$PNPM_VERSION" >/dev/null || err "npm install -g pnpm@$PNPM_VERSION failed"
}

missing_system_packages() {
  local pkg
  for pkg in $SYSTEM_PACKAGES; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || printf '%s ' "$pkg"
  done
}

# Of the given packages, those this distribution has (Ubuntu has no plain
# `chromium` deb, for example); the others are reported, not fatal here: the
# tests that need them fail with what to install.
available_packages() {
  local pkg candidate
  for pkg in "$@"; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: *//p')
    if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
      printf '%s ' "$pkg"
    else
      say "this distribution has no package '$pkg'; skipping it"
    fi
  done
}

ensure_system_packages() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "not a Debian/Ubuntu machine: install by hand: $SYSTEM_PACKAGES"
    return 0
  fi
  local missing
  missing=$(missing_system_packages)
  [ -n "$missing" ] || return 0
  if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install $missing; the tests that need them will say so"
    return 0
  fi
  apt-get update -q >/dev/null || err "apt-get update failed"
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  missing=$(available_packages $missing)
  [ -n "$missing" ] || return 0
  # cloud-init is here only for `cloud-init schema`: disable it before it is
  # installed, so it never configures this machine at its next boot.
  case " $missing " in
    *" cloud-init "*) mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled ;;
  esac
  say "installing Debian packages: $missing"
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null \
    || err "apt-get install failed for: $missing"
}

main() {
  local top
  top=$(cd "$(dirname "$0")/.." && pwd) || err "cannot find the repository root"
  cd "$top" || err "cannot cd to $top"
  need_cmd node "install Node.js 20 or newer"
  need_cmd python3 "install python3 (3.10 or newer)"
  need_cmd npm "npm comes with Node.js"
  case "${1:-}" in
    --no-system-packages) say "skipping Debian packages (--no-system-packages)" ;;
    "") ensure_system_packages ;;
    *) err "unknown option '$1' (the only option is --no-system-packages)" ;;
  esac
  ensure_pnpm
  say "pnpm install"
  pnpm install --frozen-lockfile --reporter=silent || err "pnpm install failed"
  bash scripts/python-venv.sh || err "python venv set-up failed"
  say "building workspace packages"
  pnpm -r --reporter=silent build || err "pnpm -r build failed"
}

main "$@" || exit 1
