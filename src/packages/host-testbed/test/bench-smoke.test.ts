/**
 * `pnpm bench --smoke`, run as the CLI runs it, so the benchmark cannot rot:
 * a tiny workload (scale 0.01, the tests' apt list), one block (50 MB/s,
 * hosts on journaled ext4 images), the legacy reference run with its
 * isolated costs, then for archives and for images a cold parallel run, a
 * warm re-run and a one-bundle upgrade, on real throwaway hosts (it reuses
 * the end-to-end suite's cached rootfs); then the results folder is checked:
 * the files exist and every figure is a sane number.
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

function one(result: BenchResult, kind: RunRecord["kind"], format: RunRecord["format"] = "archive"): RunRecord {
  const runs = result.runs.filter((r) => r.kind === kind && r.format === format);
  expect(runs, `${format} ${kind}`).toHaveLength(1);
  return runs[0]!;
}

describe.skipIf(skip)("pnpm bench --smoke", () => {
  it("runs the legacy reference and every kind once per format, and writes sane figures", async () => {
    if (why) throw new Error(`the benchmark smoke run needs throwaway hosts: ${why} (SKIP_E2E=1 skips it)`);
    const dir = join(out, "results");
    const done = await bench(["--smoke", "--out", dir], { repoRoot, log });
    expect(done?.dir).toBe(dir);
    for (const f of ["result.json", "result.md", "waterfall-cold-parallel.svg", "waterfall-cold-parallel-images.svg"]) {
      expect(existsSync(join(dir, f)), f).toBe(true);
    }
    const result = JSON.parse(readFileSync(join(dir, "result.json"), "utf8")) as BenchResult;
    expect(result.settings).toMatchObject({ smoke: true, runs: 1, scale: 0.01, blocks: [{ bandwidthMBps: 50, fs: "ext4" }] });
    expect(readFileSync(join(dir, "result.md"), "utf8")).toBe(done!.markdown);
    expect(done!.markdown).toContain("| run | wall (s) | lower bound (s) | wall ÷ lower bound | legacy ÷ new |");
    expect(readFileSync(join(dir, "waterfall-cold-parallel.svg"), "utf8")).toContain("download_project");
    const sizes = (format: string) =>
      result.workload.bundles.reduce((a, b) => a + (format === "image" ? b.image_bytes! : b.size_bytes), 0) + result.workload.node.size_bytes;

    // the legacy host: the old flow ran, and every isolated piece the bounds need was measured
    const legacy = one(result, "legacy");
    expect(legacy.wall_s).toBeGreaterThan(1);
    expect(result.isolated).toHaveLength(1);
    const pieces = result.isolated[0]!.pieces.map((p) => p.name);
    for (const a of ["project_host", "project", "tools"]) {
      expect(pieces).toEqual(expect.arrayContaining([`download_${a}`, `verify_${a}`, `decompress_${a}`, `write_${a}`, `image_mount_${a}`]));
    }
    expect(pieces).toEqual(expect.arrayContaining(["apt_update", "apt_install", "download_node", "decompress_node", "write_node"]));
    for (const p of result.isolated[0]!.pieces) expect(p.wall_s >= 0 && p.user_s >= 0 && p.sys_s >= 0, p.name).toBe(true);
    // the minima the bounds rest on: one block, every piece, and no download faster than the link
    expect(result.isolated_min).toHaveLength(1);
    expect(result.isolated_min[0]!.pieces.map((p) => p.name).sort()).toEqual([...pieces].sort());
    expect(result.isolated_min[0]!.warnings).toEqual([]);
    // the old flow's apt install does real work
    expect(result.isolated[0]!.pieces.find((p) => p.name === "apt_install")!.user_s).toBeGreaterThan(0.1);

    for (const format of ["archive", "image"] as const) {
      const cold = one(result, "cold_parallel", format);
      expect(cold.ok).toBe(true);
      expect(cold.wall_s).toBeGreaterThan(0.5);
      expect(cold.wall_s).toBeLessThan(600);
      expect(cold.engine_wall_s).toBeLessThanOrEqual(cold.wall_s);
      expect(cold.critical_path_s).toBeGreaterThan(0);
      expect(cold.wall_over_critical!).toBeGreaterThanOrEqual(0.99);
      expect(cold.engine_overhead_s).toBeGreaterThanOrEqual(0);
      expect(cold.milestones.apt_s).toBeGreaterThan(0);
      expect(cold.milestones.node_s).toBeGreaterThan(0);
      // the bound rests on the legacy host's measurements; the run is measured against it
      expect(cold.lower_bound!.seconds).toBeGreaterThan(0);
      // what the run must download: its bundles, Node's tarball and what apt fetched through the link (when known)
      expect(cold.lower_bound!.bytes).toBe(sizes(format) + (cold.apt_bytes ?? 0));
      // one iteration: the minima over the block's iterations are that iteration's own measurements
      expect(cold.lower_bound_iteration).toEqual(cold.lower_bound);
      expect(cold.wall_over_bound!).toBeGreaterThan(0.3);
      expect(cold.wall_over_bound!).toBeLessThan(100);
      // CPU-seconds per step come from the step_end events: apt's children did work
      expect(cold.steps_cpu_s!).toBeGreaterThan(0);
      const apt = cold.step_cpu.apt!;
      expect(apt.children_user_s + apt.children_sys_s).toBeGreaterThan(0.1);
      // the machine's CPU-seconds, ours and not ours
      expect(cold.cpu.machine_cpu_s).toBeGreaterThan(0);
      expect(cold.cpu.ours_cpu_s).toBeGreaterThan(0);
      expect(cold.cpu.not_ours_fraction).toBeGreaterThanOrEqual(0);
      expect(cold.cpu.not_ours_fraction).toBeLessThanOrEqual(1);
      expect(cold.cpu.cores_busy).toBeGreaterThan(0);
      expect(cold.cpu.cores_busy).toBeLessThanOrEqual(1.05);
      // the bundles and node's tarball came from the artifact server, at most at the limit (plus bursts)
      expect(cold.download!.bytes).toBeGreaterThanOrEqual(sizes(format));
      expect(cold.download!.fraction_of_limit!).toBeGreaterThan(0.01);
      expect(cold.download!.fraction_of_limit!).toBeLessThan(1.3);
      expect(cold.peak_rss_mb!).toBeGreaterThan(5);
      expect(cold.changed_steps).toEqual(expect.arrayContaining(["apt", "node", "install_project", "service"]));
      expect(cold.service_restarted).toBe(true);
      expect(result.headline[0]!.legacy_over_new[format]!.median).toBeGreaterThan(0);

      const warm = one(result, "warm", format);
      expect(warm.changed_steps).toEqual([]);
      expect(warm.download?.bytes ?? 0).toBe(0);
      expect(warm.wall_s).toBeLessThan(cold.wall_s);
      expect(warm.service_restarted).toBe(false);
      expect(warm.wall_over_bound).toBeNull(); // nothing to do: no bound to divide by

      const bumped = one(result, "version_change", format);
      expect(bumped.changed_steps).toEqual(expect.arrayContaining(["download_project", "install_project"]));
      expect(bumped.changed_steps).not.toContain("download_tools");
      expect(bumped.changed_steps).not.toContain("apt");
      // only the project bundle changed: the daemon (project-host) keeps running
      expect(bumped.service_restarted).toBe(false);
      const project = result.workload.bundles.find((b) => b.artifact === "project")!;
      const bytes = format === "image" ? project.image_bytes! : project.size_bytes;
      expect(bumped.download!.bytes).toBeGreaterThanOrEqual(bytes);
      expect(bumped.download!.bytes).toBeLessThan(bytes + 64 * 1024);
      expect(bumped.lower_bound!.bytes).toBe(bytes + (bumped.apt_bytes ?? 0));
    }
  });
});
