#!/usr/bin/env bash
# pnpm bench [--runs N] [--scale X] [--bandwidth MB/s] [--latency MS] [--smoke] ...
#
# The bootstrap benchmark, on this machine (Linux, as root): set-up first
# (scripts/setup.sh: pnpm, node_modules, Debian tools), then the reference
# workload on throwaway hosts. Prints the table; writes result.json,
# result.md and the waterfalls under results/bench-<timestamp>/.
# `pnpm bench --help` lists the options; every argument is passed through.
set -u

say() { printf 'bench: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

main() {
  local top
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  cd "$top" || return 1
  [ "$(uname -s)" = Linux ] || err "the benchmark needs Linux (systemd-nspawn, loop devices, btrfs)"
  bash scripts/setup.sh || err "set-up failed (scripts/setup.sh)"
  cd src/packages/host-testbed || return 1
  pnpm --silent exec tsx bench/cli.ts "$@"
}

main "$@" || exit 1
