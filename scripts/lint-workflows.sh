#!/usr/bin/env bash
# pnpm lint:workflows - actionlint (pinned, with shellcheck over every run:
# block) over .github/workflows/, then a self-check: every workflow in
# scripts/workflow-fixtures/ is broken on purpose and must be rejected with the
# rule named on its "# expect: RULE" line, so a lint that silently stopped
# checking (no shellcheck found, say) fails here too.
set -u

main() {
  local top rc=0 f rule out
  top=$(cd "$(dirname "$0")/.." && pwd) || return 1
  bash "$top/scripts/python-venv.sh" || return 1
  bash "$top/scripts/go-tools.sh" || return 1
  cd "$top" || return 1
  local actionlint=(.tools/bin/actionlint -shellcheck .venv/bin/shellcheck -oneline)
  if [ "$#" -gt 0 ]; then
    "${actionlint[@]}" "$@"
    return
  fi
  "${actionlint[@]}" || rc=1
  for f in scripts/workflow-fixtures/*.yml; do
    rule=$(sed -n 's/^# expect: *//p' "$f" | head -n 1)
    if [ -z "$rule" ]; then
      echo "lint:workflows: $f has no '# expect: RULE' line" >&2
      rc=1
      continue
    fi
    if out=$("${actionlint[@]}" "$f" 2>&1); then
      echo "lint:workflows: actionlint accepted $f, which must fail with [$rule]" >&2
      rc=1
    elif ! grep -q "\[$rule\]\$" <<<"$out"; then
      printf 'lint:workflows: %s failed, but not with [%s]:\n%s\n' "$f" "$rule" "$out" >&2
      rc=1
    fi
  done
  return "$rc"
}

main "$@" || exit 1
