#!/usr/bin/env bash
# with-node.sh VERSION CMD [ARG...] - run CMD with Node.js VERSION (22 and
# 24 name the pinned releases below) first on PATH, and TEST_NODE_VERSION set. The binary is the official one from the npm registry's
# node-linux-<x64|arm64> package (as the test mirror builds its Node.js
# tarballs), fetched with `npm pack` once into the testbed cache.
set -u

# The Node.js releases CoCalc's toolchain is tested on.
NODE22=22.23.5
NODE24=24.22.3

say() { printf 'with-node: %s\n' "$*" >&2; }
err() { say "error: $*"; exit 1; }

main() {
  local version=${1:-} arch cache dir tgz
  [ "$#" -ge 2 ] || err "usage: with-node.sh 22|24|VERSION CMD [ARG...] (VERSION like $NODE22)"
  shift
  case "$version" in
    22) version=$NODE22 ;;
    24) version=$NODE24 ;;
  esac
  [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || err "VERSION '$version' is not like 22.23.5"
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) err "no node-linux package for $(uname -m)" ;;
  esac
  cache=${HOST_TESTBED_CACHE:-${XDG_CACHE_HOME:+$XDG_CACHE_HOME/cocalc-host-testbed}}
  cache=${cache:-/var/cache/cocalc-host-testbed}
  dir="$cache/node-runtime/v$version-$arch"
  if [ ! -x "$dir/bin/node" ]; then
    mkdir -p "$cache/npm" || err "cannot create $cache/npm"
    tgz="$cache/npm/node-linux-$arch-$version.tgz"
    if [ ! -f "$tgz" ]; then
      say "npm pack node-linux-$arch@$version"
      (cd "$cache/npm" && npm pack "node-linux-$arch@$version" --silent >/dev/null) || err "npm pack node-linux-$arch@$version failed"
    fi
    rm -rf "$dir.part.$$"
    mkdir -p "$dir.part.$$" || err "cannot create $dir.part.$$"
    tar -xzf "$tgz" -C "$dir.part.$$" --strip-components=1 --no-same-owner || err "cannot unpack $tgz"
    chmod 755 "$dir.part.$$/bin/node"
    rm -rf "$dir"
    mv "$dir.part.$$" "$dir" || err "cannot move the Node.js runtime into $dir"
  fi
  [ "$("$dir/bin/node" --version)" = "v$version" ] || err "$dir/bin/node is not v$version"
  # pnpm and npm are scripts run by whichever `node` is first on PATH.
  PATH="$dir/bin:$PATH" TEST_NODE_VERSION=$version "$@"
}

main "$@"
