/**
 * CoCalc's toolchain: its workspace requires Node.js >= 22, pins zod 3.25.76
 * for every package and is CommonJS. So: every source imports zod through
 * `zod/v4` (the same API in zod 3.25 and zod 4); a CommonJS consumer can
 * require() the built packages; and when scripts/test-node.sh or
 * scripts/test-zod3.sh run the suites, they really run on the Node.js and
 * zod they name (TEST_NODE_VERSION, TEST_ZOD_VERSION).
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";

const packages = fileURLToPath(new URL("../..", import.meta.url));
const pkgDir = (name: string) => join(packages, name);

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name === "node_modules" || e.name === "dist" || e.name.startsWith(".")) continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (/\.(c|m)?tsx?$/.test(e.name)) out.push(p);
  }
  return out;
}

describe("toolchain", () => {
  it("runs on the Node.js it was asked to (TEST_NODE_VERSION), and on 20 or newer", () => {
    const major = Number(process.versions.node.split(".")[0]);
    expect(major).toBeGreaterThanOrEqual(20);
    if (process.env.TEST_NODE_VERSION) expect(process.versions.node).toBe(process.env.TEST_NODE_VERSION);
  });

  it("the packages resolve the zod it was asked for (TEST_ZOD_VERSION), else the pinned one", () => {
    for (const pkg of ["project-host-bootstrap", "server"]) {
      const want =
        process.env.TEST_ZOD_VERSION ??
        (JSON.parse(readFileSync(join(pkgDir(pkg), "package.json"), "utf8")) as { dependencies: Record<string, string> }).dependencies.zod;
      const req = createRequire(join(pkgDir(pkg), "package.json"));
      const have = (JSON.parse(readFileSync(req.resolve("zod/package.json"), "utf8")) as { version: string }).version;
      expect(have, pkg).toBe(want);
    }
  });

  it("every source imports zod through zod/v4, never bare 'zod' or 'zod/v3'", () => {
    const offenders: string[] = [];
    let checked = 0;
    for (const pkg of readdirSync(packages)) {
      for (const file of sourceFiles(pkgDir(pkg))) {
        const text = readFileSync(file, "utf8");
        if (/from\s+["']zod["']|from\s+["']zod\/v3|import\(\s*["']zod["']\s*\)|require\(\s*["']zod["']\s*\)/.test(text)) offenders.push(file);
        if (/from\s+["']zod\/v4["']/.test(text)) checked++;
      }
    }
    expect(offenders).toEqual([]);
    expect(checked).toBeGreaterThan(0);
  });

  describe("a CommonJS consumer", () => {
    const dir = mkdtempSync(join(tmpdir(), "cjs-consumer-"));
    afterAll(() => rmSync(dir, { recursive: true, force: true }));

    it("can require() every package (built dist/) on this Node.js", () => {
      for (const [name, entry] of [
        ["util", "dist/index.js"],
        ["project-host-bootstrap", "dist/index.js"],
        ["server", "dist/cloud/bootstrap/index.js"],
      ] as const) {
        const built = join(pkgDir(name), entry);
        let builtAt = 0;
        try {
          builtAt = statSync(built).mtimeMs;
        } catch {
          throw new Error(`${built} is missing: build the packages first (pnpm -r build; scripts/setup.sh does it)`);
        }
        const newest = Math.max(...sourceFiles(join(pkgDir(name), name === "server" ? "cloud" : "src")).map((f) => statSync(f).mtimeMs));
        expect(builtAt, `${built} is older than its sources: run pnpm -r build`).toBeGreaterThanOrEqual(newest);
      }
      mkdirSync(join(dir, "node_modules", "@cocalc"), { recursive: true });
      for (const name of ["util", "project-host-bootstrap", "server"]) symlinkSync(pkgDir(name), join(dir, "node_modules", "@cocalc", name));
      const fixture = join(pkgDir("project-host-bootstrap"), "fixtures", "configs", "valid", "minimal-defaults.json");
      writeFileSync(
        join(dir, "consumer.cjs"),
        `"use strict";
const util = require("@cocalc/util");
const phb = require("@cocalc/project-host-bootstrap");
const server = require("@cocalc/server");
const { config } = require(${JSON.stringify(fixture)});
const checked = phb.checkConfig(config);
const bad = phb.checkConfig({ ...config, arch: "sparc" });
console.log(JSON.stringify({
  type: typeof module,
  util: Object.keys(util).length,
  phb: Object.keys(phb).length,
  server: Object.keys(server).length,
  startHub: typeof server.startHub,
  renderStub: typeof phb.renderStub,
  ok: checked.ok,
  badPaths: bad.ok ? [] : bad.issues.map((i) => i.path.join(".")),
  uuid: util.isValidUUID(config.host.id),
}));
`,
      );
      const r = spawnSync(process.execPath, [join(dir, "consumer.cjs")], { cwd: dir, encoding: "utf8", timeout: 60_000 });
      expect(r.status, r.stderr).toBe(0);
      // require(esm) is stable in Node.js 22.12+ (and 20.19+): no warning on stderr.
      expect(r.stderr).not.toMatch(/ExperimentalWarning|ERR_REQUIRE_ESM/);
      const out = JSON.parse(r.stdout) as Record<string, unknown>;
      expect(out).toMatchObject({ type: "object", startHub: "function", renderStub: "function", ok: true, badPaths: ["arch"], uuid: true });
      for (const k of ["util", "phb", "server"]) expect(out[k], k).toBeGreaterThan(0);
    });
  });
});
