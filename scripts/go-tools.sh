#!/usr/bin/env bash
# Install the pinned Go-built dev tools (actionlint) into ./.tools/bin with
# `go install` from the Go module proxy. Idempotent: does nothing when the
# installed version already matches.
set -u

ACTIONLINT_VERSION=v1.7.12

say() { printf 'go-tools: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

main() {
  local top bin have
  top=$(cd "$(dirname "$0")/.." && pwd) || err "cannot find the repository root"
  bin="$top/.tools/bin"
  have=$("$bin/actionlint" -version 2>/dev/null | head -n 1)
  [ "$have" = "$ACTIONLINT_VERSION" ] && return 0
  command -v go >/dev/null 2>&1 \
    || err "need 'go' (1.25 or newer) to install actionlint $ACTIONLINT_VERSION; install Go, then run scripts/setup.sh again"
  say "installing actionlint $ACTIONLINT_VERSION into $bin"
  mkdir -p "$bin" || err "cannot create $bin"
  GOBIN="$bin" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" \
    || err "go install actionlint@$ACTIONLINT_VERSION failed"
  have=$("$bin/actionlint" -version 2>/dev/null | head -n 1)
  [ "$have" = "$ACTIONLINT_VERSION" ] || err "installed actionlint says '$have', not $ACTIONLINT_VERSION"
}

main "$@" || exit 1
