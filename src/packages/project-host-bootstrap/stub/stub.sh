#!/bin/sh
# CoCalc project-host bootstrap stub (stub/stub.sh in @cocalc/project-host-bootstrap;
# renderStub() fills in the settings block below, nothing else).
# On first contact it exchanges the bootstrap token (single use) for this
# host's own credential (a 0600 file), deletes the token file, and uses the
# credential from then on: it takes bootstrap.py (checking its sha256: the one
# the hub gives over that authenticated channel, else the rendered one; the
# previous bootstrap.py is kept as bootstrap.py.prev) and this host's config,
# and runs bootstrap.py as the non-root bootstrap user. On a bootstrapped host
# it never fails the boot for the hub's reasons (no answer, token expired,
# credential refused): it runs the local, verified bootstrap.py against the
# local config in reconcile mode. Everything is in functions and main runs on
# the last line, so a truncated download runs nothing.
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
  credential_file=$bootstrap_dir/'host-credential'
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

# The sha256 of a token (on stdin), as recorded once it is exchanged.
token_digest() {
  d=$(sha256sum) || return 1
  printf '%s\n' "${d%% *}"
}

# The token comes from embedded_token (a quoted here-document in the settings
# block, written by cat straight into the 0600 file), or, when the stub carries
# none, from a token file that is already there. An embedded token that was
# exchanged already (its sha256 is in $exchanged_file) is not written again:
# on every later boot the stub uses the host credential instead.
write_token() {
  if [ "$token_embedded" = 1 ]; then
    if [ -s "$credential_file" ] && [ -s "$exchanged_file" ] &&
      [ "$(embedded_token | token_digest)" = "$(cat "$exchanged_file")" ]; then
      rm -f "$token_file"
      return 0
    fi
    rm -f "$token_file.part"
    embedded_token >"$token_file.part" || err "cannot write $token_file"
    chmod 600 "$token_file.part" || err "cannot chmod 600 $token_file.part"
    mv -f "$token_file.part" "$token_file" || err "cannot install $token_file"
  elif [ -s "$token_file" ]; then
    chmod 600 "$token_file" || err "cannot chmod 600 $token_file"
  elif [ ! -s "$credential_file" ]; then
    err "no bootstrap token: expected it in $token_file (mode 0600)"
  fi
}

# read_secret FILE: its first line into $auth, refused unless it looks like a token.
read_secret() {
  auth=
  IFS= read -r auth <"$1" || [ -n "$auth" ] || err "cannot read $1"
  case $auth in
    '' | *[!A-Za-z0-9._~+/=-]*) err "the token in $1 is malformed" ;;
  esac
}

# hub_request METHOD URL DEST: the answer's body in DEST, its status in
# $http_status (000: no answer). $auth (and $hub_body: more curl config
# lines, the exchange's) go to curl on stdin (--config -), never in argv.
# Retries only when there was no answer (or a 408/429/5xx).
hub_request() {
  rm -f "$3"
  http_status=$(curl --silent --location --proto '=http,https' --request "$1" \
    --retry "$curl_retries" --retry-connrefused --connect-timeout 10 --max-time "$curl_max_time" \
    --output "$3" --write-out '%{http_code}' --config - "$2" <<EOF
header = "Authorization: Bearer $auth"
${hub_body-}
EOF
  ) || http_status=000
  case $http_status in
    [1-9][0-9][0-9]) ;;
    *) http_status=000 ;;
  esac
}

# hub_get2 URL1 DEST1 URL2 DEST2: two GETs in one curl (one start, one
# connection; starting curl costs more than the hub's answer), statuses in
# $http_status and $http_status2. --fail-early: no answer to the first, no
# second try (a down hub is waited for once).
hub_get2() {
  rm -f "$2" "$4"
  http_status=$(curl --silent --location --proto '=http,https' --fail-early \
    --retry "$curl_retries" --retry-connrefused --connect-timeout 10 --max-time "$curl_max_time" \
    --write-out '%{http_code} ' --config - --output "$2" "$1" --output "$4" "$3" <<EOF
header = "Authorization: Bearer $auth"
EOF
  ) || :
  http_status2=${http_status#* }
  http_status=${http_status%% *}
  http_status2=${http_status2%% *}
  case $http_status in [1-9][0-9][0-9]) ;; *) http_status=000 ;; esac
  case $http_status2 in [1-9][0-9][0-9]) ;; *) http_status2=000 ;; esac
}

# The hub's error code from a JSON answer (empty when there is none).
answer_code() {
  sed -n 's/.*"code":"\([a-z_]*\)".*/\1/p' "$1" 2>/dev/null | head -n 1
}

# On stdin, because sha256sum escapes file names with a newline or backslash.
verify_sha256() {
  actual=$(sha256sum <"$1") || return 1
  [ "${actual%% *}" = "$2" ]
}

# The sha256 in FILE (what was verified when the file beside it was installed).
recorded_sha256() {
  r=
  IFS= read -r r <"$1" 2>/dev/null || [ -n "$r" ] || return 1
  case $r in
    '' | *[!0-9a-f]*) return 1 ;;
  esac
  [ ${#r} = 64 ] || return 1
  printf '%s\n' "$r"
}

# The exchange: the bootstrap token (single use) for this host's credential.
# The host chooses the credential itself: 32 random bytes, written 0600 to
# $pending before it asks (with the sha256 of the token it is for), and sends
# only the credential's sha256. The same token and sha256 again gets the same
# answer (the hub logs a retry), so a lost answer is asked for once more
# here, and on the next run with the same file; the token with another
# credential is refused (a replay). A hub of the previous version ignores the
# body and answers a credential of its own, which is taken instead.
# Returns 1 (with $hub_problem) when the hub cannot be used.
exchange_token() {
  read_secret "$token_file"
  for cmd in base64 dd tr; do
    need_cmd "$cmd"
  done
  pending=$credential_file.pending
  token_sha=$(token_digest <"$token_file") || err "cannot hash $token_file"
  chosen=
  [ -s "$pending" ] && [ "$(cat "$pending.token" 2>/dev/null)" = "$token_sha" ] && IFS= read -r chosen <"$pending"
  case $chosen in
    cchc_*[!A-Za-z0-9_-]*) chosen= ;;
    cchc_*) ;;
    *) chosen= ;;
  esac
  if [ ${#chosen} != 48 ]; then
    rm -f "$pending" "$pending.token"
    chosen=cchc_$(dd if=/dev/urandom bs=32 count=1 2>/dev/null | base64 | tr -d '\n=' | tr '+/' '-_') ||
      err "cannot read 32 random bytes from /dev/urandom"
    [ ${#chosen} = 48 ] || err "cannot read 32 random bytes from /dev/urandom"
    printf '%s\n' "$chosen" >"$pending.part" || err "cannot write $pending.part"
    chmod 600 "$pending.part" || err "cannot chmod 600 $pending.part"
    printf '%s\n' "$token_sha" >"$pending.token" || err "cannot write $pending.token"
    mv -f "$pending.part" "$pending" || err "cannot install $pending"
  fi
  chosen_sha=$(printf '%s' "$chosen" | sha256sum) || err "cannot hash $pending"
  chosen_sha=${chosen_sha%% *}
  hub_body=$(printf 'header = "Content-Type: application/json"\ndata = "{\\"credential_sha256\\":\\"%s\\"}"' "$chosen_sha")
  resp=$bootstrap_dir/.credential-answer
  say "exchanging the bootstrap token for this host's credential"
  for attempt in 1 2; do
    hub_request POST "$base_url/credential" "$resp"
    [ "$http_status" = 000 ] && [ "$attempt" = 1 ] || break
    say "no answer to the exchange; asking again with the same credential (the exchange is idempotent)"
    sleep 2
  done
  hub_body=
  case $http_status in
    200 | 201)
      credential=$(sed -n 's/.*"credential":"\(cchc_[A-Za-z0-9_-]*\)".*/\1/p' "$resp")
      rotate_after=$(sed -n 's/.*"rotate_after":"\([0-9T:.Z-]*\)".*/\1/p' "$resp")
      answered_sha=$(sed -n 's/.*"credential_sha256":"\([0-9a-f]*\)".*/\1/p' "$resp")
      [ "$answered_sha" = "$chosen_sha" ] && credential=$chosen
      rm -f "$resp"
      [ -n "$credential" ] || err "the hub's answer to the exchange holds neither this host's credential_sha256 nor a credential"
      rm -f "$credential_file.part"
      printf '%s\n' "$credential" >"$credential_file.part" || err "cannot write $credential_file"
      chmod 600 "$credential_file.part" || err "cannot chmod 600 $credential_file.part"
      mv -f "$credential_file.part" "$credential_file" || err "cannot install $credential_file"
      printf '%s\n' "$rotate_after" >"$credential_file.rotate-after" || err "cannot write $credential_file.rotate-after"
      printf '%s\n' "$token_sha" >"$exchanged_file" || err "cannot write $exchanged_file"
      rm -f "$token_file" "$pending" "$pending.token"
      say "this host has its credential ($credential_file, 0600); the bootstrap token is spent and deleted"
      ;;
    000 | 5[0-9][0-9])
      rm -f "$resp"
      say "the hub did not answer the exchange (HTTP $http_status); the next run asks again with the same credential"
      [ -s "$credential_file" ] || {
        hub_problem="the hub at $base_url did not answer the exchange (HTTP $http_status)"
        return 1
      }
      ;;
    *)
      code=$(answer_code "$resp")
      rm -f "$resp" "$pending" "$pending.token"
      say "the hub refused the bootstrap token (HTTP $http_status${code:+, $code})"
      if [ "$code" = token_already_exchanged ] && [ -s "$credential_file" ]; then
        printf '%s\n' "$token_sha" >"$exchanged_file" || err "cannot write $exchanged_file"
        rm -f "$token_file"
      fi
      [ -s "$credential_file" ] || {
        hub_problem="the hub refused the bootstrap token (HTTP $http_status${code:+, $code}) and this host has no credential"
        return 1
      }
      ;;
  esac
}

# A newer bootstrap.py only through the credential and the sha256 the hub
# gives with it (else the rendered one); the previous one is kept as
# bootstrap.py.prev. Returns 1 (with $hub_problem) when the hub cannot be used.
# The hub's answer for bootstrap.py.sha256 is in $bootstrap_py.sha256.part, its status in $http_status.
update_bootstrap_py() {
  want=$bootstrap_py_sha256
  case $http_status in
    200)
      want=$(recorded_sha256 "$bootstrap_py.sha256.part") || {
        rm -f "$bootstrap_py.sha256.part" "$config_file.part"
        err "the hub's bootstrap.py.sha256 is not a sha256"
      }
      ;;
    404) ;; # a hub without that route: the rendered sha256
    000)
      rm -f "$bootstrap_py.sha256.part"
      hub_problem="the hub at $base_url did not answer"
      return 1
      ;;
    *)
      code=$(answer_code "$bootstrap_py.sha256.part")
      rm -f "$bootstrap_py.sha256.part"
      hub_problem="the hub refused this host's credential (HTTP $http_status${code:+, $code})"
      return 1
      ;;
  esac
  rm -f "$bootstrap_py.sha256.part"
  if [ -f "$bootstrap_py" ] && verify_sha256 "$bootstrap_py" "$want"; then
    printf '%s\n' "$want" >"$bootstrap_py.sha256" || err "cannot write $bootstrap_py.sha256"
    return 0
  fi
  say "downloading $base_url/bootstrap.py"
  hub_request GET "$base_url/bootstrap.py" "$bootstrap_py.part"
  if [ "$http_status" != 200 ]; then
    rm -f "$bootstrap_py.part"
    hub_problem="downloading bootstrap.py failed (HTTP $http_status)"
    return 1
  fi
  if ! verify_sha256 "$bootstrap_py.part" "$want" || ! python3 "$bootstrap_py.part" --version >/dev/null 2>&1 </dev/null; then
    rm -f "$bootstrap_py.part"
    [ -s "$bootstrap_py.sha256" ] || {
      rm -f "$config_file.part"
      err "bootstrap.py does not have the expected sha256 $want (or does not run); not running it"
    }
    say "the new bootstrap.py does not have the expected sha256 $want (or does not run); keeping the current one"
    return 0
  fi
  if [ -f "$bootstrap_py" ] && [ -s "$bootstrap_py.sha256" ]; then
    cp -p "$bootstrap_py" "$bootstrap_py.prev" || err "cannot keep the previous bootstrap.py as $bootstrap_py.prev"
    cp -p "$bootstrap_py.sha256" "$bootstrap_py.prev.sha256" || err "cannot write $bootstrap_py.prev.sha256"
  fi
  mv -f "$bootstrap_py.part" "$bootstrap_py" || err "cannot install $bootstrap_py"
  printf '%s\n' "$want" >"$bootstrap_py.sha256" || err "cannot write $bootstrap_py.sha256"
}

# The config as the hub answered it ($config_file.part, status $config_status).
install_config() {
  if [ "$config_status" != 200 ]; then
    code=$(answer_code "$config_file.part")
    rm -f "$config_file.part"
    hub_problem="downloading the config failed (HTTP $config_status${code:+, $code})"
    return 1
  fi
  mv -f "$config_file.part" "$config_file" || err "cannot install $config_file"
}

# Everything from the hub: the credential, bootstrap.py, the config. 1: not now ($hub_problem says why).
from_hub() {
  hub_problem=
  if [ -s "$token_file" ]; then
    exchange_token || return 1
  fi
  if [ ! -s "$credential_file" ]; then
    hub_problem="no host credential in $credential_file"
    return 1
  fi
  read_secret "$credential_file"
  say "downloading $base_url/bootstrap.py.sha256 and $base_url/config"
  hub_get2 "$base_url/bootstrap.py.sha256" "$bootstrap_py.sha256.part" "$base_url/config" "$config_file.part"
  config_status=$http_status2
  update_bootstrap_py || {
    rm -f "$config_file.part"
    return 1
  }
  install_config
}

# The local bootstrap.py that was verified when it was installed, else the previous one.
local_bootstrap_py() {
  for py in "$bootstrap_py" "$bootstrap_py.prev"; do
    sha=$(recorded_sha256 "$py.sha256") || continue
    if [ -f "$py" ] && verify_sha256 "$py" "$sha"; then
      printf '%s\n' "$py"
      return 0
    fi
    say "$py does not match its recorded sha256; not using it" >&2
  done
  return 1
}

# run_python PY ARGS: python3 PY ARGS, without compiling PY's ~9k lines on
# every run (python3 caches no bytecode for a script, and compiling it costs
# more than a whole run with nothing to do). The loader reads PY, refuses it
# unless those very bytes have the sha256 recorded when it was verified, and
# takes their compiled code from .bytecode/<that sha256>-<python's bytecode
# magic> (0600; its own sha256 in front: a damaged one is compiled again),
# else compiles and keeps it there, removing older ones. PY runs as the
# script itself: __main__, with __file__, sys.argv[0] and sys.path[0] as
# `python3 PY` gives them.
run_python() {
  script=$1
  shift
  sha=$(recorded_sha256 "$script.sha256") || err "no recorded sha256 for $script; not running it"
  python3 -c '
def load():
    import builtins, hashlib, importlib.util, marshal, os, sys
    p, want = sys.argv[1], sys.argv[2]
    sys.argv[:] = [p] + sys.argv[3:]
    sys.path[0] = os.path.dirname(os.path.abspath(p))
    with open(p, "rb") as f:
        src = f.read()
    if hashlib.sha256(src).hexdigest() != want:
        sys.exit(f"bootstrap-stub: error: {p} is not the verified one (sha256 {want}); not running it")
    d = os.path.join(os.path.dirname(os.path.abspath(p)), ".bytecode")
    cache = os.path.join(d, f"{want}-{importlib.util.MAGIC_NUMBER.hex()}")
    code = None
    try:
        with open(cache, "rb") as f:
            data = f.read()
        if hashlib.sha256(data[32:]).digest() == data[:32]:
            code = marshal.loads(data[32:])
    except (OSError, ValueError, EOFError, TypeError):
        pass
    if code is None:
        code = compile(src, p, "exec", dont_inherit=True)
        data = marshal.dumps(code)
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            for old in os.listdir(d):
                os.unlink(os.path.join(d, old))
            fd = os.open(cache + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(data).digest() + data)
            os.replace(cache + ".part", cache)
        except OSError:
            pass
    g = sys.modules["__main__"].__dict__
    g.clear()
    g.update(__name__="__main__", __file__=p, __builtins__=builtins, __doc__=None, __spec__=None)
    exec(code, g)
load()
' "$script" "$sha" "$@"
}

# Tee everything from here on to the log. A fifo instead of a pipeline keeps
# the exit code of bootstrap.py (POSIX sh has no pipefail).
# The console copy is appended on every boot: past 4 MiB it moves to .1 (one
# older copy kept), so a host that reboots daily does not fill its disk.
start_log() {
  if [ -f "$log_file" ] && [ "$(wc -c <"$log_file")" -gt 4194304 ]; then
    mv -f "$log_file" "$log_file.1" || err "cannot rotate $log_file"
  fi
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
  for cmd in curl sha256sum python3 mkfifo tee mkdir chmod mv rm cp sed wc; do
    need_cmd "$cmd"
  done
  exchanged_file=$token_file.exchanged
  umask 077
  mkdir -p "$bootstrap_dir" || err "cannot create $bootstrap_dir"
  cd "$bootstrap_dir" || err "cannot enter $bootstrap_dir"
  start_log
  say "bootstrap as $me in $bootstrap_dir ($(date -u '+%Y-%m-%dT%H:%M:%SZ'))"
  write_token
  if from_hub; then
    py=$bootstrap_py
  else
    # Not the host's fault: run what this host already has, in reconcile mode.
    py=$(local_bootstrap_py) && [ -s "$config_file" ] ||
      err "$hub_problem; this host was never bootstrapped, so there is nothing local to run"
    say "$hub_problem; reconciling this host with its local bootstrap.py and config"
    [ $# -gt 0 ] || set -- reconcile
  fi
  say "running python3 $py --config $config_file $*"
  run_python "$py" --config "$config_file" "$@" </dev/null
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
