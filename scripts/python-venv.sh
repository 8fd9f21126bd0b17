#!/usr/bin/env bash
# Create (or refresh) the project-local Python venv with the pinned dev tools.
# Idempotent: does nothing when the venv already matches requirements-dev.txt.
set -u

say() { printf 'python-venv: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

main() {
  local top venv stamp want have python
  top=$(cd "$(dirname "$0")/.." && pwd) || err "cannot find the repository root"
  venv="$top/.venv"
  stamp="$venv/.requirements.sha256"
  python=${PYTHON:-python3}
  command -v "$python" >/dev/null 2>&1 || err "python3 not found; install python3 (3.10 or newer)"
  want=$(sha256sum "$top/requirements-dev.txt" | cut -d' ' -f1)
  have=$(cat "$stamp" 2>/dev/null || true)
  if [ -x "$venv/bin/python" ] && [ "$want" = "$have" ]; then
    return 0
  fi
  say "creating $venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 splits venv into its own package.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get install -y -q python3-venv >/dev/null || err "apt-get install python3-venv failed"
      "$python" -m venv "$venv" || err "python3 -m venv failed"
    else
      err "python3 -m venv failed; install the python3-venv package"
    fi
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$top/requirements-dev.txt" \
    || err "pip install -r requirements-dev.txt failed"
  printf '%s\n' "$want" >"$stamp"
}

main "$@" || exit 1
