/**
 * `pnpm bench --smoke`, run as the CLI runs it, so the benchmark cannot rot:
 * a tiny workload (scale 0.01, the tests' apt list), one run of each kind on
 * real throwaway hosts (it reuses the end-to-end suite's cached rootfs),
 * then the results folder is checked: the files exist and every figure is a
 * sane number.
 *
 * Needs root (throwaway hosts). Without root it fails with the reason;
 * SKIP_E2E=1 skips it, like the end-to-end suite, and says why.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { bench } from "../bench/main.js";
import type { BenchResult } from "../bench/report.js";
import type { RunRecord } from "../bench/runner.js";
import { whyNotSupported } from "../src/machine.js";

const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[bench-smoke] ${line}\n`);
if (skip) log(`skipping the benchmark smoke run: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);

const repoRoot = fileURLToPath(new URL("../../../..", import.meta.url));
const out = mkdtempSync(join(tmpdir(), "bench-smoke-"));
afterAll(() => rmSync(out, { recursive: true, force: true }));

function one(result: BenchResult, kind: RunRecord["kind"]): RunRecord {
  const runs = result.runs.filter((r) => r.kind === kind);
  expect(runs, kind).toHaveLength(1);
  return runs[0]!;
}

describe.skipIf(skip)("pnpm bench --smoke", () => {
  it("runs every kind once and writes sane figures", async () => {
    if (why) throw new Error(`the benchmark smoke run needs throwaway hosts: ${why} (SKIP_E2E=1 skips it)`);
    const dir = join(out, "results");
    const done = await bench(["--smoke", "--out", dir], { repoRoot, log });
    expect(done?.dir).toBe(dir);
    for (const f of ["result.json", "result.md", "waterfall-cold-parallel.svg", "waterfall-cold-serial.svg"]) {
      expect(existsSync(join(dir, f)), f).toBe(true);
    }
    const result = JSON.parse(readFileSync(join(dir, "result.json"), "utf8")) as BenchResult;
    expect(result.settings).toMatchObject({ smoke: true, runs: 1, scale: 0.01, bandwidth_mb_per_s: 50 });
    expect(readFileSync(join(dir, "result.md"), "utf8")).toBe(done!.markdown);
    expect(done!.markdown).toContain("| wall ÷ critical path, cold parallel |");
    expect(readFileSync(join(dir, "waterfall-cold-parallel.svg"), "utf8")).toContain("download_project");

    const cold = one(result, "cold_parallel");
    const serial = one(result, "cold_serial");
    for (const r of [cold, serial]) {
      expect(r.ok).toBe(true);
      expect(r.wall_s).toBeGreaterThan(0.5);
      expect(r.wall_s).toBeLessThan(600);
      expect(r.engine_wall_s).toBeLessThanOrEqual(r.wall_s);
      expect(r.critical_path_s).toBeGreaterThan(0);
      // No scheduler beats the critical path; a slow one stays within the sum of the steps.
      expect(r.wall_over_critical!).toBeGreaterThanOrEqual(0.99);
      expect(r.engine_wall_s).toBeLessThanOrEqual(r.steps.reduce((a, s) => a + s.duration_s, 0) + 5);
      expect(r.engine_overhead_s).toBeGreaterThanOrEqual(0);
      expect(r.engine_overhead_s).toBeLessThan(r.engine_wall_s);
      expect(r.milestones.apt_s).toBeGreaterThan(0);
      expect(r.milestones.node_s).toBeGreaterThan(0);
      expect(r.milestones.downloads_s).toBeGreaterThan(0);
      // the bundles and node's tarball came from the artifact server, at most at the limit (plus bursts)
      const sizes = result.workload.bundles.reduce((a, b) => a + b.size_bytes, 0) + result.workload.node.size_bytes;
      expect(r.download!.bytes).toBeGreaterThanOrEqual(sizes);
      expect(r.download!.fraction_of_limit!).toBeGreaterThan(0.01);
      expect(r.download!.fraction_of_limit!).toBeLessThan(1.3);
      expect(r.extraction_mb_per_s!).toBeGreaterThan(0);
      expect(r.peak_rss_mb!).toBeGreaterThan(5);
      expect(r.peak_rss_mb!).toBeLessThan(2000);
      expect(r.changed_steps).toEqual(expect.arrayContaining(["apt", "node", "install_project", "service"]));
    }
    expect(result.headline.serial_over_parallel!.median).toBeGreaterThan(0.8);

    const warm = one(result, "warm");
    expect(warm.changed_steps).toEqual([]);
    expect(warm.download?.bytes ?? 0).toBe(0);
    expect(warm.wall_s).toBeLessThan(cold.wall_s);
    expect(cold.service_restarted).toBe(true);
    expect(warm.service_restarted).toBe(false);

    const bumped = one(result, "version_change");
    expect(bumped.changed_steps).toEqual(expect.arrayContaining(["download_project", "install_project"]));
    expect(bumped.changed_steps).not.toContain("download_tools");
    expect(bumped.changed_steps).not.toContain("apt");
    // only the project bundle changed: the daemon (project-host) keeps running
    expect(bumped.service_restarted).toBe(false);
    const project = result.workload.bundles.find((b) => b.artifact === "project")!;
    expect(bumped.download!.bytes).toBeGreaterThanOrEqual(project.size_bytes);
    expect(bumped.download!.bytes).toBeLessThan(project.size_bytes + 64 * 1024);
  });
});
