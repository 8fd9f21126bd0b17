#!/usr/bin/env bash
# pnpm demo [up | exec [-- CMD...] | down]
#
# The main job, on this machine (Linux, as root): build the test artifacts,
# start the hub (embedded PGlite) in the background, boot a throwaway Debian
# host (debootstrap + systemd-nspawn), bootstrap it through the hub's real
# stub with live progress, then print the progress page and the timings.
# Everything stays up to explore; `pnpm demo down` removes it all.
set -u

say() { printf 'demo: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || err "need '$1' (command not found)"
}

ensure_setup() {
  # A fresh machine: pnpm, node_modules and the host tools (idempotent, quick
  # when already done). Only bringing the demo up needs it.
  case "${1:-up}" in
    up) bash scripts/setup.sh || err "set-up failed (scripts/setup.sh)" ;;
    *) [ -x src/packages/host-testbed/node_modules/.bin/tsx ] || err "nothing set up yet: run 'bash scripts/demo.sh' first" ;;
  esac
}

main() {
  local top
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  cd "$top" || return 1
  [ "$(uname -s)" = Linux ] || err "the demo needs Linux (systemd-nspawn, loop devices, btrfs)"
  [ "$(id -u)" = 0 ] || err "the demo needs root (debootstrap, systemd-nspawn, loop devices): sudo pnpm demo"
  need_cmd node
  need_cmd python3
  ensure_setup "$@"
  # tsx runs the TypeScript directly; tsconfig paths point at the workspace
  # packages' sources, so nothing needs building first.
  cd src/packages/host-testbed || return 1
  exec node_modules/.bin/tsx --tsconfig tsconfig.json src/demo.ts "$@"
}

main "$@" || exit 1
