#!/usr/bin/env bash
# The README's test command: set-up, lint, type-check, then every test suite
# (vitest in each package, pytest for bootstrap.py, the end-to-end bootstrap
# of throwaway hosts: bookworm, trixie, and arm64's install and Node.js
# steps). CoCalc's toolchain: everything runs on Node.js 22 (TEST_NODE: 22,
# 24, a version, or "system" for the Node.js on PATH), then the config,
# builder and route tests run again on Node.js 24 with zod 3.25.76.
# Ends with one "N passed, N failed, N skipped" line.
set -u

say() { printf '\n=== %s\n' "$*" >&2; }

run_vitest() {
  local pkg=$1 out=$2
  say "vitest: $pkg"
  (cd "src/packages/$pkg" && pnpm exec vitest run --reporter=default --reporter=json --outputFile.json="$out/vitest-$pkg.json")
}

main() {
  local top out rc=0 pkg
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  cd "$top" || return 1
  if [ "${1:-}" != --inner ]; then
    bash scripts/setup.sh || return 1
    case "${TEST_NODE:-22}" in
      system) ;;
      *) exec bash scripts/with-node.sh "${TEST_NODE:-22}" bash scripts/test.sh --inner ;;
    esac
  fi
  say "Node.js $(node --version)"
  # The fault suite (host-testbed test/faults.test.ts) runs its subset here
  # (FAULTS=subset: kill points incl. a power cut, hub outage, artifact faults,
  # apt locks, a full disk); FAULTS=full is `pnpm test:faults`, FAULTS=off skips it.
  export FAULTS=${FAULTS:-subset}
  [ "$FAULTS" = off ] && say "fault suite: off in this run (FAULTS=off)"
  out=$(mktemp -d) || return 1

  say "lint:shell"
  pnpm --silent lint:shell || { echo "FAILED: lint:shell" >&2; rc=1; }
  say "lint:workflows"
  pnpm --silent lint:workflows || { echo "FAILED: lint:workflows" >&2; rc=1; }
  say "lint:bootstrap"
  pnpm --silent lint:bootstrap || { echo "FAILED: lint:bootstrap" >&2; rc=1; }
  say "lint:ts"
  pnpm --silent lint:ts || { echo "FAILED: lint:ts" >&2; rc=1; }
  say "typecheck"
  pnpm --silent typecheck || { echo "FAILED: typecheck" >&2; rc=1; }

  say "pytest: bootstrap.py"
  bash scripts/pytest.sh --junitxml="$out/pytest.xml" || rc=1

  for pkg in util project-host-bootstrap server host-testbed; do
    [ -d "src/packages/$pkg/test" ] || continue
    run_vitest "$pkg" "$out" || rc=1
  done

  # host-testbed's run above booted bookworm hosts; the same suite on trixie (apt 3).
  say "vitest: host-testbed e2e on trixie"
  (cd src/packages/host-testbed && E2E_SUITE=trixie pnpm exec vitest run test/e2e.test.ts \
    --reporter=default --reporter=json --outputFile.json="$out/vitest-host-testbed-e2e-trixie.json") || rc=1

  say "Node.js 24 + zod 3.25.76: config, builder and route tests"
  VITEST_JSON_DIR=$out bash scripts/test-zod3.sh --node 24 || rc=1

  .venv/bin/python scripts/test-summary.py "$out" || rc=1
  rm -rf "$out"
  return "$rc"
}

main "$@" || exit 1
