#!/usr/bin/env bash
# test-node.sh [22|24|VERSION] [--quick] - build, type-check and run the unit
# and integration suites of every package on another Node.js (the official
# binary from the npm registry's node-linux-* package, see with-node.sh).
# Without an argument: both Node.js versions CoCalc supports. --quick runs
# the suites only (no build, no type-check). The end-to-end and benchmark
# suites are left to scripts/test.sh: they exercise the hosts' Node.js, not
# this one.
set -u

# host-testbed's unit-level files (the rest boot hosts or bootstrap this machine).
TESTBED_FILES=(test/apt-sources.test.ts test/artifact-server.test.ts test/artifacts.test.ts test/bench-metrics.test.ts test/targets.test.ts test/toolchain.test.ts)

say() { printf '\n=== %s\n' "$*" >&2; }

# With VITEST_JSON_DIR set (scripts/test.sh), each run also writes a JSON
# report there for the summary line.
report_args() {
  [ -n "${VITEST_JSON_DIR:-}" ] || return 0
  printf '%s\n' --reporter=default --reporter=json "--outputFile.json=$VITEST_JSON_DIR/vitest-$1.json"
}

run_on() {
  local version=$1 quick=$2 rc=0 pkg
  local node=(bash scripts/with-node.sh "$version")
  if [ "$quick" = 0 ]; then
    say "Node.js $version: build and type-check"
    "${node[@]}" pnpm --silent -r build || rc=1
    "${node[@]}" pnpm --silent -r typecheck || rc=1
  fi
  local report=()
  for pkg in util project-host-bootstrap server; do
    say "Node.js $version: vitest $pkg"
    mapfile -t report < <(report_args "node$version-$pkg")
    (cd "src/packages/$pkg" && ../../../scripts/with-node.sh "$version" pnpm exec vitest run "${report[@]}") || rc=1
  done
  say "Node.js $version: vitest host-testbed (unit files)"
  mapfile -t report < <(report_args "node$version-host-testbed")
  (cd src/packages/host-testbed && ../../../scripts/with-node.sh "$version" pnpm exec vitest run "${report[@]}" "${TESTBED_FILES[@]}") || rc=1
  return "$rc"
}

main() {
  local top quick=0 versions=() v rc=0
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  cd "$top" || return 1
  for v in "$@"; do
    case "$v" in
      --quick) quick=1 ;;
      22 | 24 | [0-9]*.*.*) versions+=("$v") ;;
      *) echo "test-node: unknown argument '$v' (use 22, 24, a full version like 22.23.5, or --quick)" >&2; return 2 ;;
    esac
  done
  [ "${#versions[@]}" -gt 0 ] || versions=(22 24)
  for v in "${versions[@]}"; do run_on "$v" "$quick" || rc=1; done
  # Put dist/ back as the default Node.js builds it.
  [ "$quick" = 1 ] || pnpm --silent -r build || rc=1
  return "$rc"
}

main "$@"
