#!/usr/bin/env bash
# pnpm lint:bootstrap - the shipped bootstrap.py is a fresh build of its modules
# (python/build.py --check), then ruff check, ruff format --check and
# mypy --strict over the modules, the shipped file, the tests and the
# project's other Python files.
set -u

main() {
  local top py
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  bash "$top/scripts/python-venv.sh" || return 1
  cd "$top" || return 1
  mapfile -t py < <(git ls-files --cached --others --exclude-standard '*.py' | while read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done)
  [ "${#py[@]}" -gt 0 ] || { echo "lint:bootstrap: no Python files found" >&2; return 1; }
  local rc=0
  python3 src/packages/project-host-bootstrap/python/build.py --check || rc=1
  .venv/bin/ruff check "${py[@]}" || rc=1
  .venv/bin/ruff format --check "${py[@]}" || rc=1
  .venv/bin/mypy --strict --python-version 3.10 "${py[@]}" || rc=1
  return "$rc"
}

main "$@" || exit 1
