/**
 * Real runs of rendered stubs: real sh, curl, sha256sum and python3 against a
 * hub stand-in on 127.0.0.1. When the tests run as root (as in .ci/run) the
 * stub is started as root and must drop to a throwaway user made with
 * useradd; otherwise it runs as the current user, and the root-refusal cases
 * use a user namespace (`unshare -r`) when the kernel allows one.
 */
import { execFileSync } from "node:child_process";
import { chownSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { type AddressInfo, createServer as createNetServer } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exampleHostFacts } from "../scripts/example-host.js";
import { bootstrapPyBytes } from "../src/asset.js";
import { buildBootstrapConfig } from "../src/builders.js";
import { renderStub, type StubOptions } from "../src/stub.js";
import {
  canUnshareRoot,
  type HubStandIn,
  IS_ROOT,
  makeCurlRecorder,
  makeStubUser,
  makeTop,
  newToken,
  runStub,
  STAND_IN_BOOTSTRAP_PY,
  type StubUser,
  sha256,
  startHub,
} from "./stub-harness.js";

const token = newToken();
let top: string;
let user: StubUser;
let hub: HubStandIn;
let curl: { binDir: string; argvLog: string };
let bootstrapDir: string;
let env: NodeJS.ProcessEnv;

const standInConfig = (exitCode: number) => Buffer.from(`${JSON.stringify({ exit_code: exitCode })}\n`);

beforeAll(async () => {
  top = makeTop();
  user = makeStubUser(top);
  bootstrapDir = join(user.home, "cocalc-host", "bootstrap");
  curl = makeCurlRecorder(top);
  hub = await startHub(token, { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) });
  const { BOOTSTRAP_USER: _ignored, ...rest } = process.env;
  env = { ...rest, PATH: `${curl.binDir}:${process.env.PATH ?? "/usr/bin:/bin"}` };
  console.log(IS_ROOT ? `running stubs as root, dropping to useradd-created ${user.name}` : `running stubs as ${user.name} (not root)`);
});

afterAll(async () => {
  await hub?.close();
  user?.cleanup();
});

function stubOptions(overrides: Partial<StubOptions> = {}): StubOptions {
  return {
    baseUrl: hub.baseUrl,
    bootstrapDir,
    bootstrapUser: user.name,
    token,
    bootstrapPySha256: sha256(hub.files.bootstrapPy),
    downloadMaxTimeS: 20,
    ...overrides,
  };
}

/** Write the stub root-only, as cloud-init keeps user-data scripts. */
function writeStub(name: string, text: string): string {
  const path = join(top, name);
  writeFileSync(path, text, { mode: 0o700 });
  return path;
}

/** How many times curl ran (the recorder logs one --write-out per run). */
function curlRuns(): number {
  return readFileSync(curl.argvLog, "utf8")
    .split("\n")
    .filter((l) => l === "--write-out").length;
}

function bytecodeFiles(): string[] {
  return readdirSync(join(bootstrapDir, ".bytecode")).sort();
}

function standInResult(): Record<string, unknown> {
  return JSON.parse(readFileSync(join(bootstrapDir, "stand-in-result.json"), "utf8")) as Record<string, unknown>;
}

describe("a rendered stub, run for real", () => {
  it("exchanges the token for the host credential (0600), deletes the token, and downloads, verifies and runs bootstrap.py with it", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const stub = writeStub("ok.sh", renderStub(stubOptions()));
    const started = Date.now();
    const r = await runStub(stub, { env });
    console.log(`stub success run: ${Date.now() - started} ms`);
    expect(r.stderr + r.stdout).toContain("stand-in bootstrap.py ran");
    expect(r.code, r.stderr).toBe(0);

    // The host chose its credential and sent only its sha256; the hub never sent a secret.
    const credentialFile = join(bootstrapDir, "host-credential");
    const credential = readFileSync(credentialFile, "utf8").trimEnd();
    expect(credential).toMatch(/^cchc_[A-Za-z0-9_-]{43}$/);
    expect(hub.credentialHashes()).toEqual([sha256(credential)]);
    expect(hub.log).toEqual(["exchange"]);
    const st = statSync(credentialFile);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(user.uid);
    expect(existsSync(`${credentialFile}.pending`), "the pending credential is installed, not left behind").toBe(false);
    expect(readFileSync(`${credentialFile}.rotate-after`, "utf8")).toBe("2030-01-01T00:00:00.000Z\n");
    expect(existsSync(join(bootstrapDir, "bootstrap-token")), "the spent token file is deleted").toBe(false);
    expect(readFileSync(join(bootstrapDir, "bootstrap-token.exchanged"), "utf8")).toBe(`${sha256(`${token}\n`)}\n`); // of the token file's content
    expect(statSync(bootstrapDir).mode & 0o077).toBe(0); // umask 077

    const result = standInResult();
    expect(result.uid).toBe(user.uid);
    expect(result.argv).toEqual(["--config", join(bootstrapDir, "bootstrap-config.json")]);
    expect(result.cwd).toBe(bootstrapDir);
    expect(result.stdin_is_devnull).toBe(true);
    expect(result.credential_mode).toBe(0o600);
    expect(result.token_file_exists).toBe(false);
    expect(result.leaks, "processes with the credential in their argv or environment").toEqual([]);

    // Verified bytes are in place, with their sha256 recorded; no .part files remain.
    expect(readFileSync(join(bootstrapDir, "bootstrap.py"))).toEqual(STAND_IN_BOOTSTRAP_PY);
    expect(readFileSync(join(bootstrapDir, "bootstrap.py.sha256"), "utf8")).toBe(`${sha256(STAND_IN_BOOTSTRAP_PY)}\n`);
    expect(existsSync(join(bootstrapDir, "bootstrap.py.part"))).toBe(false);

    const log = readFileSync(join(bootstrapDir, "bootstrap.log"), "utf8");
    expect(log).toContain("stand-in bootstrap.py ran");
    expect(log).toContain("stand-in stderr line");
    expect(log).toContain("bootstrap.py exited with 0");
    expect(log).toContain("the bootstrap token is spent and deleted");
    expect(log).not.toContain(token);
    expect(log).not.toContain(credential);
    expect(statSync(join(bootstrapDir, "bootstrap.log")).mode & 0o077).toBe(0);

    const curlArgv = readFileSync(curl.argvLog, "utf8");
    expect(curlArgv).toContain("--retry-connrefused");
    expect(curlArgv).not.toContain("--retry-all-errors"); // a POST answered is never sent again
    expect(curlArgv).toContain("--config");
    expect(curlArgv).not.toContain(token);
    expect(curlArgv).not.toContain(credential);
    expect(curlArgv).not.toContain(sha256(credential)); // the body goes in curl's config on stdin too

    // The exchange carried the token; everything after it the credential, in the header only.
    const path = (p: string) => new URL(`${hub.baseUrl}${p}`).pathname;
    const seen = hub.requests.slice(-4);
    expect(seen.map((q) => `${q.method} ${q.path}`)).toEqual([
      `POST ${path("/credential")}`,
      `GET ${path("/bootstrap.py.sha256")}`,
      `GET ${path("/config")}`, // in the same curl as the sha256
      `GET ${path("/bootstrap.py")}`,
    ]);
    expect(seen[0]!.authorization).toBe(`Bearer ${token}`);
    expect(JSON.parse(seen[0]!.body)).toEqual({ credential_sha256: sha256(credential) });
    for (const q of seen.slice(1)) expect(q.authorization).toBe(`Bearer ${credential}`);
  });

  it("rotates its console copy (bootstrap.log) past 4 MiB on the next boot: one older copy kept, the new log starts empty", async () => {
    const logPath = join(bootstrapDir, "bootstrap.log");
    if (!existsSync(bootstrapDir)) execFileSync("install", ["-d", "-m", "700", "-o", String(user.uid), bootstrapDir]); // when run alone
    const old = `an earlier boot's console\n${"x".repeat(4 * 1024 * 1024)}\n`;
    writeFileSync(logPath, old, { mode: 0o600 });
    chownSync(logPath, user.uid, statSync(bootstrapDir).gid);
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const r = await runStub(writeStub("rotate.sh", renderStub(stubOptions())), { env });
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(`${logPath}.1`, "utf8")).toBe(old);
    const fresh = readFileSync(logPath, "utf8");
    expect(fresh).toContain("bootstrap.py exited with 0");
    expect(fresh).not.toContain("an earlier boot's console");
    expect(fresh.length).toBeLessThan(64 * 1024);
  });

  it("on every later run: the token is not written again nor sent; the credential is used; an unchanged bootstrap.py is not downloaded", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const before = hub.requests.length;
    const curlsBefore = curlRuns();
    const r = await runStub(writeStub("again.sh", renderStub(stubOptions())), { env });
    expect(r.code, r.stdout).toBe(0);
    const seen = hub.requests.slice(before);
    expect(seen.map((q) => `${q.method} ${q.path.split("/").pop()}`)).toEqual(["GET bootstrap.py.sha256", "GET config"]);
    expect(curlRuns() - curlsBefore).toBe(1); // both in one curl
    expect(seen.every((q) => sha256(q.authorization?.replace(/^Bearer /, "") ?? "") === hub.credentialHashes()[0])).toBe(true);
    expect(existsSync(join(bootstrapDir, "bootstrap-token"))).toBe(false);
  });

  it("runs bootstrap.py as the script itself, compiled once: the code is kept by its sha256 (0600) and used by the next run", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const py = join(bootstrapDir, "bootstrap.py");
    const r1 = await runStub(writeStub("code1.sh", renderStub(stubOptions())), { env });
    expect(r1.code, r1.stdout).toBe(0);
    expect(standInResult().script).toEqual(["__main__", py, py, bootstrapDir]);
    const cached = bytecodeFiles();
    expect(cached).toEqual([expect.stringMatching(new RegExp(`^${sha256(STAND_IN_BOOTSTRAP_PY)}-[0-9a-f]{8}$`))]);
    const path = join(bootstrapDir, ".bytecode", cached[0]!);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const data = readFileSync(path);
    expect(sha256(data.subarray(32))).toBe(data.subarray(0, 32).toString("hex"));
    const ino = statSync(path).ino;
    const r2 = await runStub(writeStub("code2.sh", renderStub(stubOptions())), { env });
    expect(r2.code, r2.stdout).toBe(0);
    expect(r2.stdout).toContain("stand-in bootstrap.py ran");
    expect(statSync(path).ino).toBe(ino); // used, not written again
  });

  it("a damaged compiled bootstrap.py (its own sha256 does not match) is compiled again; the run is not affected", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    expect((await runStub(writeStub("code3.sh", renderStub(stubOptions())), { env })).code).toBe(0);
    const path = join(bootstrapDir, ".bytecode", bytecodeFiles()[0]!);
    const data = readFileSync(path);
    data.writeUInt8(data.readUInt8(data.length - 1) ^ 0xff, data.length - 1);
    writeFileSync(path, data);
    const r = await runStub(writeStub("code4.sh", renderStub(stubOptions())), { env });
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toContain("stand-in bootstrap.py ran");
    const again = readFileSync(path);
    expect(again.equals(data)).toBe(false);
    expect(sha256(again.subarray(32))).toBe(again.subarray(0, 32).toString("hex"));
  });

  it("exits with bootstrap.py's own exit code, through the tee", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(3) };
    const stub = writeStub("rc3.sh", renderStub(stubOptions()));
    const r = await runStub(stub, { env });
    expect(r.code, r.stderr).toBe(3);
    expect(readFileSync(join(bootstrapDir, "bootstrap.log"), "utf8")).toContain("bootstrap.py exited with 3");
  });

  it("passes its arguments on to bootstrap.py", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const stub = writeStub("args.sh", renderStub(stubOptions()));
    const r = await runStub(stub, { env, args: ["status", "--debug"] });
    expect(r.code, r.stderr).toBe(0);
    expect(standInResult().argv).toEqual(["--config", join(bootstrapDir, "bootstrap-config.json"), "status", "--debug"]);
  });

  it("first boot: never runs a bootstrap.py whose sha256 differs from the rendered one", async () => {
    const tampered = Buffer.concat([STAND_IN_BOOTSTRAP_PY, Buffer.from("open('/tmp/pwned', 'w')\n")]);
    const dir = join(user.home, "tampered-first", "bootstrap");
    const stub = writeStub(
      "tampered.sh",
      renderStub(stubOptions({ bootstrapDir: dir, token: hub.newToken(), bootstrapPySha256: sha256(STAND_IN_BOOTSTRAP_PY) })),
    );
    hub.files = { bootstrapPy: tampered, config: standInConfig(0) };
    const r = await runStub(stub, { env });
    expect(r.code).not.toBe(0);
    // After the log starts, stdout and stderr both go through the tee.
    expect(r.stdout).toMatch(/does not have the expected sha256/);
    expect(readFileSync(join(dir, "bootstrap.log"), "utf8")).toMatch(/does not have the expected sha256/);
    expect(existsSync(join(dir, "stand-in-result.json"))).toBe(false); // nothing ran
    expect(existsSync(join(dir, "bootstrap.py"))).toBe(false);
    expect(existsSync(join(dir, "bootstrap.py.part"))).toBe(false);
  });

  it("later: a newer bootstrap.py comes only with the hub's sha256 over the credential; a tampered one is refused and the current one kept", async () => {
    const newer = Buffer.concat([STAND_IN_BOOTSTRAP_PY, Buffer.from("# newer\n")]);
    const tampered = Buffer.concat([newer, Buffer.from("open('/tmp/pwned', 'w')\n")]);
    hub.files = { bootstrapPy: tampered, config: standInConfig(0), sha256: sha256(newer) };
    const r1 = await runStub(writeStub("tampered-later.sh", renderStub(stubOptions())), { env });
    expect(r1.code, r1.stdout).toBe(0); // the current, verified one ran
    expect(r1.stdout).toMatch(/does not have the expected sha256 .*keeping the current one/);
    expect(readFileSync(join(bootstrapDir, "bootstrap.py"))).toEqual(STAND_IN_BOOTSTRAP_PY);
    expect(existsSync(join(bootstrapDir, "bootstrap.py.prev"))).toBe(false);

    hub.files = { bootstrapPy: newer, config: standInConfig(0), sha256: sha256(newer) };
    const r2 = await runStub(writeStub("newer.sh", renderStub(stubOptions())), { env }); // rendered with the old sha256
    expect(r2.code, r2.stdout).toBe(0);
    expect(readFileSync(join(bootstrapDir, "bootstrap.py"))).toEqual(newer);
    expect(readFileSync(join(bootstrapDir, "bootstrap.py.prev"))).toEqual(STAND_IN_BOOTSTRAP_PY);
    expect(readFileSync(join(bootstrapDir, "bootstrap.py.prev.sha256"), "utf8")).toBe(`${sha256(STAND_IN_BOOTSTRAP_PY)}\n`);
    // the newer one ran from its own compiled code; the old one's is gone
    expect(bytecodeFiles()).toEqual([expect.stringMatching(new RegExp(`^${sha256(newer)}-`))]);
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0), sha256: null };
    const r3 = await runStub(writeStub("back.sh", renderStub(stubOptions())), { env });
    expect(r3.code, r3.stdout).toBe(0);
  });

  it("hub unreachable on a bootstrapped host: the local verified bootstrap.py runs in reconcile mode (its exit code is the stub's)", async () => {
    const closed = `http://127.0.0.1:${await closedPort()}/api/bootstrap/hosts/3f2c8a1e-7b4d-4e5f-9a6b-0c1d2e3f4a5b`;
    const r = await runStub(writeStub("down.sh", renderStub(stubOptions({ baseUrl: closed, downloadRetries: 0 }))), { env });
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(/did not answer; reconciling this host with its local bootstrap.py and config/);
    expect(standInResult().argv).toEqual(["--config", join(bootstrapDir, "bootstrap-config.json"), "reconcile"]);
  });

  it("a corrupted local bootstrap.py: bootstrap.py.prev (verified against its own sha256) runs instead", async () => {
    const newer = Buffer.concat([STAND_IN_BOOTSTRAP_PY, Buffer.from("# newer again\n")]);
    hub.files = { bootstrapPy: newer, config: standInConfig(0), sha256: sha256(newer) };
    expect((await runStub(writeStub("newer2.sh", renderStub(stubOptions())), { env })).code).toBe(0);
    writeFileSync(join(bootstrapDir, "bootstrap.py"), Buffer.concat([newer, Buffer.from("# bit rot\n")]));
    const closed = `http://127.0.0.1:${await closedPort()}/x`;
    const r = await runStub(writeStub("down2.sh", renderStub(stubOptions({ baseUrl: closed, downloadRetries: 0 }))), { env });
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(/bootstrap\.py does not match its recorded sha256; not using it/);
    expect(r.stdout).toContain(`running python3 ${join(bootstrapDir, "bootstrap.py.prev")}`);
  });

  it("credential refused (revoked by the hub) on a bootstrapped host: reconcile, exit 0", async () => {
    const other = await startHub(newToken(), { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) });
    try {
      const dir = join(user.home, "revoked", "bootstrap");
      const stub = writeStub(
        "revoked.sh",
        renderStub(stubOptions({ baseUrl: other.baseUrl, bootstrapDir: dir, token: other.newToken(), bootstrapPySha256: sha256(STAND_IN_BOOTSTRAP_PY) })),
      );
      expect((await runStub(stub, { env })).code).toBe(0);
      other.revokeAll();
      const r = await runStub(stub, { env });
      expect(r.code, r.stdout).toBe(0);
      expect(r.stdout).toMatch(/the hub refused this host's credential \(HTTP 401, credential_revoked\); reconciling/);
    } finally {
      await other.close();
    }
  });

  it("works in a bootstrap dir whose name has quotes, $(...), backticks and a semicolon", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    // (A newline is a control character: the contract refuses it before anything is rendered.)
    const nastyParent = join(user.home, 'it\'s $(touch pwned) `touch pwned2` \\ "x"; line 2');
    const nastyDir = join(nastyParent, "bootstrap");
    const stub = writeStub("nasty.sh", renderStub(stubOptions({ bootstrapDir: nastyDir, token: hub.newToken() })));
    const r = await runStub(stub, { env });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const result = JSON.parse(readFileSync(join(nastyDir, "stand-in-result.json"), "utf8")) as { argv: string[] };
    expect(result.argv).toEqual(["--config", join(nastyDir, "bootstrap-config.json")]);
    expect(statSync(join(nastyDir, "host-credential")).mode & 0o777).toBe(0o600);
    for (const dir of ["/", user.home, nastyParent, nastyDir]) {
      expect(existsSync(join(dir, "pwned")) || existsSync(join(dir, "pwned2")), dir).toBe(false);
    }
  });

  it("first boot: fails cleanly when the hub refuses the token (one request: a refused POST is not retried)", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const wrongToken = newToken();
    const dir = join(user.home, "badtoken", "bootstrap");
    const before = hub.requests.length;
    const stub = writeStub("badtoken.sh", renderStub(stubOptions({ bootstrapDir: dir, token: wrongToken })));
    const r = await runStub(stub, { env });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/refused the bootstrap token \(HTTP 401, unknown_token\)/);
    expect(r.stdout).toMatch(/never bootstrapped, so there is nothing local to run/);
    expect(hub.requests.slice(before).map((q) => `${q.method} ${q.authorization}`)).toEqual([`POST Bearer ${wrongToken}`]);
    const log = readFileSync(join(dir, "bootstrap.log"), "utf8");
    expect(log).not.toContain(wrongToken);
    expect(log).not.toContain(token);
  });

  it("first boot: a replayed (already exchanged) token gets nothing", async () => {
    const dir = join(user.home, "replayed", "bootstrap");
    const r = await runStub(writeStub("replayed.sh", renderStub(stubOptions({ bootstrapDir: dir }))), { env });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/HTTP 401, token_already_exchanged\) and this host has no credential/);
    expect(existsSync(join(dir, "host-credential"))).toBe(false);
  });

  /** A fresh host (own dir, own token) and what the exchange left in it. */
  function freshHost(name: string) {
    const dir = join(user.home, name, "bootstrap");
    const t = hub.newToken();
    const files = (f: string) => join(dir, f);
    return { dir, token: t, files, stub: () => writeStub(`${name}.sh`, renderStub(stubOptions({ bootstrapDir: dir, token: t }))) };
  }

  it("first boot, the exchange's answer lost once: asked again in the same run with the same credential (a retry, not a replay)", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const h = freshHost("lostonce");
    hub.log.length = 0;
    hub.dropExchangeAnswers = 1;
    const before = hub.requests.length;
    const r = await runStub(h.stub(), { env });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain("no answer to the exchange; asking again with the same credential");
    expect(hub.log).toEqual(["exchange", "retry"]);
    const posts = hub.requests.slice(before).filter((q) => q.method === "POST");
    expect(posts).toHaveLength(2);
    expect(posts[1]!.body).toBe(posts[0]!.body);
    const credential = readFileSync(h.files("host-credential"), "utf8").trimEnd();
    expect(JSON.parse(posts[0]!.body)).toEqual({ credential_sha256: sha256(credential) });
    expect(existsSync(h.files("bootstrap-token"))).toBe(false);
    expect(existsSync(h.files("host-credential.pending"))).toBe(false);
  });

  it("first boot, every answer lost: exit 1 with the chosen credential kept 0600; the next run reuses it and comes up", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const h = freshHost("lostall");
    hub.log.length = 0;
    hub.dropExchangeAnswers = 2;
    const r1 = await runStub(h.stub(), { env });
    expect(r1.code).toBe(1);
    expect(r1.stdout).toMatch(/did not answer the exchange \(HTTP 000\); the next run asks again with the same credential/);
    const pending = readFileSync(h.files("host-credential.pending"), "utf8").trimEnd();
    expect(statSync(h.files("host-credential.pending")).mode & 0o777).toBe(0o600);
    expect(existsSync(h.files("host-credential"))).toBe(false);
    const r2 = await runStub(h.stub(), { env });
    expect(r2.code, r2.stdout + r2.stderr).toBe(0);
    expect(hub.log).toEqual(["exchange", "retry", "retry"]); // run 1: both answers lost; run 2: acknowledged
    expect(readFileSync(h.files("host-credential"), "utf8")).toBe(`${pending}\n`);
    expect(hub.credentialHashes()).toContain(sha256(pending));
  });

  it("a pending credential chosen for another token (an older user-data) is not reused: a new one is chosen", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const h = freshHost("stalepending");
    execFileSync("install", ["-d", "-m", "700", "-o", String(user.uid), h.dir]);
    const stale = `cchc_${"A".repeat(43)}`;
    writeFileSync(h.files("host-credential.pending"), `${stale}\n`, { mode: 0o600 });
    writeFileSync(h.files("host-credential.pending.token"), `${sha256("an older token\n")}\n`, { mode: 0o600 });
    for (const f of ["host-credential.pending", "host-credential.pending.token"]) chownSync(h.files(f), user.uid, statSync(h.dir).gid);
    const r = await runStub(h.stub(), { env });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const credential = readFileSync(h.files("host-credential"), "utf8").trimEnd();
    expect(credential).not.toBe(stale);
    expect(credential).toMatch(/^cchc_[A-Za-z0-9_-]{43}$/);
  });

  it("a hub of the previous version (ignores the body, makes the credential): its credential is taken", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const h = freshHost("legacyhub");
    hub.legacy = true;
    try {
      const r = await runStub(h.stub(), { env });
      expect(r.code, r.stdout + r.stderr).toBe(0);
    } finally {
      hub.legacy = false;
    }
    const credential = readFileSync(h.files("host-credential"), "utf8").trimEnd();
    expect(hub.credentialHashes().at(-1)).toBe(sha256(credential));
    expect(existsSync(h.files("host-credential.pending"))).toBe(false);
  });

  it("runs the real bootstrap.py from this package (check-config on a built config)", async () => {
    const facts = { ...exampleHostFacts(), bootstrap_user: user.name, home: user.home };
    const config = buildBootstrapConfig(facts);
    const realPy = bootstrapPyBytes();
    hub.files = { bootstrapPy: realPy, config: Buffer.from(JSON.stringify(config)) };
    const stub = writeStub("real.sh", renderStub(stubOptions({ bootstrapPySha256: undefined })));
    const r = await runStub(stub, { env, args: ["check-config"] });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/valid/);
  });
});

/** A port nothing listens on (bound, then closed). */
function closedPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createNetServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

describe("a rendered stub started as root", () => {
  // As root we are root already; otherwise a user namespace gives uid 0 (and
  // nothing else), which is all these refusals look at.
  const wrap = IS_ROOT ? [] : ["unshare", "--user", "--map-root-user"];
  const rootPossible = IS_ROOT || canUnshareRoot();
  if (!rootPossible) {
    console.log("SKIP root-refusal stub runs: not root and unprivileged user namespaces are not available here");
  }

  it.skipIf(!rootPossible)("refuses without BOOTSTRAP_USER when no default user was rendered, and creates nothing", async () => {
    const dir = join(top, "never-created", "bootstrap");
    const stub = writeStub("nouser.sh", renderStub(stubOptions({ bootstrapUser: null, bootstrapDir: dir })));
    const r = await runStub(stub, { env, wrap });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/started as root without BOOTSTRAP_USER/);
    expect(existsSync(join(top, "never-created"))).toBe(false);
  });

  it.skipIf(!rootPossible)("refuses BOOTSTRAP_USER=root", async () => {
    const stub = writeStub("rootuser.sh", renderStub(stubOptions({ bootstrapUser: null })));
    const r = await runStub(stub, { env: { ...env, BOOTSTRAP_USER: "root" }, wrap });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/BOOTSTRAP_USER must not be root/);
  });

  it.skipIf(!rootPossible)("refuses a BOOTSTRAP_USER that does not exist", async () => {
    const stub = writeStub("ghost.sh", renderStub(stubOptions({ bootstrapUser: null })));
    const r = await runStub(stub, { env: { ...env, BOOTSTRAP_USER: "no-such-user-xyz" }, wrap });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/does not exist/);
  });

  it.skipIf(!IS_ROOT)("drops to BOOTSTRAP_USER from the environment (needs root: useradd and a real privilege drop)", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const stub = writeStub("envuser.sh", renderStub(stubOptions({ bootstrapUser: null })));
    const r = await runStub(stub, { env: { ...env, BOOTSTRAP_USER: user.name } });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`started as root; running as ${user.name}`);
    expect(standInResult().uid).toBe(user.uid);
  });
  if (!IS_ROOT) console.log("SKIP drop-to-BOOTSTRAP_USER stub run: needs root (useradd and a real privilege drop)");
});

describe("a rendered stub started as the wrong non-root user", () => {
  it("refuses when BOOTSTRAP_USER names someone else", async () => {
    const stub = writeStub("wrong.sh", renderStub(stubOptions()));
    // As root, run it as the test user via runuser, claiming to be someone else.
    const wrap = IS_ROOT ? ["runuser", "-u", user.name, "--"] : [];
    const stubText = readFileSync(stub);
    const readable = join(top, "home", "wrong-readable.sh");
    writeFileSync(readable, stubText, { mode: 0o644 });
    const r = await runStub(IS_ROOT ? readable : stub, { env: { ...env, BOOTSTRAP_USER: "someone-else" }, wrap });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/the bootstrap user is someone-else/);
  });
});
