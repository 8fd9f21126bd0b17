#!/usr/bin/env bash
# test-zod3.sh [--node 22|24|VERSION] - the config, builder and route tests
# (and the toolchain test: zod/v4 imports, a CommonJS consumer) against zod
# 3.25.76, the version CoCalc's workspace pins with pnpm.overrides. Works on
# a scratch copy of the repository with the same override, so this checkout
# keeps zod 4; the copy is type-checked and built against zod 3 first.
set -u

ZOD3=3.25.76
# The suites that exercise zod: the config schema and its JSON Schema, the
# builders, the hub's routes (request and response validation).
PHB_FILES=(test/conformance.test.ts test/json-schema.test.ts test/builders.test.ts)
SERVER_FILES=(test/routes.test.ts)
TESTBED_FILES=(test/toolchain.test.ts)

say() { printf '\n=== %s\n' "$*" >&2; }

# With VITEST_JSON_DIR set (scripts/test.sh), each run also writes a JSON
# report there for the summary line.
report_args() {
  [ -n "${VITEST_JSON_DIR:-}" ] || return 0
  printf '%s\n' --reporter=default --reporter=json "--outputFile.json=$VITEST_JSON_DIR/vitest-$1.json"
}

main() {
  local top scratch rc=0 node=() report=()
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  case "${1:-}" in
    --node) [ -n "${2:-}" ] || { echo "test-zod3: --node needs 22, 24 or a version" >&2; return 2; }
      node=(bash "$top/scripts/with-node.sh" "$2") ;;
    "") ;;
    *) echo "test-zod3: unknown argument '$1' (the only option is --node 22|24|VERSION)" >&2; return 2 ;;
  esac
  scratch=$(mktemp -d /var/tmp/zod3-XXXXXX) || return 1
  # shellcheck disable=SC2064 # expand now: the path is fixed
  trap "rm -rf '$scratch'" EXIT
  say "zod $ZOD3: scratch copy in $scratch"
  (cd "$top" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$scratch" || return 1
  cd "$scratch" || return 1
  "${node[@]}" node -e '
    const fs = require("node:fs");
    const p = JSON.parse(fs.readFileSync("package.json", "utf8"));
    p.pnpm = { ...p.pnpm, overrides: { ...(p.pnpm && p.pnpm.overrides), zod: process.argv[1] } };
    fs.writeFileSync("package.json", JSON.stringify(p, null, 2) + "\n");
  ' "$ZOD3" || return 1
  "${node[@]}" pnpm install --no-frozen-lockfile --prefer-offline --reporter=silent || { echo "test-zod3: pnpm install with zod $ZOD3 failed" >&2; return 1; }
  say "zod $ZOD3: type-check and build"
  "${node[@]}" pnpm --silent -r build || rc=1
  "${node[@]}" pnpm --silent -r typecheck || rc=1
  say "zod $ZOD3: vitest project-host-bootstrap (${PHB_FILES[*]})"
  mapfile -t report < <(report_args "zod3-project-host-bootstrap")
  (cd src/packages/project-host-bootstrap && TEST_ZOD_VERSION=$ZOD3 "${node[@]}" pnpm exec vitest run "${report[@]}" "${PHB_FILES[@]}") || rc=1
  say "zod $ZOD3: vitest server (${SERVER_FILES[*]})"
  mapfile -t report < <(report_args "zod3-server")
  (cd src/packages/server && TEST_ZOD_VERSION=$ZOD3 "${node[@]}" pnpm exec vitest run "${report[@]}" "${SERVER_FILES[@]}") || rc=1
  say "zod $ZOD3: vitest host-testbed (${TESTBED_FILES[*]})"
  mapfile -t report < <(report_args "zod3-host-testbed")
  (cd src/packages/host-testbed && TEST_ZOD_VERSION=$ZOD3 "${node[@]}" pnpm exec vitest run "${report[@]}" "${TESTBED_FILES[@]}") || rc=1
  return "$rc"
}

main "$@"
