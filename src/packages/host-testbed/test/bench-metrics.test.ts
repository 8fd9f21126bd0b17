/**
 * The benchmark's math on hand-made step timings: engine overhead, milestones, throughput from byte samples, medians, and the
 * report writer (JSON, Markdown, SVG) on a synthetic run. No host needed.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseCli } from "../bench/main.js";
import {
  aptCommands,
  criticalPath,
  downloadThroughput,
  type EngineRun,
  engineOverheadSeconds,
  engineRunFromEvents,
  extractionRate,
  extractions,
  logRecords,
  milestones,
  type StepTiming,
  stat,
  unionSeconds,
} from "../bench/metrics.js";
import { type BenchSettings, buildResult, markdown, waterfallSvg, writeResults } from "../bench/report.js";
import { type RunRecord, runRecord } from "../bench/runner.js";
import { Prng, TarWriter } from "../bench/workload.js";
import { TEST_APT_PACKAGES } from "../src/testbed.js";

function step(name: string, deps: string[], start: number, end: number, outcome = "changed"): StepTiming {
  return { name, deps, start_s: start, end_s: end, duration_s: end - start, outcome };
}

/** A diamond plus a side chain: a → (b: 5 s | c: 2 s) → d; a → e (9 s). */
const DIAMOND: StepTiming[] = [step("a", [], 0, 1), step("b", ["a"], 1, 6), step("c", ["a"], 1, 3), step("d", ["b", "c"], 6.5, 7.5), step("e", ["a"], 1, 10)];

function engine(steps: StepTiming[], wall: number): EngineRun {
  return { run_id: "r1", ok: true, status: "done", wall_s: wall, parallel: true, steps };
}

describe("critical path", () => {
  // Its cases are the shared vectors (project-host-bootstrap/fixtures/critical-path); here only that the bench uses it.
  it("is the package's one definition, on step timings", () => {
    expect(criticalPath(DIAMOND)).toEqual({ path: ["a", "e"], seconds: 10 });
  });
});

describe("overhead and milestones", () => {
  it("unions overlapping intervals once", () => {
    expect(
      unionSeconds([
        { start: 0, end: 2 },
        { start: 1, end: 3 },
        { start: 5, end: 6 },
        { start: 5.5, end: 5.7 },
      ]),
    ).toBeCloseTo(4);
    expect(unionSeconds([])).toBe(0);
  });

  it("engine overhead is the wall time no step covered", () => {
    // steps cover [0, 10]; the gap 6..6.5 is covered by e; wall 10.8 leaves 0.8 s
    expect(engineOverheadSeconds(engine(DIAMOND, 10.8))).toBeCloseTo(0.8);
    // serial: gaps between steps count
    const serial = [step("a", [], 0.2, 1), step("b", ["a"], 1.3, 2), step("c", ["b"], 2, 3)];
    expect(engineOverheadSeconds(engine(serial, 3.1))).toBeCloseTo(0.2 + 0.3 + 0.1);
  });

  it("milestones are when the last step of each group ended", () => {
    const steps = [step("apt", [], 0, 40), step("download_a", [], 0, 8), step("download_b", [], 0, 9.5), step("node", [], 0, 12)];
    expect(milestones(engine(steps, 41))).toEqual({ downloads_s: 9.5, apt_s: 40, node_s: 12 });
    expect(milestones(engine([step("x", [], 0, 1)], 1))).toEqual({ downloads_s: null, apt_s: null, node_s: null });
  });
});

describe("throughput from byte samples", () => {
  it("counts the window from the sample before bytes moved to the first with the final count", () => {
    const samples = [
      { t_ms: 0, bytes: 0 },
      { t_ms: 100, bytes: 0 },
      { t_ms: 200, bytes: 10e6 },
      { t_ms: 1100, bytes: 50e6 },
      { t_ms: 1200, bytes: 50e6 },
    ];
    const t = downloadThroughput(samples, 50e6)!;
    expect(t.bytes).toBe(50e6);
    expect(t.window_s).toBeCloseTo(1.0);
    expect(t.bytes_per_s).toBeCloseTo(50e6);
    expect(t.fraction_of_limit).toBeCloseTo(1.0);
    expect(downloadThroughput(samples, null)!.fraction_of_limit).toBeNull();
  });

  it("is null when nothing was downloaded", () => {
    expect(
      downloadThroughput(
        [
          { t_ms: 0, bytes: 7 },
          { t_ms: 50, bytes: 7 },
        ],
        1,
      ),
    ).toBeNull();
    expect(downloadThroughput([], 1)).toBeNull();
  });
});

describe("the run's events and the log", () => {
  const RUN = "run-00000001";
  const ev = (seq: number, ts: number, type: string, fields: Record<string, unknown> = {}) => JSON.stringify({ run_id: RUN, seq, ts, type, ...fields });
  const plan = [
    { name: "apt", deps: [], weight: 60 },
    { name: "download_project", deps: [], weight: 15 },
    { name: "install_project", deps: ["download_project"], weight: 5 },
  ];
  const spool = [
    ev(0, 100, "run_start", { version: "0.3.0", parallel: true, steps: plan }),
    ev(1, 100.1, "step_start", { step: "apt" }),
    ev(2, 100.1, "step_start", { step: "download_project" }),
    ev(3, 102, "step_end", { step: "apt", outcome: "unchanged", duration_s: 1.9 }),
    ev(4, 109, "step_end", { step: "download_project", outcome: "changed", duration_s: 8.9 }),
    ev(5, 109, "step_start", { step: "install_project" }),
    ev(6, 112, "step_end", { step: "install_project", outcome: "changed", duration_s: 3 }),
    ev(7, 112.5, "run_end", { ok: true, wall_s: 12.5 }),
  ];

  it("reads the run from its event spool, steps sorted by start", () => {
    const run = engineRunFromEvents(spool);
    expect(run).toMatchObject({ run_id: RUN, ok: true, status: "done", wall_s: 12.5, parallel: true });
    expect(run.steps.map((s) => s.name)).toEqual(["apt", "download_project", "install_project"]);
    expect(run.steps[2]).toEqual({ name: "install_project", deps: ["download_project"], start_s: 9, end_s: 12, duration_s: 3, outcome: "changed" });
    expect(engineRunFromEvents(spool.slice(0, 5)).status).toBe("interrupted");
    expect(() => engineRunFromEvents([])).toThrow(/run_start/);
  });

  it("takes this run's records, extraction times and apt commands from the log", () => {
    const log = [
      JSON.stringify({ run_id: "old", message: "installed project 0.9 in 99.0s" }),
      JSON.stringify({ run_id: RUN, step: "install_project", message: "installed project 1.0.0 in 2.0s" }),
      JSON.stringify({ run_id: RUN, event: "command", argv: ["sudo", "apt-get", "-y", "update"], duration_s: 4.5 }),
      JSON.stringify({ run_id: RUN, event: "command", argv: ["apt-get", "-y", "install", "vim"], duration_s: 20 }),
      `{"run_id": "${RUN}", "cut off by a ki`,
    ].join("\n");
    const records = logRecords(log, RUN);
    expect(records).toHaveLength(3);
    const ex = extractions(engineRunFromEvents(spool), records, { project: 100e6, tools: 5e6 });
    expect(ex).toEqual([{ artifact: "project", archive_bytes: 100e6, seconds: 2, mb_per_s: 50 }]);
    expect(extractionRate(ex)).toBeCloseTo(50);
    expect(aptCommands(records)).toEqual({ update_s: 4.5, install_s: 20 });
    // Without the log line, the install step's whole duration counts.
    expect(extractions(engineRunFromEvents(spool), [], { project: 30e6 })[0]!.seconds).toBe(3);
  });
});

describe("statistics", () => {
  it("median, min, max and spread; nulls ignored", () => {
    expect(stat([3, 1, 2])).toEqual({ median: 2, min: 1, max: 3, n: 3, spread: 1 });
    expect(stat([4, null, 2])).toMatchObject({ median: 3, n: 2 });
    expect(stat([null, undefined])).toBeNull();
  });
});

function syntheticRun(kind: RunRecord["kind"], iteration: number, wallMs: number): RunRecord {
  const steps = DIAMOND.map((s) => ({ ...s, outcome: kind === "warm" ? "unchanged" : "changed" }));
  return runRecord(kind, iteration, "h", { code: 0, wallMs, stdout: "", stderr: "" }, engine(steps, wallMs / 1000 - 0.3), [], {
    samples: [
      { t_ms: 0, bytes: 0 },
      { t_ms: 1000, bytes: 45e6 },
    ],
    limit: 50e6,
    archiveBytes: {},
    peakKb: 40 * 1024,
    noise: { loadavg_1m: 1.5, cpu_probe_ms: 80, disk_probe_ms: 300 },
  });
}

describe("report", () => {
  const settings: BenchSettings = {
    command: "pnpm bench --runs 2",
    runs: 2,
    scale: 1,
    smoke: false,
    bandwidth_mb_per_s: 50,
    latency_ms: 0,
    machine: { cpus: 2, kernel: "6.1", node: "v20" },
  };
  const runs = [
    syntheticRun("cold_parallel", 1, 11_000),
    syntheticRun("cold_serial", 1, 22_000),
    syntheticRun("cold_parallel", 2, 12_000),
    syntheticRun("cold_serial", 2, 30_000),
    syntheticRun("warm", 1, 1_200),
  ];
  const result = buildResult(
    { workload: { scale: 1, bundles: [], node: { version: "20.0.0", size_bytes: 1e6 }, apt_packages: ["vim"] }, runs, started_at: "t0", finished_at: "t1" },
    settings,
  );

  it("summarizes each kind and pairs serial with parallel by iteration", () => {
    expect(result.summary.cold_parallel.wall_s).toMatchObject({ median: 11.5, min: 11, max: 12, n: 2 });
    expect(result.headline.serial_over_parallel).toEqual({ median: (2 + 2.5) / 2, min: 2, max: 2.5 });
    expect(result.headline.download_fraction?.median).toBeCloseTo(0.9);
    expect(result.headline.warm_wall_s?.median).toBeCloseTo(1.2);
    expect(result.summary.version_change.wall_s).toBeNull();
  });

  it("writes result.json, a Markdown table and the waterfalls", () => {
    const md = markdown(result);
    expect(md).toContain("| wall ÷ critical path, cold parallel |");
    expect(md).toContain("11.5 (11.0–12.0)");
    expect(md).not.toContain("project version changed"); // no such runs: no column
    const svg = waterfallSvg(runs[0]!, "cold <parallel>");
    expect(svg).toContain("cold &lt;parallel&gt;");
    expect(svg.match(/<rect [^>]*fill="#4c78a8"/g)).toHaveLength(DIAMOND.length);
    const dir = mkdtempSync(join(tmpdir(), "bench-report-"));
    try {
      writeResults(dir, result);
      expect(JSON.parse(readFileSync(join(dir, "result.json"), "utf8")).headline.serial_over_parallel.min).toBe(2);
      expect(readFileSync(join(dir, "result.md"), "utf8")).toBe(md);
      expect(readFileSync(join(dir, "waterfall-cold-parallel.svg"), "utf8")).toMatch(/^<svg/);
      expect(readFileSync(join(dir, "waterfall-cold-serial.svg"), "utf8")).toMatch(/^<svg/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("command line", () => {
  const now = new Date("2026-01-02T03:04:05.678Z");
  it("has the issue's defaults and a smoke mode", () => {
    const d = parseCli([], "/repo", now);
    expect(d).toMatchObject({ runs: 3, scale: 1, bandwidth: 50, latency: 0, smoke: false, out: "/repo/results/bench-20260102T030405Z" });
    expect(d !== "help" && d.apt).toContain("podman");
    const s = parseCli(["--smoke"], "/repo", now);
    expect(s).toMatchObject({ runs: 1, scale: 0.01, smoke: true, apt: TEST_APT_PACKAGES });
    expect(parseCli(["--smoke", "--runs", "2", "--kinds", "cold_parallel,warm"], "/repo", now)).toMatchObject({ runs: 2, kinds: ["cold_parallel", "warm"] });
  });
  it("refuses bad values", () => {
    expect(() => parseCli(["--runs", "0"], "/r")).toThrow(/--runs/);
    expect(() => parseCli(["--kinds", "hot"], "/r")).toThrow(/unknown hot/);
    expect(() => parseCli(["--apt", "all"], "/r")).toThrow(/--apt/);
    expect(() => parseCli(["--frobnicate"], "/r")).toThrow();
  });
});

describe("workload content", () => {
  it("writes tar headers tar(1) accepts (checksum, long names)", async () => {
    const chunks: Buffer[] = [];
    const tar = new TarWriter(async (c) => void chunks.push(c));
    await tar.dir("top/");
    await tar.file(`top/${"d".repeat(120)}/f.js`, Buffer.from("x\n"), 0o644);
    await tar.end();
    const header = chunks[1]!;
    const sum = [...header].reduce((a, b, i) => a + (i >= 148 && i < 156 ? 32 : b), 0);
    expect(parseInt(header.toString("latin1", 148, 155), 8)).toBe(sum);
    expect(header.toString("latin1", 345, 345 + 124).replace(/\0+$/, "")).toBe(`top/${"d".repeat(120)}`);
    // and the real tar(1) reads it back
    const dir = mkdtempSync(join(tmpdir(), "bench-tar-"));
    try {
      writeFileSync(join(dir, "t.tar"), Buffer.concat(chunks));
      const listed = execFileSync("tar", ["-tvf", join(dir, "t.tar")], { encoding: "utf8" });
      expect(listed).toMatch(new RegExp(`-rw-r--r-- root/root +2 2024-01-01 00:00 top/${"d".repeat(120)}/f.js`));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  it("is deterministic for a seed", () => {
    const a = new Prng("s");
    const b = new Prng("s");
    expect([a.next(), a.next()]).toEqual([b.next(), b.next()]);
    for (let i = 0; i < 1000; i++) expect(a.skewed(10)).toBeLessThan(10);
  });
});
