/**
 * The tiny shell stub that cloud-init (user-data) or the Go connector runs on
 * a fresh host. It only fetches and starts bootstrap.py; all the real work is
 * in bootstrap.py. See `renderStub()` for what it does, step by step.
 *
 * How the bootstrap token reaches the host: when `token` is given, the stub
 * carries it in a quoted here-document that `cat` writes straight into
 * `<bootstrap_dir>/bootstrap-token` under `umask 077` (mode 0600). It is never
 * an argument of any command and never printed, and the stub never runs with
 * `set -x`. The stub text itself is then as secret as the token: cloud-init
 * keeps user-data root-only (`/var/lib/cloud/instance/user-data.txt`, 0600)
 * and does not log it, but the cloud's metadata service may hand user-data to
 * any process on the VM, which is why tokens are per host, expiring and
 * revocable. When `token` is null (e.g. the connector already wrote the file,
 * 0600, owned by the bootstrap user) the stub uses the existing token file.
 * For downloads the token is read from that file into a shell variable and
 * given to curl as a `--config -` here-document on stdin (never argv).
 */
import { shellQuote } from "@cocalc/util";
import { bootstrapPySha256 } from "./asset.js";
import { AbsPath, type BootstrapConfig, type ConfigIssue, isHttpUrl, SHA256_RE, TOKEN_FILE_NAME, CONFIG_FILE_NAME, USER_RE } from "./config.js";
import { BootstrapConfigError } from "./builders.js";

/** Bootstrap tokens: URL-safe base64/hex-like, so they fit a curl header line and a here-document. */
export const BOOTSTRAP_TOKEN_RE = /^[A-Za-z0-9._~+/=-]{16,512}$/;

/** Names of the files the stub writes in bootstrap_dir (besides the token and config). */
export const STUB_LOG_FILE_NAME = "bootstrap.log";
export const BOOTSTRAP_PY_FILE_NAME = "bootstrap.py";

export interface StubOptions {
  /** Per-host base of the hub's bootstrap routes; the stub GETs `<baseUrl>/bootstrap.py` and `<baseUrl>/config`. */
  baseUrl: string;
  /** Where everything goes, e.g. `/home/ubuntu/cocalc-host/bootstrap` (the config's `bootstrap_dir`). */
  bootstrapDir: string;
  /**
   * Default for `BOOTSTRAP_USER`. When the stub starts as root it re-runs
   * itself as this user; null means root must be given `BOOTSTRAP_USER`.
   */
  bootstrapUser?: string | null;
  /** The host's bootstrap token, embedded (see the module comment); null: the token file already exists. */
  token?: string | null;
  /** Expected sha256 of bootstrap.py; default: the sha256 of this package's asset. */
  bootstrapPySha256?: string;
  /** curl `--max-time` per download attempt, seconds (default 300). */
  downloadMaxTimeS?: number;
  /**
   * curl `--retry` (default 5: with curl's doubling delays, about 30 s of
   * retries, enough to ride out a hub restart). `--retry-all-errors` also
   * retries a 401, so a wrong token takes that long to fail.
   */
  downloadRetries?: number;
}

/**
 * Stub options for a config the builders produced: its bootstrap_dir and
 * user, and its `hub.url` (the host's bootstrap routes) unless `baseUrl` is given.
 */
export function stubOptionsFor(config: BootstrapConfig, opts: { baseUrl?: string; token?: string | null } = {}): StubOptions {
  return {
    baseUrl: opts.baseUrl ?? config.hub.url,
    bootstrapDir: config.bootstrap_dir,
    bootstrapUser: config.bootstrap_user,
    token: opts.token ?? null,
  };
}

function checkStubOptions(opts: StubOptions): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  const bad = (path: string, message: string) => issues.push({ path: [path], message });
  if (!isHttpUrl(opts.baseUrl) || /[?#]/.test(opts.baseUrl)) bad("baseUrl", "must be an http(s) URL without query or fragment");
  if (!AbsPath.safeParse(opts.bootstrapDir).success) bad("bootstrapDir", "must be an absolute, normalised path");
  const user = opts.bootstrapUser ?? null;
  if (user !== null && (!USER_RE.test(user) || user === "root")) bad("bootstrapUser", "must be a POSIX user name other than root");
  const token = opts.token ?? null;
  if (token !== null && !BOOTSTRAP_TOKEN_RE.test(token)) bad("token", "must be 16-512 characters of [A-Za-z0-9._~+/=-]");
  if (opts.bootstrapPySha256 !== undefined && !SHA256_RE.test(opts.bootstrapPySha256)) bad("bootstrapPySha256", "must be 64 lowercase hex digits");
  const maxTime = opts.downloadMaxTimeS;
  if (maxTime !== undefined && !(Number.isInteger(maxTime) && maxTime >= 1 && maxTime <= 3600)) bad("downloadMaxTimeS", "must be an integer from 1 to 3600");
  const retries = opts.downloadRetries;
  if (retries !== undefined && !(Number.isInteger(retries) && retries >= 0 && retries <= 20)) bad("downloadRetries", "must be an integer from 0 to 20");
  return issues;
}

/** Settings that end up in the stub's `settings()` function, already shell-quoted. */
function settingsBody(opts: StubOptions): string {
  const values: [string, string][] = [
    ["base_url", opts.baseUrl.replace(/\/+$/, "")],
    ["default_user", opts.bootstrapUser ?? ""],
    ["bootstrap_dir", opts.bootstrapDir],
    ["bootstrap_py_sha256", opts.bootstrapPySha256 ?? bootstrapPySha256()],
    ["curl_max_time", String(opts.downloadMaxTimeS ?? 300)],
    ["curl_retries", String(opts.downloadRetries ?? 5)],
  ];
  const files: [string, string][] = [
    ["token_file", TOKEN_FILE_NAME],
    ["config_file", CONFIG_FILE_NAME],
    ["bootstrap_py", BOOTSTRAP_PY_FILE_NAME],
    ["log_file", STUB_LOG_FILE_NAME],
  ];
  return [
    ...values.map(([name, value]) => `  ${name}=${shellQuote(value)}`),
    ...files.map(([name, file]) => `  ${name}=$bootstrap_dir/${shellQuote(file)}`),
  ].join("\n");
}

// The here-document delimiter cannot occur in a token (BOOTSTRAP_TOKEN_RE has no space).
const TOKEN_EOF = "COCALC_BOOTSTRAP_TOKEN_END";

function writeTokenBody(token: string | null): string {
  if (token === null) {
    return `  [ -s "$token_file" ] || err "no bootstrap token: expected it in $token_file (mode 0600)"
  chmod 600 "$token_file" || err "cannot chmod 600 $token_file"`;
  }
  return `  rm -f "$token_file.part"
  cat >"$token_file.part" <<'${TOKEN_EOF}' || err "cannot write $token_file"
${token}
${TOKEN_EOF}
  chmod 600 "$token_file.part" || err "cannot chmod 600 $token_file.part"
  mv -f "$token_file.part" "$token_file" || err "cannot install $token_file"`;
}

/**
 * Render the stub (POSIX sh, checked with `shellcheck --shell=sh` and
 * `sh -n`). What it does:
 *
 * 1. As root: picks `BOOTSTRAP_USER` (environment, else the rendered
 *    default; refuses when there is none or it is root) and re-runs this same
 *    script as that user with `runuser -u` (or `sudo -n -u`), feeding the
 *    script on stdin, so the file may stay root-only.
 * 2. As the user: refuses if it is not the bootstrap user; `umask 077`;
 *    creates bootstrap_dir; from here on tees all output to
 *    `<bootstrap_dir>/bootstrap.log` (through a fifo, so exit codes survive).
 * 3. Writes the token file (0600), downloads bootstrap.py with curl (retries,
 *    timeouts, `Authorization: Bearer` from the token file), checks its
 *    sha256 against the rendered one and only then moves it into place;
 *    downloads the config the same way.
 * 4. Runs `python3 bootstrap.py --config <bootstrap_dir>/bootstrap-config.json
 *    [stub args]` and exits with its exit code.
 */
export function renderStub(opts: StubOptions): string {
  const issues = checkStubOptions(opts);
  if (issues.length > 0) throw new BootstrapConfigError(issues, "stub options");
  return `#!/bin/sh
# CoCalc project-host bootstrap stub, rendered by @cocalc/project-host-bootstrap.
# It downloads bootstrap.py (checking its sha256) and this host's config, and
# runs bootstrap.py as the non-root bootstrap user. Everything is in functions
# and main runs on the last line, so a truncated download runs nothing.
# Usage: sh THIS_FILE [bootstrap.py arguments]   (as root: BOOTSTRAP_USER=user)
set -u

# The rendered values are literal on purpose ($ and backticks stay as they are).
# shellcheck disable=SC2016
settings() {
${settingsBody(opts)}
}

say() {
  printf 'bootstrap-stub: %s\\n' "$1"
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
  user=\${BOOTSTRAP_USER:-$default_user}
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

write_token() {
${writeTokenBody(opts.token ?? null)}
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
  curl --fail --silent --show-error --location --proto '=http,https' \\
    --retry "$curl_retries" --retry-all-errors --connect-timeout 10 --max-time "$curl_max_time" \\
    --output "$2" --config - "$1" <<EOF
header = "Authorization: Bearer $token"
EOF
}

# On stdin, because sha256sum escapes file names with a newline or backslash.
verify_sha256() {
  actual=$(sha256sum <"$1") || return 1
  [ "\${actual%% *}" = "$2" ]
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
  user=\${BOOTSTRAP_USER:-\${default_user:-$me}}
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
`;
}
