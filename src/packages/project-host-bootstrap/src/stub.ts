/**
 * The tiny shell stub that cloud-init (user-data) or the Go connector runs on
 * a fresh host. It only fetches and starts bootstrap.py; all the real work is
 * in bootstrap.py. The script is `stub/stub.sh` (a real, linted shell file
 * shipped in this package); `renderStub()` only replaces its one marked
 * settings block with this host's shell-quoted values. See `renderStub()` for
 * what it does, step by step.
 *
 * How the bootstrap token reaches the host: when `token` is given, the stub
 * carries it (in the settings block) in a quoted here-document that `cat` writes straight into
 * `<bootstrap_dir>/bootstrap-token` under `umask 077` (mode 0600). It is never
 * an argument of any command and never printed, and the stub never runs with
 * `set -x`. The stub text itself is then as secret as the token: cloud-init
 * keeps user-data root-only (`/var/lib/cloud/instance/user-data.txt`, 0600)
 * and does not log it, but the cloud's metadata service may hand user-data to
 * any process on the VM, which is why tokens are per host, expiring and
 * revocable. When `token` is null (e.g. the connector already wrote the file,
 * 0600, owned by the bootstrap user) the stub uses the existing token file.
 * For the exchange the token is read from that file into a shell variable and
 * given to curl as a `--config -` here-document on stdin (never argv); the
 * host credential it gets back travels the same way.
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { shellQuote } from "@cocalc/util";
import { bootstrapPySha256 } from "./asset.js";
import { BootstrapConfigError } from "./builders.js";
import { AbsPath, type BootstrapConfig, CONFIG_FILE_NAME, type ConfigIssue, isHttpUrl, SHA256_RE, TOKEN_FILE_NAME, USER_RE } from "./config.js";

/** Bootstrap tokens: URL-safe base64/hex-like, so they fit a curl header line and a here-document. */
export const BOOTSTRAP_TOKEN_RE = /^[A-Za-z0-9._~+/=-]{16,512}$/;

/** Names of the files the stub writes in bootstrap_dir (besides the token and config). */
export const STUB_LOG_FILE_NAME = "bootstrap.log";
export const BOOTSTRAP_PY_FILE_NAME = "bootstrap.py";
/**
 * The host credential the stub gets for the bootstrap token (single use) on
 * first contact: one line, mode 0600, in bootstrap_dir; bootstrap.py reads it
 * (python/cocalc_bootstrap/credentials.py) and rotates it when the hub says.
 */
export const CREDENTIAL_FILE_NAME = "host-credential";

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

/**
 * The stub's shell text: `stub/stub.sh`, shipped in this package and linted as
 * a file (shellcheck, `sh -n`). Resolved from this module's URL like
 * bootstrap.py: `src/stub.ts` and `dist/stub.js` both sit one level below
 * the package root.
 */
export const STUB_SH_PATH: string = fileURLToPath(new URL("../stub/stub.sh", import.meta.url));

const SETTINGS_BEGIN = /^# >>> settings\b.*$/m;
const SETTINGS_END = /^# <<< settings$/m;

let template: { head: string; tail: string } | undefined;

/** stub.sh split around its settings block (read once). */
function stubTemplate(): { head: string; tail: string } {
  if (template === undefined) {
    const text = readFileSync(STUB_SH_PATH, "utf8");
    const begin = SETTINGS_BEGIN.exec(text);
    const end = SETTINGS_END.exec(text);
    if (!begin || !end || end.index < begin.index) throw new Error(`${STUB_SH_PATH}: no "# >>> settings" … "# <<< settings" block`);
    template = { head: text.slice(0, begin.index), tail: text.slice(end.index + end[0].length) };
  }
  return template;
}

// The here-document delimiter cannot occur in a token (BOOTSTRAP_TOKEN_RE has no space).
const TOKEN_EOF = "COCALC_BOOTSTRAP_TOKEN_END";

/** The settings block for these options: every value shell-quoted. */
function settingsBlock(opts: StubOptions): string {
  const token = opts.token ?? null;
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
    ["credential_file", CREDENTIAL_FILE_NAME],
  ];
  const lines = [
    "# >>> settings: rendered by renderStub() for this host; everything else is stub/stub.sh verbatim.",
    "# The values are literal on purpose ($ and backticks stay as they are).",
    "# shellcheck disable=SC2016",
    "settings() {",
    ...values.map(([name, value]) => `  ${name}=${shellQuote(value)}`),
    ...files.map(([name, file]) => `  ${name}=$bootstrap_dir/${shellQuote(file)}`),
    `  token_embedded=${token === null ? 0 : 1}`,
    "}",
  ];
  if (token !== null) {
    lines.push(
      "",
      "# The bootstrap token; write_token puts it into $token_file (0600).",
      "embedded_token() {",
      `  cat <<'${TOKEN_EOF}'`,
      token,
      TOKEN_EOF,
      "}",
    );
  }
  lines.push("# <<< settings");
  return lines.join("\n");
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
 * 3. Writes the token file (0600) unless that token was exchanged already;
 *    on first contact exchanges it (`POST <baseUrl>/credential`, single use)
 *    for the host credential (`host-credential`, 0600), records the token's
 *    sha256 and deletes the token file.
 * 4. With the credential: asks the hub for bootstrap.py's sha256
 *    (`<baseUrl>/bootstrap.py.sha256`; without that route, the rendered one),
 *    downloads bootstrap.py only when the local one differs, checks it and
 *    keeps the previous one as `bootstrap.py.prev`; downloads the config.
 * 5. Runs `python3 bootstrap.py --config <bootstrap_dir>/bootstrap-config.json
 *    [stub args]` and exits with its exit code. When the hub cannot be used
 *    (no answer, token expired, credential refused) on a host that was
 *    bootstrapped before, runs the local verified bootstrap.py (else
 *    bootstrap.py.prev) in `reconcile` mode against the local config instead.
 */
export function renderStub(opts: StubOptions): string {
  const issues = checkStubOptions(opts);
  if (issues.length > 0) throw new BootstrapConfigError(issues, "stub options");
  const { head, tail } = stubTemplate();
  return `${head}${settingsBlock(opts)}${tail}`;
}
