#!/usr/bin/env bash
# pnpm lint:shell - shellcheck over every shell file in the repository, the stub
# asset (stub/stub.sh) as a file with shellcheck --shell=sh and sh -n, and the
# stub that renderStub() produces from it for an example host.
set -u

main() {
  local top rendered rc=0
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  bash "$top/scripts/python-venv.sh" || return 1
  cd "$top" || return 1
  local files=()
  mapfile -t files < <(git ls-files --cached --others --exclude-standard '*.sh' '.ci/run' | while read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done)
  .venv/bin/shellcheck "${files[@]}" || rc=1
  local stub=src/packages/project-host-bootstrap/stub/stub.sh
  .venv/bin/shellcheck --shell=sh --severity=style "$stub" || rc=1
  sh -n "$stub" || rc=1
  rendered=$(mktemp) || return 1
  if pnpm --silent --filter @cocalc/project-host-bootstrap exec tsx scripts/render-example.ts stub >"$rendered"; then
    .venv/bin/shellcheck --shell=sh "$rendered" || rc=1
    sh -n "$rendered" || rc=1
  else
    echo "lint:shell: could not render the example stub" >&2
    rc=1
  fi
  rm -f "$rendered"
  return "$rc"
}

main "$@" || exit 1
