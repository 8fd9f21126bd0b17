#!/bin/sh
# CoCalc project-host bootstrap stub (stub/stub.sh in @cocalc/project-host-bootstrap;
# renderStub() fills in the settings block below, nothing else).
# It downloads bootstrap.py (checking its sha256) and this host's config, and
# runs bootstrap.py as the non-root bootstrap user. Everything is in functions
# and main runs on the last line, so a truncated download runs nothing.
# Usage: sh THIS_FILE [bootstrap.py arguments]   (as root: BOOTSTRAP_USER=user)
set -u

# >>> settings: renderStub() replaces everything from this line to the
# "<<< settings" line with this host's values, shell-quoted. The rest of the
# file is shipped verbatim. The values are literal on purpose ($ and
# backticks stay as they are).
# shellcheck disable=SC2016
settings() {
  base_url=''
  default_user=''
  bootstrap_dir=''
  bootstrap_py_sha256=''
  curl_max_time='300'
  curl_retries='5'
  token_file=$bootstrap_dir/'bootstrap-token'
  config_file=$bootstrap_dir/'bootstrap-config.json'
  bootstrap_py=$bootstrap_dir/'bootstrap.py'
  log_file=$bootstrap_dir/'bootstrap.log'
  token_embedded=0
}
# <<< settings

say() {
  printf 'bootstrap-stub: %s\n' "$1"
}

err() {
  say "error: $1" >&2
  exit 1
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || err "need '$1' (command not found)"
}

# Started as root: run this same script again as the bootstrap user.
drop_root() {
  user=${BOOTSTRAP_USER:-$default_user}
  [ -n "$user" ] || err "started as root without BOOTSTRAP_USER; set BOOTSTRAP_USER to the non-root user that runs the bootstrap"
  [ "$user" != root ] || err "BOOTSTRAP_USER must not be root"
  uid=$(id -u "$user" 2>/dev/null) || err "BOOTSTRAP_USER '$user' does not exist"
  [ "$uid" != 0 ] || err "BOOTSTRAP_USER '$user' has uid 0"
  [ -f "$0" ] && [ -r "$0" ] || err "cannot re-read this script ($0) to run it as $user; save it to a file and run: sh FILE"
  say "started as root; running as $user"
  if command -v runuser >/dev/null 2>&1; then
    runuser -u "$user" -- env BOOTSTRAP_USER="$user" sh -s -- "$@" <"$0"
  elif command -v sudo >/dev/null 2>&1; then
    # shellcheck disable=SC2024 # root reads the script and hands it over on stdin, on purpose
    sudo -n -u "$user" -- env BOOTSTRAP_USER="$user" sh -s -- "$@" <"$0"
  else
    err "need runuser or sudo to run as $user"
  fi
}

# The token comes from embedded_token (a quoted here-document in the settings
# block, written by cat straight into the 0600 file), or, when the stub carries
# none, from a token file that is already there.
write_token() {
  if [ "$token_embedded" = 1 ]; then
    rm -f "$token_file.part"
    embedded_token >"$token_file.part" || err "cannot write $token_file"
    chmod 600 "$token_file.part" || err "cannot chmod 600 $token_file.part"
    mv -f "$token_file.part" "$token_file" || err "cannot install $token_file"
  else
    [ -s "$token_file" ] || err "no bootstrap token: expected it in $token_file (mode 0600)"
    chmod 600 "$token_file" || err "cannot chmod 600 $token_file"
  fi
}

read_token() {
  token=
  IFS= read -r token <"$token_file" || [ -n "$token" ] || err "cannot read $token_file"
  case $token in
    '' | *[!A-Za-z0-9._~+/=-]*) err "the token in $token_file is malformed" ;;
  esac
}

# fetch URL DEST: the token goes to curl on stdin (--config -), never in argv.
fetch() {
  rm -f "$2"
  curl --fail --silent --show-error --location --proto '=http,https' \
    --retry "$curl_retries" --retry-all-errors --connect-timeout 10 --max-time "$curl_max_time" \
    --output "$2" --config - "$1" <<EOF
header = "Authorization: Bearer $token"
EOF
}

# On stdin, because sha256sum escapes file names with a newline or backslash.
verify_sha256() {
  actual=$(sha256sum <"$1") || return 1
  [ "${actual%% *}" = "$2" ]
}

# Tee everything from here on to the log. A fifo instead of a pipeline keeps
# the exit code of bootstrap.py (POSIX sh has no pipefail).
start_log() {
  : >>"$log_file" || err "cannot write $log_file"
  fifo=$bootstrap_dir/.bootstrap-log.fifo
  rm -f "$fifo"
  mkfifo "$fifo" || err "cannot create $fifo"
  tee -a "$log_file" <"$fifo" &
  tee_pid=$!
  exec 3>&1 4>&2 >"$fifo" 2>&1
  rm -f "$fifo"
}

stop_log() {
  exec 1>&3 2>&4 3>&- 4>&-
  wait "$tee_pid"
}

run_bootstrap() {
  me=$(id -un) || err "cannot tell who I am"
  user=${BOOTSTRAP_USER:-${default_user:-$me}}
  [ "$user" = "$me" ] || err "running as $me, but the bootstrap user is $user; run this as $user, or as root"
  for cmd in curl sha256sum python3 mkfifo tee mkdir chmod mv rm; do
    need_cmd "$cmd"
  done
  umask 077
  mkdir -p "$bootstrap_dir" || err "cannot create $bootstrap_dir"
  cd "$bootstrap_dir" || err "cannot enter $bootstrap_dir"
  start_log
  say "bootstrap as $me in $bootstrap_dir ($(date -u '+%Y-%m-%dT%H:%M:%SZ'))"
  write_token
  read_token
  say "downloading $base_url/bootstrap.py"
  fetch "$base_url/bootstrap.py" "$bootstrap_py.part" || err "downloading bootstrap.py failed"
  if ! verify_sha256 "$bootstrap_py.part" "$bootstrap_py_sha256"; then
    rm -f "$bootstrap_py.part"
    err "bootstrap.py does not have the expected sha256 $bootstrap_py_sha256; not running it"
  fi
  mv -f "$bootstrap_py.part" "$bootstrap_py" || err "cannot install $bootstrap_py"
  say "downloading $base_url/config"
  fetch "$base_url/config" "$config_file.part" || err "downloading the config failed"
  mv -f "$config_file.part" "$config_file" || err "cannot install $config_file"
  say "running python3 $bootstrap_py --config $config_file $*"
  python3 "$bootstrap_py" --config "$config_file" "$@" </dev/null
  rc=$?
  say "bootstrap.py exited with $rc"
  stop_log
  exit "$rc"
}

main() {
  settings
  need_cmd id
  if [ "$(id -u)" = 0 ]; then
    drop_root "$@"
    exit $?
  fi
  run_bootstrap "$@"
}

# main exits with bootstrap.py's own exit code; this line catches anything else.
# shellcheck disable=SC2317
main "$@" || exit 1
