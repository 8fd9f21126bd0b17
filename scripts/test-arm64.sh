#!/usr/bin/env bash
# test-arm64.sh [bookworm|trixie] - the whole end-to-end suite on arm64
# throwaway hosts (cold bootstrap, re-run, reboot, serial mode, wrong
# checksum): on an amd64 machine the hosts run under qemu-user-static, so
# this is slow and not part of scripts/test.sh, which runs only the arm64
# downloads, installs and Node.js step (test/arm64.test.ts). As root.
set -u

main() {
  local top suite=${1:-bookworm}
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  cd "$top" || return 1
  bash scripts/setup.sh || return 1
  cd src/packages/host-testbed || return 1
  E2E_ARCH=arm64 E2E_SUITE=$suite pnpm exec vitest run test/e2e.test.ts
}

main "$@" || exit 1
