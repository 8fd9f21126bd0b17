/**
 * Real things for running rendered stubs: a hub stand-in (node:http on
 * 127.0.0.1), a throwaway non-root user (when the tests run as root), a curl
 * wrapper that records curl's argv and then runs the real curl, and a small
 * stand-in bootstrap.py that reports what it saw.
 */
import { execFileSync, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";

export const IS_ROOT = process.getuid?.() === 0;

export const sha256 = (data: Buffer | string): string => createHash("sha256").update(data).digest("hex");

export function newToken(): string {
  return `tok_${randomBytes(24).toString("base64url")}`;
}

export interface HubRequest {
  method: string;
  path: string;
  authorization: string | undefined;
  body: string;
}

export interface HubStandIn {
  baseUrl: string;
  requests: HubRequest[];
  /**
   * What `<base>/bootstrap.py` and `<base>/config` answer, and the sha256
   * `<base>/bootstrap.py.sha256` gives (null: 404, like a hub without that
   * route); tests change them between runs.
   */
  files: { bootstrapPy: Buffer; config: Buffer; sha256?: string | null };
  /** Answer the exchange like the hub before host-chosen credentials (ignore the body, make the credential). */
  legacy: boolean;
  /** Commit this many exchanges (or retries) and then drop the connection instead of answering (a lost answer). */
  dropExchangeAnswers: number;
  /** A further bootstrap token this hub accepts (single use, like the first). */
  newToken(): string;
  /** The sha256 of every credential the hub knows (host-chosen or made by it), in order. */
  credentialHashes(): string[];
  /** The credential log's kinds, in order (exchange, retry, replay). */
  log: string[];
  /** Refuse every credential from now on (401 credential_revoked), as the hub does on stop/delete. */
  revokeAll(): void;
  close(): Promise<void>;
}

/**
 * A hub stand-in with the real hub's credential contract: `POST
 * <base>/credential` with a token and `{"credential_sha256": H}` exchanges
 * the token once for the host-chosen credential (201 {credential: null,
 * credential_sha256, rotate_after}); the same token and H again: 200, a
 * retry; any other: 401 token_already_exchanged, a replay. Without a body
 * (or with `legacy`) it makes the credential (201 {credential, rotate_after}).
 * The credential (or a token never exchanged) opens `<base>/bootstrap.py`,
 * `<base>/bootstrap.py.sha256` and `<base>/config`.
 */
export async function startHub(token: string, files: HubStandIn["files"]): Promise<HubStandIn> {
  const base = "/api/bootstrap/hosts/3f2c8a1e-7b4d-4e5f-9a6b-0c1d2e3f4a5b";
  const requests: HubRequest[] = [];
  // token -> null (not exchanged), "" (exchanged for a hub-made credential) or the chosen credential's sha256
  const tokens = new Map<string, string | null>([[token, null]]);
  const credentials: string[] = []; // sha256s
  const log: string[] = [];
  let revoked = false;
  const hub = { files, legacy: false, dropExchangeAnswers: 0, log } as HubStandIn;
  const json = (res: import("node:http").ServerResponse, status: number, body: unknown) =>
    res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
  const known = (bearer: string) => credentials.includes(sha256(Buffer.from(bearer)));
  const rotateAfter = "2030-01-01T00:00:00.000Z";
  // Committed, then the connection drops before the answer (as a reset in transit would).
  const answerOrDrop = (res: import("node:http").ServerResponse, status: number, body: unknown) => {
    if (hub.dropExchangeAnswers > 0) {
      hub.dropExchangeAnswers--;
      res.socket?.destroy();
      return;
    }
    json(res, status, body);
  };
  const exchange = (res: import("node:http").ServerResponse, bearer: string, body: string) => {
    const chosen = hub.legacy ? undefined : (JSON.parse(body || "{}") as { credential_sha256?: string }).credential_sha256;
    const state = tokens.get(bearer);
    if (state === null) {
      let answer: { credential: string | null; credential_sha256?: string; rotate_after: string };
      if (chosen) {
        tokens.set(bearer, chosen);
        credentials.push(chosen);
        answer = { credential: null, credential_sha256: chosen, rotate_after: rotateAfter };
      } else {
        const credential = `cchc_${randomBytes(32).toString("base64url")}`;
        tokens.set(bearer, "");
        credentials.push(sha256(Buffer.from(credential)));
        answer = { credential, rotate_after: rotateAfter };
      }
      log.push("exchange");
      answerOrDrop(res, 201, answer);
    } else if (state !== undefined && chosen && state === chosen) {
      log.push("retry");
      answerOrDrop(res, 200, { credential: null, credential_sha256: chosen, rotate_after: rotateAfter });
    } else if (state !== undefined) {
      log.push("replay");
      json(res, 401, { error: "bootstrap token already exchanged", code: "token_already_exchanged" });
    } else if (known(bearer) && !revoked) {
      json(res, 200, { credential: null, rotate_after: rotateAfter });
    } else {
      json(res, 401, { error: "unknown", code: "unknown_token" });
    }
  };
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8");
      requests.push({ method: req.method ?? "", path: req.url ?? "", authorization: req.headers.authorization, body });
      const bearer = /^Bearer (\S+)$/.exec(req.headers.authorization ?? "")?.[1] ?? "";
      if (req.method === "POST" && req.url === `${base}/credential`) {
        exchange(res, bearer, body);
        return;
      }
      const ok = (known(bearer) && !revoked) || tokens.get(bearer) === null;
      if (!ok) {
        json(res, 401, { error: "refused", code: known(bearer) ? "credential_revoked" : "unknown_token" });
        return;
      }
      const sha = hub.files.sha256 ?? null;
      const answer =
        req.url === `${base}/bootstrap.py`
          ? hub.files.bootstrapPy
          : req.url === `${base}/config`
            ? hub.files.config
            : req.url === `${base}/bootstrap.py.sha256` && sha !== null
              ? Buffer.from(`${sha}\n`)
              : null;
      if (req.method !== "GET" || answer === null) {
        res.writeHead(404).end("not found\n");
        return;
      }
      res.writeHead(200, { "content-length": answer.length }).end(answer);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  hub.baseUrl = `http://127.0.0.1:${port}${base}`;
  hub.requests = requests;
  hub.newToken = () => {
    const t = newToken();
    tokens.set(t, null);
    return t;
  };
  hub.credentialHashes = () => [...credentials];
  hub.revokeAll = () => {
    revoked = true;
  };
  hub.close = () => new Promise((resolve) => server.close(() => resolve()));
  return hub;
}

export interface StubUser {
  name: string;
  uid: number;
  home: string;
  /** Removes the user (if this harness created it) and the temp tree. */
  cleanup(): void;
}

/**
 * The user the stub runs the bootstrap as. As root: a fresh user made with
 * useradd (so the drop from root is real). Otherwise: the current user, with
 * a temp dir standing in for the home directory.
 */
export function makeStubUser(top: string): StubUser {
  if (!IS_ROOT) {
    const home = join(top, "home");
    mkdirSync(home);
    return { name: userInfo().username, uid: process.getuid?.() ?? -1, home, cleanup: () => rmSync(top, { recursive: true, force: true }) };
  }
  const name = `phbt${randomBytes(4).toString("hex")}`;
  const home = join(top, "home", name);
  mkdirSync(join(top, "home"));
  // The user must be able to walk down to its home inside our temp dir.
  chmodSync(top, 0o755);
  chmodSync(join(top, "home"), 0o755);
  execFileSync("useradd", ["--create-home", "--home-dir", home, "--shell", "/bin/sh", "--user-group", name]);
  const uid = Number(execFileSync("id", ["-u", name], { encoding: "utf8" }).trim());
  return {
    name,
    uid,
    home,
    cleanup: () => {
      execFileSync("userdel", [name]);
      rmSync(top, { recursive: true, force: true });
    },
  };
}

export function makeTop(): string {
  return mkdtempSync(join(tmpdir(), "phb-stub-"));
}

/**
 * A directory with a `curl` that appends its argv (one argument per line) to
 * `<dir>/curl-argv.log`, then runs the real curl.
 */
export function makeCurlRecorder(top: string): { binDir: string; argvLog: string } {
  const binDir = join(top, "bin");
  mkdirSync(binDir, { mode: 0o755 });
  const argvLog = join(binDir, "curl-argv.log");
  const realCurl = execFileSync("sh", ["-c", "command -v curl"], { encoding: "utf8" }).trim();
  writeFileSync(argvLog, "", { mode: 0o666 });
  chmodSync(argvLog, 0o666); // the dropped-to user appends to it too
  writeFileSync(join(binDir, "curl"), `#!/bin/sh\nprintf '%s\\n' "$@" >>'${argvLog}'\nexec '${realCurl}' "$@"\n`, { mode: 0o755 });
  return { binDir, argvLog };
}

/**
 * A stand-in for bootstrap.py: records argv, uid, the credential file's mode,
 * whether the token file is still there, and every process whose command
 * line or environment contains the credential (scanning /proc while the stub
 * and its tee are still running); prints a line; exits with the config's
 * `exit_code`. `--version` answers (the stub runs it before installing).
 */
export const STAND_IN_BOOTSTRAP_PY = Buffer.from(`import json
import os
import stat
import sys

args = sys.argv[1:]
if args == ["--version"]:
    print("stand-in 0")
    sys.exit(0)
config_path = args[args.index("--config") + 1]
bootstrap_dir = os.path.dirname(config_path)
credential_path = os.path.join(bootstrap_dir, "host-credential")
with open(credential_path, "rb") as f:
    credential = f.read().strip()
leaks = []
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("cmdline", "environ"):  # environ is readable for our own processes only
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                if credential in f.read():
                    leaks.append(f"{pid}/{what}")
        except OSError:
            pass
with open(config_path) as f:
    config = json.load(f)
result = {
    "argv": args,
    "uid": os.getuid(),
    "cwd": os.getcwd(),
    "credential_mode": stat.S_IMODE(os.stat(credential_path).st_mode),
    "token_file_exists": os.path.exists(os.path.join(bootstrap_dir, "bootstrap-token")),
    "leaks": leaks,
    "stdin_is_devnull": os.path.samefile("/proc/self/fd/0", "/dev/null"),
    "script": [__name__, __file__, sys.argv[0], sys.path[0]],
}
with open(os.path.join(bootstrap_dir, "stand-in-result.json"), "w") as f:
    json.dump(result, f)
print("stand-in bootstrap.py ran", flush=True)
print("stand-in stderr line", file=sys.stderr, flush=True)
sys.exit(int(config.get("exit_code", 0)))
`);

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run `sh <stubPath> [args]` (async: the hub stand-in lives in this process). */
export function runStub(stubPath: string, opts: { env?: NodeJS.ProcessEnv; args?: string[]; wrap?: string[] } = {}): Promise<RunResult> {
  const argv = [...(opts.wrap ?? []), "sh", stubPath, ...(opts.args ?? [])];
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0] as string, argv.slice(1), { env: opts.env ?? process.env, stdio: ["ignore", "pipe", "pipe"], cwd: "/" });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), 45_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Can this (non-root) process become uid 0 in a user namespace? */
export function canUnshareRoot(): boolean {
  try {
    return execFileSync("unshare", ["--user", "--map-root-user", "id", "-u"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim() === "0";
  } catch {
    return false;
  }
}
