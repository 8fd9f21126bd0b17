/**
 * bootstrap.py as a package asset: the constant, the bytes and the hash, and
 * the real thing: build, `pnpm pack`, extract into a throwaway project's
 * node_modules, resolve the `exports` subpaths with Node's own resolver,
 * import the built package, and run the packed bootstrap.py.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BOOTSTRAP_PY_PATH, bootstrapPyBytes, bootstrapPySha256 } from "../src/asset.js";

const PACKAGE_DIR = fileURLToPath(new URL("..", import.meta.url));
const UTIL_DIR = fileURLToPath(new URL("../../util", import.meta.url));
const require = createRequire(import.meta.url);
const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe("asset.ts", () => {
  it("points at python/bootstrap.py in this package", () => {
    expect(BOOTSTRAP_PY_PATH).toBe(join(PACKAGE_DIR, "python", "bootstrap.py"));
    expect(existsSync(BOOTSTRAP_PY_PATH)).toBe(true);
  });

  it("gives the file's exact bytes and their sha256", () => {
    const bytes = bootstrapPyBytes(); // first use: asset.ts reads and caches the file now
    const onDisk = readFileSync(BOOTSTRAP_PY_PATH);
    expect(bytes.equals(onDisk)).toBe(true);
    expect(bootstrapPySha256()).toBe(sha256(onDisk));
    expect(bootstrapPySha256()).toMatch(/^[0-9a-f]{64}$/);
  });

  it("hands out copies: changing returned bytes does not change the asset", () => {
    const first = bootstrapPyBytes();
    first.fill(0);
    expect(sha256(bootstrapPyBytes())).toBe(bootstrapPySha256());
  });
});

describe("the build of bootstrap.py from python/cocalc_bootstrap/ (python/build.py)", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "phb-build-"));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const build = (out: string) =>
    spawnSync("python3", [join(PACKAGE_DIR, "python", "build.py"), "--out", out], { encoding: "utf8" });

  it("is reproducible: two builds give the same bytes, and they are the committed asset", () => {
    const a = join(dir, "a.py");
    const b = join(dir, "b.py");
    expect(build(a).status).toBe(0);
    expect(build(b).status).toBe(0);
    expect(sha256(readFileSync(a))).toBe(sha256(readFileSync(b)));
    expect(sha256(readFileSync(a))).toBe(bootstrapPySha256());
  });

  it("--check refuses a shipped file that differs from the modules, naming the file", () => {
    const stale = join(dir, "stale.py");
    writeFileSync(stale, `${readFileSync(BOOTSTRAP_PY_PATH, "utf8")}# edited by hand\n`);
    const r = spawnSync("python3", [join(PACKAGE_DIR, "python", "build.py"), "--out", stale, "--check"], { encoding: "utf8" });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("stale.py differs from a fresh build");
  });
});

describe("the packed package (pnpm pack)", () => {
  let work: string;
  let project: string;
  let packedPkg: string;
  let files: string[];

  function pack(dir: string, dest: string): string {
    execFileSync("pnpm", ["pack", "--pack-destination", dest], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
    const tgz = readdirSync(dest).find((f) => f.endsWith(".tgz") && f.includes(dir.endsWith("util") ? "util" : "project-host-bootstrap"));
    if (!tgz) throw new Error(`pnpm pack produced no tarball for ${dir}`);
    return join(dest, tgz);
  }

  function extractInto(tgz: string, target: string): string[] {
    const tmp = mkdtempSync(join(work, "x-"));
    execFileSync("tar", ["-xzf", tgz, "-C", tmp]);
    const list = execFileSync("tar", ["-tzf", tgz], { encoding: "utf8" }).trim().split("\n");
    mkdirSync(dirname(target), { recursive: true });
    renameSync(join(tmp, "package"), target);
    return list;
  }

  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), "phb-pack-"));
    const started = Date.now();
    // The tarball ships dist/, so build first (util before its dependant).
    const tsc = require.resolve("typescript/bin/tsc");
    for (const dir of [UTIL_DIR, PACKAGE_DIR]) execFileSync(process.execPath, [tsc, "-p", "tsconfig.build.json"], { cwd: dir });
    const built = Date.now();
    const tarballs = join(work, "tarballs");
    mkdirSync(tarballs);
    const utilTgz = pack(UTIL_DIR, tarballs);
    const pkgTgz = pack(PACKAGE_DIR, tarballs);
    project = join(work, "project");
    mkdirSync(project);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
    packedPkg = join(project, "node_modules", "@cocalc", "project-host-bootstrap");
    files = extractInto(pkgTgz, packedPkg);
    extractInto(utilTgz, join(project, "node_modules", "@cocalc", "util"));
    // zod comes from the registry in real life; the workspace's copy is the same pinned version.
    symlinkSync(realpathSync(join(PACKAGE_DIR, "node_modules", "zod")), join(project, "node_modules", "zod"));
    console.log(`build ${built - started} ms, pack + extract ${Date.now() - built} ms`);
  });

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it("contains the asset, the schema and dist, and no tests or sources", () => {
    expect(files).toEqual(
      expect.arrayContaining([
        "package/package.json",
        "package/python/bootstrap.py",
        "package/schema/bootstrap-config.schema.json",
        "package/dist/index.js",
        "package/dist/asset.js",
      ]),
    );
    expect(files.filter((f) => /\/(test|tests|src|scripts|fixtures)\//.test(f))).toEqual([]);
    const manifest = JSON.parse(readFileSync(join(packedPkg, "package.json"), "utf8")) as { dependencies: Record<string, string> };
    expect(manifest.dependencies["@cocalc/util"]).not.toMatch(/^workspace:/);
  });

  it("ships exactly the bootstrap.py that a fresh build of the modules gives", () => {
    const fresh = join(work, "fresh-bootstrap.py");
    execFileSync("python3", [join(PACKAGE_DIR, "python", "build.py"), "--out", fresh]);
    expect(sha256(readFileSync(join(packedPkg, "python", "bootstrap.py")))).toBe(sha256(readFileSync(fresh)));
  });

  it("runs python3 <packed>/python/bootstrap.py --help", () => {
    const r = spawnSync("python3", [join(packedPkg, "python", "bootstrap.py"), "--help"], { encoding: "utf8" });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/usage: bootstrap\.py/);
    expect(r.stdout).toContain("--config");
  });

  it("resolves the exports subpaths from a consuming project, and imports the built package", () => {
    const probe = join(project, "probe.mjs");
    writeFileSync(
      probe,
      `import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const m = await import("@cocalc/project-host-bootstrap");
const stub = m.renderStub({ baseUrl: "http://127.0.0.1:1/x", bootstrapDir: "/home/u/cocalc-host/bootstrap", bootstrapUser: "u", token: "t".repeat(20) });
console.log(JSON.stringify({
  py: require.resolve("@cocalc/project-host-bootstrap/bootstrap.py"),
  schema: require.resolve("@cocalc/project-host-bootstrap/schema.json"),
  esmPy: import.meta.resolve("@cocalc/project-host-bootstrap/bootstrap.py"),
  assetPath: m.BOOTSTRAP_PY_PATH,
  sha: m.bootstrapPySha256(),
  stubHasSha: stub.includes(m.bootstrapPySha256()),
}));
`,
    );
    const out = JSON.parse(execFileSync(process.execPath, [probe], { cwd: project, encoding: "utf8" })) as Record<string, unknown>;
    const packedPy = join(packedPkg, "python", "bootstrap.py");
    expect(out.py).toBe(packedPy);
    expect(out.esmPy).toBe(`file://${packedPy}`);
    expect(out.schema).toBe(join(packedPkg, "schema", "bootstrap-config.schema.json"));
    expect(out.assetPath).toBe(packedPy);
    expect(out.sha).toBe(sha256(readFileSync(packedPy)));
    expect(out.stubHasSha).toBe(true);
    // The packed schema is the committed one.
    expect(readFileSync(out.schema as string, "utf8")).toBe(readFileSync(join(PACKAGE_DIR, "schema", "bootstrap-config.schema.json"), "utf8"));
  });
});
