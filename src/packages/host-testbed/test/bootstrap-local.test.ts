/**
 * `bootstrap-local --dry-run` on this machine, as a real subprocess: it
 * builds the artifacts for this machine's arch (cached), starts the hub,
 * provisions THIS machine and prints the rendered config, and changes
 * nothing. The config must validate (zod and bootstrap.py's check-config)
 * and name this machine's OS release, arch, hostname and bootstrap user.
 *
 * The real run changes the machine for good (apt, /btrfs, fstab, a systemd
 * unit) and needs systemd as PID 1, so here it runs inside a throwaway host
 * (root, like the end-to-end suite; SKIP_E2E=1 skips it): the workspace
 * and this Node.js are copied in and it runs as a GitHub runner's would,
 * `sudo --preserve-env=PATH` from the non-root user. On GitHub it runs on
 * the runners themselves (ci.yml, bootstrap-on-runner).
 */
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { BOOTSTRAP_PY_PATH, type BootstrapConfig, BootstrapConfigSchema } from "@cocalc/project-host-bootstrap";
import { USER_RE } from "@cocalc/project-host-bootstrap/contract";
import { afterAll, describe, expect, it } from "vitest";
import { buildBundle, buildNodeMirror, DEFAULT_NODE, nodeArchOf, testBundleSpecs } from "../src/artifacts.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import { cacheDir } from "../src/paths.js";
import { run } from "../src/proc.js";
import { STUB_PATH } from "../src/testbed.js";

const PKG_DIR = fileURLToPath(new URL("..", import.meta.url));
const WORKSPACE = fileURLToPath(new URL("../../../..", import.meta.url));

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the CLI the way `pnpm run bootstrap-local` does (tsx, from the package directory). */
function bootstrapLocal(args: string[], env: Record<string, string | undefined>): Promise<CliResult> {
  const childEnv = { ...process.env, ...env };
  for (const [k, v] of Object.entries(env)) if (v === undefined) delete childEnv[k];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", "src/bootstrap-local.ts", ...args], { cwd: PKG_DIR, env: childEnv });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code: code ?? 1, stdout, stderr }));
  });
}

/** A non-root user with a /home/<name> home: the sudo caller when there is one, else the first such account. */
function bootstrapUserHere(): string | null {
  const sudoUser = process.env.SUDO_USER;
  const accounts = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .map((l) => l.split(":"))
    .filter((f) => f.length >= 6 && Number(f[2]) >= 1000 && f[0] !== "nobody" && USER_RE.test(f[0]!) && f[5] === `/home/${f[0]}`)
    .map((f) => f[0]!);
  if (sudoUser && accounts.includes(sudoUser)) return sudoUser;
  return accounts[0] ?? null;
}

function osRelease(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync("/etc/os-release", "utf8").split("\n")) {
    const m = /^([A-Z0-9_]+)="?([^"]*)"?$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

function dpkgArch(): "amd64" | "arm64" {
  return spawnSync("dpkg", ["--print-architecture"], { encoding: "utf8" }).stdout.trim() as "amd64" | "arm64";
}

/** The JSON between the CLI's config markers. */
function printedConfig(stdout: string): unknown {
  const m = /^--- rendered config \(token redacted\) ---\n([\s\S]*?)\n--- end of config ---$/m.exec(stdout);
  if (!m) throw new Error(`no config in the output:\n${stdout}`);
  return JSON.parse(m[1]!);
}

const user = bootstrapUserHere();
if (!user) process.stderr.write("[bootstrap-local] skipping the dry run: no non-root account with a /home/<name> home on this machine\n");

describe("bootstrap-local", () => {
  it.skipIf(!user)("--dry-run provisions this machine and prints a valid config naming its OS and arch, changing nothing", async () => {
    const home = `/home/${user}`;
    const before = { stub: existsSync(STUB_PATH), root: existsSync(`${home}/cocalc-host`) };
    const r = await bootstrapLocal(["--dry-run"], { BOOTSTRAP_USER: user! });
    expect(r.code, r.stderr).toBe(0);

    const config = BootstrapConfigSchema.parse(printedConfig(r.stdout)) as BootstrapConfig;
    const release = osRelease();
    const arch = dpkgArch();
    expect(config.os).toEqual({ id: release.ID, min_version: release.VERSION_ID });
    expect(config.arch).toBe(arch);
    expect(config.host.name).toBe(hostname().split(".")[0]!.toLowerCase());
    expect([config.bootstrap_user, config.home]).toEqual([user, home]);
    // a sparse loop image, no data disk
    expect(config.btrfs.data_disk).toBeNull();
    expect(config.btrfs.image_path).toBe(`${home}/cocalc-host/btrfs.img`);
    // the bundles are published for this arch
    for (const a of ["project_host", "project", "tools"] as const)
      expect(config.artifacts[a].url).toMatch(new RegExp(`(-${arch}-linux|-linux-${arch})\\.tar\\.xz$`));
    expect(Number(/^Stub: (\d+) bytes/m.exec(r.stdout)?.[1])).toBeGreaterThan(1000);

    // bootstrap.py, the program that will read it, accepts it too
    const dir = mkdtempSync(join(tmpdir(), "bootstrap-local-"));
    try {
      writeFileSync(join(dir, "config.json"), JSON.stringify(config));
      const check = spawnSync("python3", [BOOTSTRAP_PY_PATH, "--config", join(dir, "config.json"), "check-config", "--json"], { encoding: "utf8" });
      expect(check.status, check.stdout + check.stderr).toBe(0);
      expect(JSON.parse(check.stdout)).toMatchObject({ ok: true, config: { arch, os: config.os } });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }

    // nothing ran: no stub written, no bootstrap root made
    expect({ stub: existsSync(STUB_PATH), root: existsSync(`${home}/cocalc-host`) }).toEqual(before);
  });

  it("refuses root as the bootstrap user, before building anything", async () => {
    const r = await bootstrapLocal(["--dry-run"], { BOOTSTRAP_USER: "root", SUDO_USER: undefined });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/BOOTSTRAP_USER=root: the bootstrap user must not be root/);
    expect(r.stdout).not.toMatch(/rendered config/);
  });

  it("refuses to run without a bootstrap user, and says how to name one", async () => {
    const r = await bootstrapLocal(["--dry-run"], { BOOTSTRAP_USER: undefined, SUDO_USER: undefined });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/set BOOTSTRAP_USER/);
  });
});

describe.skipIf(process.env.SKIP_E2E === "1")("bootstrap-local in a throwaway host (root)", () => {
  let host: ThrowawayHost | undefined;

  afterAll(async () => {
    await host?.down();
  });

  /** What `pnpm install` left in this workspace, this Node.js, and the cached artifacts (the host has no npm). */
  async function copyWorkspaceInto(h: ThrowawayHost): Promise<void> {
    for (const spec of testBundleSpecs()) await buildBundle(spec);
    await buildNodeMirror({ ...DEFAULT_NODE, arch: nodeArchOf(dpkgArch()) }); // the throwaway hosts are this machine's arch
    mkdirSync(h.path("/work/main"), { recursive: true });
    await run([
      "bash",
      "-c",
      'set -o pipefail; tar -C "$1" --exclude=./.git --exclude=./.venv -cf - . | tar -C "$2" -xf -',
      "bash",
      WORKSPACE,
      h.path("/work/main"),
    ]);
    copyFileSync(process.execPath, h.path("/usr/local/bin/node"));
    await run(["chmod", "0755", h.path("/usr/local/bin/node")]);
    const cache = h.path("/var/cache/cocalc-host-testbed");
    mkdirSync(cache, { recursive: true });
    await run(["cp", "-a", join(cacheDir(), "artifacts"), join(cacheDir(), "node-mirror"), cache]);
  }

  it("bootstraps the host it runs on, checks the end state and a re-run that changes nothing", async () => {
    const why = whyNotSupported();
    if (why) throw new Error(`${why}. Run as root, or set SKIP_E2E=1 to skip it (reported as skipped).`);
    host = await ThrowawayHost.up();
    await copyWorkspaceInto(host);
    const pkg = "/work/main/src/packages/host-testbed";
    const r = await host.exec(["bash", "-c", `cd ${pkg} && sudo --preserve-env=PATH node --import tsx src/bootstrap-local.ts`], {
      user: host.user,
      allowFailure: true,
      timeoutMs: 15 * 60_000,
    });
    const out = r.stdout + r.stderr;
    expect(r.code, out.slice(-6000)).toBe(0);
    expect(r.stdout).toContain(`This machine: ${host.name}, debian 12, ${dpkgArch()}; bootstrap user ${host.user}`);
    expect(r.stdout).toMatch(/^bootstrap.py timings:\nrun \S+ \(done\)/m);
    expect(r.stdout).toContain("ok: the end state after the first run");
    expect(r.stdout).toContain("ok: the re-run changed nothing");
    expect(r.stdout).toMatch(/^All checks passed: first run [\d.]+ s, re-run [\d.]+ s\.$/m);
    // the stub carried the token; it is gone afterwards
    expect(existsSync(host.path(STUB_PATH))).toBe(false);
    process.stderr.write(`[bootstrap-local] in ${host.name}: ${/^All checks passed.*$/m.exec(r.stdout)?.[0]}\n`);
  });
});
