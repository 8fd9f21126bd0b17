/**
 * The benchmark's math on hand-made step timings: engine overhead, milestones, throughput from byte samples, medians, the
 * resource lower bound from isolated costs, the machine-noise accounting (/proc/stat, /proc/<pid>/stat), CPU-seconds per step
 * from the events, and the report writer (JSON, Markdown, SVG) on synthetic runs. No host needed.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseCli } from "../bench/main.js";
import {
  aptCommands,
  chains,
  cpuTotal,
  criticalPath,
  downloadThroughput,
  type EngineRun,
  engineOverheadSeconds,
  engineRunFromEvents,
  extractionRate,
  extractions,
  logRecords,
  lowerBound,
  milestones,
  noise,
  overBound,
  type Piece,
  parseProcStat,
  procStatTicks,
  type StepTiming,
  stat,
  stepCpu,
  unionSeconds,
} from "../bench/metrics.js";
import { type BenchSettings, buildResult, markdown, waterfallSvg, writeResults } from "../bench/report.js";
import { type Block, boundFor, type IsolatedCosts, type RunRecord, runRecord } from "../bench/runner.js";
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

// --- the resource lower bound --------------------------------------------------------------

function piece(name: string, group: string, wall: number, user: number, sys = 0, bytes: number | null = null): Piece {
  return { name, group, wall_s: wall, user_s: user, sys_s: sys, bytes };
}

/** Isolated costs as the legacy host measures them (one bundle "project", Node, apt, and the image pieces). */
const PIECES: Piece[] = [
  piece("apt_update", "apt", 3, 1, 0.5),
  piece("apt_install", "apt", 17, 6, 4),
  piece("download_project", "project", 5, 0.5, 0.5, 250e6),
  piece("verify_project", "project", 1, 0.9, 0.1),
  // xz and tar in one pipe: one wall time, two CPU figures
  piece("decompress_project", "project", 18, 11, 1),
  piece("write_project", "project", 18, 2, 15),
  piece("download_node", "node", 0.6, 0.1, 0.1, 30e6),
  piece("download_node_sums", "node", 0.1, 0, 0),
  piece("verify_node", "node", 0.1, 0.1, 0),
  piece("decompress_node", "node", 2, 1.5, 0),
  piece("write_node", "node", 2, 0.1, 0.4),
  piece("image_download_project", "image_project", 5.2, 0.5, 0.5, 260e6),
  piece("image_verify_project", "image_project", 1.1, 1, 0.1),
  piece("image_mount_project", "image_project", 0.05, 0, 0.02),
];

describe("resource lower bound", () => {
  it("chains: apt, Node and each bundle; xz | tar count once in wall time, both in CPU", () => {
    const c = chains(PIECES, "archive", ["project"], true);
    expect(c.map((x) => x.map((s) => s.name))).toEqual([
      ["apt_update", "apt_install"],
      ["download_node", "verify_node", "install_node"],
      ["download_project", "verify_project", "install_project"],
    ]);
    const install = c[2]![2]!;
    expect(install.wall_s).toBe(18);
    expect(install.cpu_s).toBeCloseTo(11 + 1 + 2 + 15);
    // Node's download stage includes its SHASUMS256.txt
    expect(c[1]![0]!.wall_s).toBe(0.6);
    expect(c[1]![0]!.cpu_s).toBeCloseTo(0.2);
    // images: download → verify → mount
    const img = chains(PIECES, "image", ["project"], false);
    expect(img).toEqual([
      [
        { name: "download_project", wall_s: 5.2, cpu_s: 1 },
        { name: "verify_project", wall_s: 1.1, cpu_s: 1.1 },
        { name: "install_project", wall_s: 0.05, cpu_s: 0.02 },
      ],
    ]);
  });

  it("refuses to bound with a missing piece rather than bound low", () => {
    expect(() =>
      chains(
        PIECES.filter((p) => p.name !== "write_project"),
        "archive",
        ["project"],
        false,
      ),
    ).toThrow(/lack a piece/);
    expect(() => chains(PIECES, "image", ["tools"], false)).toThrow(/lack a piece/);
  });

  it("is the largest of bytes ÷ bandwidth, the longest chain and CPU ÷ cores, and says which", () => {
    const c = chains(PIECES, "archive", ["project"], true);
    // chain: 5 + 1 + 18 = 24 s; CPU: 1.5 + 10 + 1 + 1 + 29 + 0.2 + 0.1 + 2 = 44.8 → 22.4 s on 2 cores; link: 280 MB at 50 MB/s = 5.6 s
    const lb = lowerBound(c, 280e6, 50e6, 2);
    expect(lb.binding).toBe("chain");
    expect(lb.seconds).toBeCloseTo(24);
    expect(lb.chain).toEqual(["download_project", "verify_project", "install_project"]);
    expect(lb.cpu_s).toBeCloseTo(44.8);
    expect(lb.cpu_bound_s).toBeCloseTo(22.4);
    expect(lb.bandwidth_s).toBeCloseTo(5.6);
    // one core: the CPU sets it
    expect(lowerBound(c, 280e6, 50e6, 1)).toMatchObject({ binding: "cpu", seconds: 44.8 });
    // a slow link sets it
    expect(lowerBound(c, 280e6, 5e6, 2)).toMatchObject({ binding: "bandwidth", seconds: 56 });
    // no limit: no bandwidth term
    expect(lowerBound(c, 280e6, null, 2).bandwidth_s).toBe(0);
    // no work: 0, and wall ÷ bound is undefined rather than infinite
    const none = lowerBound([], 0, 50e6, 2);
    expect(none).toMatchObject({ seconds: 0, binding: "none" });
    expect(overBound(0.4, none)).toBeNull();
    expect(overBound(36, lb)).toBeCloseTo(1.5);
    expect(() => lowerBound(c, 1, 1, 0)).toThrow(/cores/);
  });

  it("never exceeds a schedule that runs everything in sequence, nor falls below any one term (random cases)", () => {
    const rng = new Prng("lower-bound");
    const x = (max: number) => (rng.next() / 2 ** 32) * max;
    for (let n = 0; n < 500; n++) {
      const stages = Array.from({ length: rng.next() % 6 }, () => Array.from({ length: rng.next() % 5 }, () => ({ name: "s", wall_s: x(100), cpu_s: x(100) })));
      const bytes = x(1e9);
      const cores = 1 + (rng.next() % 8);
      const lb = lowerBound(stages, bytes, 50e6, cores);
      const serialWall = stages.flat().reduce((a, s) => a + Math.max(s.wall_s, s.cpu_s), 0) + bytes / 50e6;
      expect(lb.seconds).toBeLessThanOrEqual(serialWall + 1e-9);
      expect(lb.seconds).toBeGreaterThanOrEqual(Math.max(lb.bandwidth_s, lb.chain_s, lb.cpu_bound_s) - 1e-9);
      expect(lb.seconds).toBeGreaterThanOrEqual(0);
    }
  });

  it("bounds each kind of run by what it has to do", () => {
    const ctx = {
      block: { bandwidthMBps: 50, fs: "root" } as Block,
      cores: 2,
      archiveBytes: { project: 250e6 },
      images: { project: { path: "/x.sqfs", sha256: "0".repeat(64), size_bytes: 260e6 } },
      nodeBytes: 30e6,
    };
    const cold = boundFor(ctx, "cold_parallel", "archive", PIECES);
    expect(cold.bytes).toBe(280e6);
    expect(boundFor(ctx, "cold_serial", "archive", PIECES)).toEqual(cold);
    expect(boundFor(ctx, "legacy", "archive", PIECES)).toEqual(cold);
    const coldImage = boundFor(ctx, "cold_parallel", "image", PIECES);
    expect(coldImage.bytes).toBe(290e6);
    // with images the chain is apt's: 20 s
    expect(coldImage).toMatchObject({ binding: "chain", seconds: 20, chain: ["apt_update", "apt_install"] });
    // an upgrade of one bundle: only its own download and install
    const up = boundFor(ctx, "version_change", "archive", PIECES);
    expect(up).toMatchObject({ bytes: 250e6, seconds: 24, binding: "chain" });
    expect(boundFor(ctx, "warm", "image", PIECES).seconds).toBe(0);
  });
});

// --- noise and CPU accounting ----------------------------------------------------------------

describe("machine noise", () => {
  it("reads busy and total ticks from /proc/stat (idle and iowait are not busy)", () => {
    const text = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1 2 3\n";
    expect(parseProcStat(text)).toEqual({ busy: 100 + 5 + 50 + 3 + 2 + 1, total: 161 + 1000 + 20 });
    expect(() => parseProcStat("intr 1\n")).toThrow(/cpu line/);
    // the real one parses, and the machine has been busy at some point
    const real = parseProcStat(readFileSync("/proc/stat", "utf8"));
    expect(real.busy).toBeGreaterThan(0);
    expect(real.total).toBeGreaterThan(real.busy);
  });

  it("counts a process's own and reaped children's ticks, whatever its name holds", () => {
    // fields 14..17: utime stime cutime cstime
    const line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 200 0 0 7 3 11 13 20 0 1 0 100 0 0";
    expect(procStatTicks(line)).toBe(7 + 3 + 11 + 13);
    expect(procStatTicks(readFileSync("/proc/self/stat", "utf8"))).toBeGreaterThan(0);
  });

  it("splits the machine's CPU-seconds into ours and not ours, and the cores' busy share", () => {
    const n = noise({ busy: 1000, total: 5000 }, { busy: 3000, total: 9000 }, 15, 10, 2);
    expect(n).toEqual({ wall_s: 10, machine_cpu_s: 20, ours_cpu_s: 15, not_ours_cpu_s: 5, not_ours_fraction: 0.25, cores_busy: 1 });
    // our accounting can overshoot the machine's by a tick: never a negative share
    expect(noise({ busy: 0, total: 0 }, { busy: 100, total: 200 }, 1.02, 1, 2).not_ours_cpu_s).toBe(0);
  });

  it("reads each step's CPU-seconds from the step_end events", () => {
    const cpu = { user_s: 0.5, sys_s: 0.25, children_user_s: 10, children_sys_s: 14 };
    const lines = [
      JSON.stringify({ type: "step_start", step: "install_project" }),
      JSON.stringify({ type: "step_end", step: "install_project", cpu }),
      JSON.stringify({ type: "step_end", step: "blocked_one", cpu: null }),
      '{"type": "step_end", "step": "torn',
    ];
    expect(stepCpu(lines)).toEqual({ install_project: cpu });
    expect(cpuTotal(cpu)).toBeCloseTo(24.75);
  });
});

function syntheticRun(kind: RunRecord["kind"], iteration: number, wallMs: number, format: RunRecord["format"] = "archive", bw = 50): RunRecord {
  const steps = DIAMOND.map((s) => ({ ...s, outcome: kind === "warm" ? "unchanged" : "changed" }));
  const r = runRecord(kind, iteration, "h", { code: 0, wallMs, stdout: "", stderr: "" }, engine(steps, wallMs / 1000 - 0.3), [], {
    samples: [
      { t_ms: 0, bytes: 0 },
      { t_ms: 1000, bytes: 45e6 },
    ],
    limit: 50e6,
    archiveBytes: {},
    peakKb: 40 * 1024,
    noise: { loadavg_1m: 1.5, cpu_probe_ms: 80, disk_probe_ms: 300 },
    cpu: noise({ busy: 0, total: 0 }, { busy: 1500, total: 2000 }, 12, wallMs / 1000, 2),
    stepCpu: { a: { user_s: 1, sys_s: 0, children_user_s: 2, children_sys_s: 3 } },
    format,
    block: { bandwidthMBps: bw, fs: "root" },
  });
  r.lower_bound = kind === "warm" ? lowerBound([], 0, 50e6, 2) : lowerBound([[{ name: "x", wall_s: 10, cpu_s: 1 }]], 0, 50e6, 2);
  r.wall_over_bound = overBound(r.wall_s, r.lower_bound);
  return r;
}

describe("report", () => {
  const settings: BenchSettings = {
    command: "pnpm bench --runs 2",
    runs: 2,
    scale: 1,
    smoke: false,
    blocks: [{ bandwidthMBps: 50, fs: "root" }],
    formats: ["archive", "image"],
    kinds: ["legacy", "cold_parallel", "cold_serial", "warm"],
    latency_ms: 0,
    machine: { cpus: 2, kernel: "6.1", node: "v20" },
  };
  const runs = [
    syntheticRun("legacy", 1, 44_000),
    syntheticRun("cold_parallel", 1, 11_000),
    syntheticRun("cold_serial", 1, 22_000),
    syntheticRun("cold_parallel", 1, 10_000, "image"),
    syntheticRun("legacy", 2, 48_000),
    syntheticRun("cold_parallel", 2, 12_000),
    syntheticRun("cold_serial", 2, 30_000),
    syntheticRun("cold_parallel", 2, 12_000, "image"),
    syntheticRun("warm", 1, 1_200),
    syntheticRun("cold_parallel", 1, 9_000, "archive", 200),
  ];
  const isolated: IsolatedCosts[] = [{ bandwidth_mb_per_s: 50, fs: "root", iteration: 1, legacy_wall_s: 44, pieces: PIECES }];
  const result = buildResult(
    {
      workload: { scale: 1, bundles: [], node: { version: "20.0.0", size_bytes: 1e6 }, apt_packages: ["vim"] },
      runs,
      isolated,
      cores: 2,
      started_at: "t0",
      finished_at: "t1",
    },
    settings,
  );

  it("summarizes each block and kind, pairs legacy and serial with parallel by iteration", () => {
    expect(Object.keys(result.summary)).toEqual(["50:root", "200:root"]);
    expect(result.summary["50:root"]!["archive:cold_parallel"]!.wall_s).toMatchObject({ median: 11.5, min: 11, max: 12, n: 2 });
    expect(result.summary["50:root"]!["archive:cold_parallel"]!.wall_over_bound).toMatchObject({ median: 1.15, min: 1.1, max: 1.2 });
    const h = result.headline.find((x) => x.block === "50:root")!;
    expect(h.serial_over_parallel.archive).toMatchObject({ median: (2 + 2.5) / 2, min: 2, max: 2.5 });
    expect(h.legacy_over_new.archive).toMatchObject({ min: 4, max: 4 });
    expect(h.legacy_over_new.image).toMatchObject({ min: 4, max: 4.4 });
    expect(result.summary["50:root"]!["archive:warm"]!.wall_over_bound).toBeNull();
    expect(result.summary["50:root"]!["archive:cold_parallel"]!.not_ours_fraction!.median).toBeGreaterThan(0);
    // the other block keeps its own figures
    expect(result.summary["200:root"]!["archive:cold_parallel"]!.wall_s!.median).toBe(9);
    expect(result.headline.find((x) => x.block === "200:root")!.legacy_over_new.archive).toBeNull();
  });

  it("writes result.json, a Markdown report per block and the waterfalls", () => {
    const md = markdown(result);
    expect(md).toContain("## 50 MB/s, hosts on this machine's root fs");
    expect(md).toContain("## 200 MB/s, hosts on this machine's root fs");
    expect(md).toContain("| archives: cold, parallel | 11.5 (11.0–12.0) |");
    expect(md).toMatch(/\| images: cold, parallel \| .*\| 4\.20 \(4\.00–4\.40\) ✓ \(aim ≥ 2\) \|/);
    expect(md).toContain("| decompress_project | 18.0 | 12.0 | 1.0 |");
    expect(md).not.toContain("one-bundle upgrade"); // no such runs: no row
    const svg = waterfallSvg(runs[1]!, "cold <parallel>");
    expect(svg).toContain("cold &lt;parallel&gt;");
    expect(svg.match(/<rect [^>]*fill="#4c78a8"/g)).toHaveLength(DIAMOND.length);
    const dir = mkdtempSync(join(tmpdir(), "bench-report-"));
    try {
      writeResults(dir, result);
      expect(JSON.parse(readFileSync(join(dir, "result.json"), "utf8")).headline[0].serial_over_parallel.archive.min).toBe(2);
      expect(readFileSync(join(dir, "result.md"), "utf8")).toBe(md);
      expect(readFileSync(join(dir, "waterfall-cold-parallel.svg"), "utf8")).toMatch(/^<svg/);
      expect(readFileSync(join(dir, "waterfall-cold-parallel-images.svg"), "utf8")).toMatch(/^<svg/);
      expect(readFileSync(join(dir, "waterfall-cold-serial.svg"), "utf8")).toMatch(/^<svg/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("command line", () => {
  const now = new Date("2026-01-02T03:04:05.678Z");
  it("has the issue's defaults (two bandwidths × two file systems) and a smoke mode", () => {
    const d = parseCli([], "/repo", now);
    expect(d).toMatchObject({
      runs: 3,
      scale: 1,
      latency: 0,
      smoke: false,
      formats: ["archive", "image"],
      out: "/repo/results/bench-20260102T030405Z",
      blocks: [
        { bandwidthMBps: 50, fs: "root" },
        { bandwidthMBps: 50, fs: "ext4" },
        { bandwidthMBps: 200, fs: "root" },
        { bandwidthMBps: 200, fs: "ext4" },
      ],
    });
    expect(d !== "help" && d.apt).toContain("podman");
    expect(d !== "help" && d.kinds).toEqual(["legacy", "cold_parallel", "cold_serial", "warm", "version_change"]);
    const s = parseCli(["--smoke"], "/repo", now);
    expect(s).toMatchObject({ runs: 1, scale: 0.01, smoke: true, apt: TEST_APT_PACKAGES, blocks: [{ bandwidthMBps: 50, fs: "ext4" }] });
    expect(s !== "help" && s.kinds).not.toContain("cold_serial");
    expect(parseCli(["--smoke", "--runs", "2", "--kinds", "cold_parallel,warm"], "/repo", now)).toMatchObject({ runs: 2, kinds: ["cold_parallel", "warm"] });
    expect(parseCli(["--blocks", "50:root,200:ext4"], "/r", now)).toMatchObject({
      blocks: [
        { bandwidthMBps: 50, fs: "root" },
        { bandwidthMBps: 200, fs: "ext4" },
      ],
    });
    expect(parseCli(["--bandwidth", "0", "--fs", "root"], "/r", now)).toMatchObject({ blocks: [{ bandwidthMBps: 0, fs: "root" }] });
  });
  it("refuses bad values", () => {
    expect(() => parseCli(["--runs", "0"], "/r")).toThrow(/--runs/);
    expect(() => parseCli(["--kinds", "hot"], "/r")).toThrow(/unknown hot/);
    expect(() => parseCli(["--formats", "zip"], "/r")).toThrow(/--formats: unknown zip/);
    expect(() => parseCli(["--fs", "xfs"], "/r")).toThrow(/--fs: unknown xfs/);
    expect(() => parseCli(["--blocks", "50"], "/r")).toThrow(/--blocks/);
    expect(() => parseCli(["--blocks", "50:root", "--fs", "root"], "/r")).toThrow(/--blocks/);
    expect(() => parseCli(["--bandwidth", "50", "--bandwidths", "50,200"], "/r")).toThrow(/give one/);
    expect(() => parseCli(["--bandwidths", "fast"], "/r")).toThrow(/--bandwidths/);
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
