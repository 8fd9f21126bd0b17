#!/usr/bin/env bash
# Run the Python tests of bootstrap.py with the pinned pytest from ./.venv.
set -u

main() {
  local top
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  bash "$top/scripts/python-venv.sh" || return 1
  cd "$top/src/packages/project-host-bootstrap" || return 1
  "$top/.venv/bin/python" -m pytest -q -rs python/tests "$@"
}

main "$@" || exit 1
