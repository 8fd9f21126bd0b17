/**
 * The test artifacts themselves: layout, manifests, checksums, and the
 * stand-in daemon really serving its health URL. Runs without root.
 */
import { spawn } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  BUNDLES,
  type BuiltBundle,
  type BuiltNode,
  buildBundle,
  buildNodeMirror,
  bundleLayout,
  publishSite,
  sha256File,
  testBundleSpecs,
} from "../src/artifacts.js";
import { run } from "../src/proc.js";

let scratch: string;
let bundles: BuiltBundle[];
let node: BuiltNode;
const savedCache = process.env.HOST_TESTBED_CACHE;

beforeAll(async () => {
  // Node's mirror comes from the shared cache (npm pack is slow the first time);
  // the bundles are built fresh in a scratch cache so the build itself is tested.
  node = await buildNodeMirror();
  scratch = mkdtempSync(join(tmpdir(), "testbed-artifacts-"));
  process.env.HOST_TESTBED_CACHE = scratch;
  bundles = [];
  for (const spec of testBundleSpecs("2.3.4", 300_000)) bundles.push(await buildBundle(spec));
}, 300_000);

afterAll(() => {
  if (savedCache === undefined) delete process.env.HOST_TESTBED_CACHE;
  else process.env.HOST_TESTBED_CACHE = savedCache;
  rmSync(scratch, { recursive: true, force: true });
});

async function tarList(path: string): Promise<string[]> {
  return (await run(["tar", "-tvJf", path])).stdout.trim().split("\n");
}

describe("bundles", () => {
  it("have the real bundles' names and layouts (UPSTREAM.md): the single executable and its node link, bundle/, bin/", async () => {
    const by = Object.fromEntries(bundles.map((b) => [b.spec.artifact, b]));
    const names = async (b: (typeof bundles)[number]) => (await tarList(b.path)).map((l) => l.split(/\s+/).slice(5).join(" "));
    // project-host: `tar Jcf x ./cocalc-project-host-<v>-<arch>-<os>`, unpacked with strip 2
    const ph = by.project_host!;
    expect(ph.fileName).toBe("cocalc-project-host-2.3.4-amd64-linux.tar.xz");
    expect([ph.stripComponents, ph.topDir]).toEqual([2, "./cocalc-project-host-2.3.4-amd64-linux"]);
    expect(await names(ph)).toEqual([
      "./cocalc-project-host-2.3.4-amd64-linux/",
      "./cocalc-project-host-2.3.4-amd64-linux/cocalc-project-host",
      "./cocalc-project-host-2.3.4-amd64-linux/node -> cocalc-project-host",
    ]);
    expect((await tarList(ph.path))[1]).toMatch(/^-rwxr-xr-x 0\/0 /);
    // project: bundle/ with the entry point, package.json, node_modules/, build/ and the project's bin/
    const project = by.project!;
    expect([project.fileName, project.stripComponents]).toEqual(["bundle-linux-amd64.tar.xz", 1]);
    const inProject = await names(project);
    expect(inProject.every((n) => n.startsWith("bundle/"))).toBe(true);
    for (const f of ["bundle/index.js", "bundle/package.json", "bundle/node_modules/", "bundle/build/", "bundle/src/packages/project/bin/"]) {
      expect(inProject).toContain(f);
    }
    // tools: bin/ with the binaries, strip 1
    const tools = by.tools!;
    expect([tools.fileName, tools.stripComponents]).toEqual(["tools-linux-amd64.tar.xz", 1]);
    expect(await names(tools)).toEqual(["bin/", "bin/dropbear", "bin/rg", "bin/rustic", "bin/sshpiperd"]);
    for (const b of bundles) expect(b.executables.length).toBeGreaterThan(0);
  });

  it("compress like software (not like zeros) and are reproducible", async () => {
    const project = bundles.find((b) => b.spec.artifact === "project")!;
    const ratio = 300_000 / project.size_bytes;
    expect(ratio).toBeGreaterThan(2);
    expect(ratio).toBeLessThan(10);
    expect(await sha256File(project.path)).toBe(project.sha256);
    rmSync(project.path);
    rmSync(`${project.path}.meta.json`);
    const again = await buildBundle(project.spec);
    expect(again.sha256).toBe(project.sha256);
  });

  it("are published with manifests, .sha256 files and a Node mirror with SHASUMS256.txt", () => {
    const site = mkdtempSync(join(scratch, "site-"));
    const published = publishSite(site, "http://127.0.0.1:9/a/", bundles, node);
    const ph = published.bundles.project_host;
    expect(ph.url).toBe("http://127.0.0.1:9/a/project-host/2.3.4/cocalc-project-host-2.3.4-amd64-linux.tar.xz");
    expect(published.bundles.tools.url).toBe("http://127.0.0.1:9/a/tools/2.3.4/tools-linux-amd64.tar.xz");
    expect(published.bundles.project.url).toBe("http://127.0.0.1:9/a/project/2.3.4/bundle-linux-amd64.tar.xz");
    expect(ph.strip_components).toBe(2);
    const manifest = JSON.parse(readFileSync(join(site, "project-host", "latest-linux-amd64.json"), "utf8"));
    expect(manifest).toMatchObject({ url: ph.url, sha256: ph.sha256, size_bytes: ph.size_bytes, os: "linux", arch: "amd64" });
    expect(Number.isNaN(Date.parse(manifest.built_at))).toBe(false);
    expect(readFileSync(join(site, "project-host", "2.3.4", "cocalc-project-host-2.3.4-amd64-linux.tar.xz.sha256"), "utf8")).toBe(
      `${ph.sha256}  cocalc-project-host-2.3.4-amd64-linux.tar.xz\n`,
    );
    expect(published.node.dist_url).toBe("http://127.0.0.1:9/a/node");
    expect(readFileSync(join(site, "node", `v${node.spec.version}`, "SHASUMS256.txt"), "utf8")).toBe(`${node.sha256}  ${node.fileName}\n`);
  });

  it("can be zstd archives (.tar.zst, zstd -19): same files, reproducible, published and manifested as such", async () => {
    const spec = { ...testBundleSpecs("2.3.4", 300_000)[1]!, compression: "zstd" as const };
    const zst = await buildBundle(spec);
    expect(zst.fileName).toBe("bundle-linux-amd64.tar.zst"); // the real project bundle's name, zstd-compressed
    expect(readFileSync(zst.path).subarray(0, 4)).toEqual(Buffer.from([0x28, 0xb5, 0x2f, 0xfd])); // zstd's magic
    const xz = bundles.find((b) => b.spec.artifact === "project")!;
    const list = async (path: string, flag: string) => (await run(["tar", "-tv", flag, "-f", path])).stdout;
    expect(await list(zst.path, "--zstd")).toBe(await list(xz.path, "-J"));
    rmSync(zst.path);
    rmSync(`${zst.path}.meta.json`);
    expect((await buildBundle(spec)).sha256).toBe(zst.sha256);
    const site = mkdtempSync(join(scratch, "site-"));
    const published = publishSite(site, "http://127.0.0.1:9", [zst], node);
    expect(published.bundles.project.url).toBe("http://127.0.0.1:9/project/2.3.4/bundle-linux-amd64.tar.zst");
    const manifest = JSON.parse(readFileSync(join(site, "project", "latest-linux-amd64.json"), "utf8"));
    expect(manifest).toMatchObject({ url: published.bundles.project.url, sha256: zst.sha256, size_bytes: zst.size_bytes });
  });

  it("name their archive in one place: bundleLayout with the compression (xz by default)", () => {
    expect(BUNDLES.map((a) => bundleLayout(a, "2.3.4").fileName)).toEqual([
      "cocalc-project-host-2.3.4-amd64-linux.tar.xz",
      "bundle-linux-amd64.tar.xz",
      "tools-linux-amd64.tar.xz",
    ]);
    expect(BUNDLES.map((a) => bundleLayout(a, "2.3.4", "arm64", "zstd").fileName)).toEqual([
      "cocalc-project-host-2.3.4-arm64-linux.tar.zst",
      "bundle-linux-arm64.tar.zst",
      "tools-linux-arm64.tar.zst",
    ]);
    // the compression changes the name only, never the inside
    for (const a of BUNDLES) expect({ ...bundleLayout(a, "1", "amd64", "zstd"), fileName: "" }).toEqual({ ...bundleLayout(a, "1"), fileName: "" });
  });

  it("can be published with a wrong checksum on purpose", () => {
    const site = mkdtempSync(join(scratch, "site-"));
    const published = publishSite(site, "http://127.0.0.1:9", bundles, node, { wrongChecksum: "tools" });
    const real = bundles.find((b) => b.spec.artifact === "tools")!.sha256;
    expect(published.bundles.tools.sha256).not.toBe(real);
    expect(published.bundles.project.sha256).toBe(bundles.find((b) => b.spec.artifact === "project")!.sha256);
  });
});

describe("Node dist mirror", () => {
  it("is the official layout: bin/node, npm under lib/node_modules, npm/npx links", async () => {
    const listing = await tarList(node.path);
    const top = `node-v${node.spec.version}-linux-x64/`;
    const names = listing.map((l) => l.split(/\s+/)[5]!);
    expect(names.every((n) => n.startsWith(top))).toBe(true);
    expect(listing.find((l) => l.includes(`${top}bin/node`))).toMatch(/^-rwx/);
    expect(names).toContain(`${top}lib/node_modules/npm/package.json`);
    expect(listing.find((l) => l.includes(`${top}bin/npm `))).toContain("-> ../lib/node_modules/npm/bin/npm-cli.js");
    expect(await sha256File(node.path)).toBe(node.sha256);
  });
});

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

describe("stand-in project-host daemon", () => {
  const daemonSource = () => readFileSync(new URL("../src/daemon.py", import.meta.url), "utf8").replace("@VERSION@", "9.9.9");

  /** A directory laid out as the daemon expects, and the env file that describes it (mount point: /). */
  function contractLayout(port: number): { dir: string; envFile: string; env: Record<string, string> } {
    const dir = mkdtempSync(join(scratch, "daemon-"));
    chmodSync(dir, 0o755);
    const data = join(dir, "data");
    for (const d of ["data/tmp", "data/secrets", "bundles/project/current", "bundles/tools/current", "bundles/project_host/current"]) {
      mkdirSync(join(dir, d), { recursive: true });
    }
    chmodSync(join(data, "tmp"), 0o1777);
    writeFileSync(join(data, "secrets", "conat-password"), "pw\n", { mode: 0o600 });
    for (const f of ["index.js", "package.json"]) writeFileSync(join(dir, "bundles/project/current", f), "{}\n");
    const tools = join(dir, "bundles/tools/current");
    for (const t of ["dropbear", "rg", "rustic", "sshpiperd"]) writeFileSync(join(tools, t), "#!/bin/sh\n", { mode: 0o755 });
    // the daemon as upstream's bundle holds it: the executable and its node link
    writeFileSync(join(dir, "bundles/project_host/current/cocalc-project-host"), daemonSource(), { mode: 0o755 });
    symlinkSync("cocalc-project-host", join(dir, "bundles/project_host/current/node"));
    const env: Record<string, string> = {
      MASTER_CONAT_SERVER: "http://127.0.0.1:9",
      PROJECT_HOST_ID: "00000000-0000-4000-8000-000000000000",
      PROJECT_HOST_NAME: "h1",
      PROJECT_HOST_REGION: "",
      PROJECT_HOST_PUBLIC_URL: "https://127.0.0.1",
      PROJECT_HOST_INTERNAL_URL: `http://127.0.0.1:${port}`,
      PROJECT_HOST_SSH_SERVER: "127.0.0.1:2222",
      COCALC_PROJECT_HOST_SOFTWARE_BASE_URL: "http://127.0.0.1:9/software",
      COCALC_BTRFS_IMAGE_GB: "10",
      COCALC_SSH_SERVER: "0.0.0.0:2222",
      PROJECT_RUNNER_NAME: "0",
      COCALC_FILE_SERVER_MOUNTPOINT: "/",
      DATA: data,
      COCALC_DATA: data,
      COCALC_LITE_SQLITE_FILENAME: join(data, "sqlite.db"),
      COCALC_PROJECT_BUNDLES: join(dir, "bundles/project"),
      COCALC_PROJECT_TOOLS: tools,
      COCALC_BIN_PATH: tools,
      COCALC_SYNC_PROJECTS: "/project-[project_id]/.local/share/cocalc/persist",
      TMPDIR: join(data, "tmp"),
      TMP: join(data, "tmp"),
      TEMP: join(data, "tmp"),
      HOST: "0.0.0.0",
      PORT: String(port),
      COCALC_PROJECT_HOST_HTTPS: "0",
      DEBUG: "cocalc:*",
      DEBUG_CONSOLE: "yes",
      SPACED: "a b",
    };
    const envFile = join(dir, "project-host.env");
    writeFileSync(
      envFile,
      `${Object.entries(env)
        .map(([k, v]) => (k === "SPACED" ? `${k}='${v}'` : `${k}=${v}`))
        .join("\n")}\n`,
    );
    return { dir, envFile, env };
  }

  it("answers GET /healthz on PORT when every key it depends on is there and real", async () => {
    const port = await freePort();
    const { dir, envFile, env } = contractLayout(port);
    // as systemd would start it: the file's values in its environment
    const child = spawn("python3", [join(dir, "bundles/project_host/current/cocalc-project-host")], {
      env: { PATH: process.env.PATH, COCALC_PROJECT_HOST_ENV_FILE: envFile, ...env },
      stdio: "ignore",
    });
    try {
      let body: { ok: boolean; version: string } | null = null;
      for (let i = 0; i < 50 && !body; i++) {
        try {
          const r = await fetch(`http://127.0.0.1:${port}/healthz`);
          if (r.status === 200) body = (await r.json()) as { ok: boolean; version: string };
        } catch {
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      expect(body).toMatchObject({ ok: true, version: "9.9.9" });
      expect((await fetch(`http://127.0.0.1:${port}/other`)).status).toBe(404);
    } finally {
      child.kill();
    }
  });

  it("refuses to start when a key is missing, points at nothing, or systemd read the file differently", async () => {
    const { dir, envFile, env } = contractLayout(await freePort());
    rmSync(join(dir, "bundles/tools/current/rg"));
    rmSync(join(dir, "bundles/project/current/index.js"));
    chmodSync(join(dir, "data/tmp"), 0o755);
    const exe = join(dir, "bundles/project_host/current/cocalc-project-host");
    const start = (extra: Record<string, string>, path = exe) =>
      run(["python3", path], {
        env: { PATH: process.env.PATH!, COCALC_PROJECT_HOST_ENV_FILE: envFile, ...extra },
        allowFailure: true,
        timeoutMs: 10_000,
      });
    const wrong = await start({ ...env, SPACED: "'a b'" });
    expect(wrong.code).toBe(78);
    expect(wrong.stderr).toMatch(/COCALC_BIN_PATH .* has no executable rg \(the tools bundle's bin\/\)/);
    expect(wrong.stderr).toMatch(/COCALC_PROJECT_BUNDLES .*: current\/index\.js is missing/);
    expect(wrong.stderr).toMatch(/TMPDIR .* is not a writable sticky directory/);
    expect(wrong.stderr).toContain(`SPACED: the env file says 'a b' to the daemon's parser, systemd gave "'a b'"`);
    const { DEBUG: _dropped, ...withoutDebug } = env;
    writeFileSync(envFile, readFileSync(envFile, "utf8").replace(/^DEBUG=.*\n/m, ""));
    const missing = await start(withoutDebug);
    expect(missing.code).toBe(78);
    expect(missing.stderr).toContain("DEBUG is missing or empty");
    const badValues = { ...env, PROJECT_HOST_PUBLIC_URL: "not a url", PROJECT_HOST_SSH_SERVER: "127.0.0.1", COCALC_BTRFS_IMAGE_GB: "ten" };
    writeFileSync(
      envFile,
      Object.entries(badValues)
        .map(([k, v]) => `${k}=${k === "SPACED" ? `'${v}'` : v}\n`)
        .join(""),
    );
    const bad = await start(badValues);
    expect(bad.code).toBe(78);
    expect(bad.stderr).toContain("PROJECT_HOST_PUBLIC_URL 'not a url' is not an http(s) URL");
    expect(bad.stderr).toContain("PROJECT_HOST_SSH_SERVER '127.0.0.1' is not host:port");
    expect(bad.stderr).toContain("COCALC_BTRFS_IMAGE_GB 'ten' is not a number of GB");
    // outside the bundle's layout (no node link beside it, another name): refused too
    writeFileSync(join(dir, "daemon.py"), daemonSource());
    const loose = await start(badValues, join(dir, "daemon.py"));
    expect(loose.stderr).toMatch(/run as .*daemon\.py, not as the bundle's cocalc-project-host/);
    rmSync(join(dir, "bundles/project_host/current/node"));
    expect((await start(badValues)).stderr).toMatch(/current\/node is not a link to cocalc-project-host/);
  });

  it("fails fast when its env file is missing", async () => {
    const dir = mkdtempSync(join(scratch, "daemon-"));
    writeFileSync(join(dir, "daemon.py"), daemonSource());
    const r = await run(["python3", join(dir, "daemon.py")], {
      env: { PATH: process.env.PATH, COCALC_PROJECT_HOST_ENV_FILE: join(dir, "nope.env") },
      allowFailure: true,
      timeoutMs: 10_000,
    });
    expect(r.code).toBe(78);
    expect(r.stderr).toMatch(/cannot read .*nope\.env/);
  });
});
