/**
 * Real runs of rendered stubs: real sh, curl, sha256sum and python3 against a
 * hub stand-in on 127.0.0.1. When the tests run as root (as in .ci/run) the
 * stub is started as root and must drop to a throwaway user made with
 * useradd; otherwise it runs as the current user, and the root-refusal cases
 * use a user namespace (`unshare -r`) when the kernel allows one.
 */
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
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

function standInResult(): Record<string, unknown> {
  return JSON.parse(readFileSync(join(bootstrapDir, "stand-in-result.json"), "utf8")) as Record<string, unknown>;
}

describe("a rendered stub, run for real", () => {
  it("downloads, verifies and runs bootstrap.py as the bootstrap user; the token stays in its 0600 file", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const stub = writeStub("ok.sh", renderStub(stubOptions()));
    const started = Date.now();
    const r = await runStub(stub, { env });
    console.log(`stub success run: ${Date.now() - started} ms`);
    expect(r.stderr + r.stdout).toContain("stand-in bootstrap.py ran");
    expect(r.code, r.stderr).toBe(0);

    const tokenFile = join(bootstrapDir, "bootstrap-token");
    const st = statSync(tokenFile);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(user.uid);
    expect(readFileSync(tokenFile, "utf8")).toBe(`${token}\n`);
    expect(statSync(bootstrapDir).mode & 0o077).toBe(0); // umask 077

    const result = standInResult();
    expect(result.uid).toBe(user.uid);
    expect(result.argv).toEqual(["--config", join(bootstrapDir, "bootstrap-config.json")]);
    expect(result.cwd).toBe(bootstrapDir);
    expect(result.stdin_is_devnull).toBe(true);
    expect(result.token_mode).toBe(0o600);
    expect(result.leaks, "processes with the token in their argv or environment").toEqual([]);

    // Verified bytes are in place; no .part files remain.
    expect(readFileSync(join(bootstrapDir, "bootstrap.py"))).toEqual(STAND_IN_BOOTSTRAP_PY);
    expect(existsSync(join(bootstrapDir, "bootstrap.py.part"))).toBe(false);

    const log = readFileSync(join(bootstrapDir, "bootstrap.log"), "utf8");
    expect(log).toContain("stand-in bootstrap.py ran");
    expect(log).toContain("stand-in stderr line");
    expect(log).toContain("bootstrap.py exited with 0");
    expect(log).not.toContain(token);
    expect(statSync(join(bootstrapDir, "bootstrap.log")).mode & 0o077).toBe(0);

    const curlArgv = readFileSync(curl.argvLog, "utf8");
    expect(curlArgv).toContain("--retry-all-errors");
    expect(curlArgv).toContain("--config");
    expect(curlArgv).not.toContain(token);

    // Both downloads carried the token, in the header only.
    const seen = hub.requests.slice(-2);
    expect(seen.map((q) => q.path)).toEqual([new URL(`${hub.baseUrl}/bootstrap.py`).pathname, new URL(`${hub.baseUrl}/config`).pathname]);
    for (const q of seen) expect(q.authorization).toBe(`Bearer ${token}`);
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

  it("never runs a bootstrap.py whose sha256 differs from the rendered one", async () => {
    const tampered = Buffer.concat([STAND_IN_BOOTSTRAP_PY, Buffer.from("open('/tmp/pwned', 'w')\n")]);
    // Render with the good sha, serve the tampered bytes.
    const stub = writeStub("tampered.sh", renderStub(stubOptions({ bootstrapPySha256: sha256(STAND_IN_BOOTSTRAP_PY) })));
    hub.files = { bootstrapPy: tampered, config: standInConfig(0) };
    const resultFile = join(bootstrapDir, "stand-in-result.json");
    writeFileSync(resultFile, "stale");
    const oldPy = join(bootstrapDir, "bootstrap.py");
    const before = existsSync(oldPy) ? readFileSync(oldPy) : null;
    const r = await runStub(stub, { env });
    expect(r.code).not.toBe(0);
    // After the log starts, stdout and stderr both go through the tee.
    expect(r.stdout).toMatch(/does not have the expected sha256/);
    expect(readFileSync(join(bootstrapDir, "bootstrap.log"), "utf8")).toMatch(/does not have the expected sha256/);
    expect(readFileSync(resultFile, "utf8")).toBe("stale"); // nothing ran
    expect(existsSync(join(bootstrapDir, "bootstrap.py.part"))).toBe(false);
    // The previously verified copy is untouched (the tampered one never replaced it).
    expect(existsSync(oldPy) ? readFileSync(oldPy) : null).toEqual(before);
  });

  it("works in a bootstrap dir whose name has quotes, $(...), backticks and a newline", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const nastyParent = join(user.home, 'it\'s $(touch pwned) `touch pwned2` \\ "x"\nline 2');
    const nastyDir = join(nastyParent, "bootstrap");
    const stub = writeStub("nasty.sh", renderStub(stubOptions({ bootstrapDir: nastyDir })));
    const r = await runStub(stub, { env });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const result = JSON.parse(readFileSync(join(nastyDir, "stand-in-result.json"), "utf8")) as { argv: string[] };
    expect(result.argv).toEqual(["--config", join(nastyDir, "bootstrap-config.json")]);
    expect(statSync(join(nastyDir, "bootstrap-token")).mode & 0o777).toBe(0o600);
    for (const dir of ["/", user.home, nastyParent, nastyDir]) {
      expect(existsSync(join(dir, "pwned")) || existsSync(join(dir, "pwned2")), dir).toBe(false);
    }
  });

  it("fails cleanly when the hub refuses the token", async () => {
    hub.files = { bootstrapPy: STAND_IN_BOOTSTRAP_PY, config: standInConfig(0) };
    const wrongToken = newToken();
    // One retry keeps this quick; the default (5) waits about 30 s on a 401.
    const stub = writeStub("badtoken.sh", renderStub(stubOptions({ token: wrongToken, downloadRetries: 1 })));
    const r = await runStub(stub, { env });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/401/);
    expect(r.stdout).toMatch(/downloading bootstrap.py failed/);
    expect(hub.requests.slice(-2).map((q) => q.authorization)).toEqual([`Bearer ${wrongToken}`, `Bearer ${wrongToken}`]);
    const log = readFileSync(join(bootstrapDir, "bootstrap.log"), "utf8");
    expect(log).not.toContain(wrongToken);
    expect(log).not.toContain(token);
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
