/**
 * The benchmark's math on hand-made step timings: engine overhead, milestones, throughput from byte samples, medians, the
 * resource lower bound from isolated costs, the machine-noise accounting (/proc/stat, /proc/<pid>/stat), CPU-seconds per step
 * from the events, and the report writer (JSON, Markdown, SVG) on synthetic runs. No host needed.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
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
  floorDownloads,
  isDownload,
  logRecords,
  lowerBound,
  milestones,
  minimumPieces,
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
import { type BenchSettings, blockCosts, buildResult, markdown, waterfallSvg, writeResults } from "../bench/report.js";
import { type Block, type BoundContext, boundFor, type IsolatedCosts, type RunRecord, reboundBlock, runRecord } from "../bench/runner.js";
import { asVersion, buildWorkloadZst, Prng, TarWriter, type WorkloadBundle } from "../bench/workload.js";
import { bundleLayout } from "../src/artifacts.js";
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
  piece("zst_download_project", "zst_project", 5.1, 0.5, 0.5, 255e6),
  piece("zst_verify_project", "zst_project", 1, 0.9, 0.1),
  piece("zst_decompress_project", "zst_project", 9, 2, 0.5),
  piece("zst_write_project", "zst_project", 9, 2, 4),
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
    expect(() =>
      chains(
        PIECES.filter((p) => p.name !== "zst_write_project"),
        "archive-zst",
        ["project"],
        false,
      ),
    ).toThrow(/lack a piece/);
  });

  it("chains the new runs' apt from bootstrap.py's own apt measured alone (no recommends), the legacy run's from its own", () => {
    const withNew = [...PIECES, piece("new_apt_update", "new_apt", 2, 0.8, 0.4), piece("new_apt_install", "new_apt", 9, 4, 2)];
    expect(chains(withNew, "image", [], true, "new")[0]).toEqual([
      { name: "apt_update", wall_s: 2, cpu_s: 1.2000000000000002 },
      { name: "apt_install", wall_s: 9, cpu_s: 6 },
    ]);
    expect(chains(withNew, "image", [], true)[0]!.map((s) => s.wall_s)).toEqual([3, 17]);
    // asked for bootstrap.py's apt without its measurement: refused, not silently the legacy one
    expect(() => chains(PIECES, "image", [], true, "new")).toThrow(/lack a piece/);
  });

  it("chains .tar.zst archives from their own pieces: download → verify → zstd | tar", () => {
    expect(chains(PIECES, "archive-zst", ["project"], false)).toEqual([
      [
        { name: "download_project", wall_s: 5.1, cpu_s: 1 },
        { name: "verify_project", wall_s: 1, cpu_s: 1 },
        { name: "install_project", wall_s: 9, cpu_s: 8.5 },
      ],
    ]);
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
    const ctx: BoundContext = {
      block: { bandwidthMBps: 50, fs: "root" } as Block,
      cores: 2,
      archiveBytes: { project: 250e6 },
      images: { project: { path: "/x.sqfs", sha256: "0".repeat(64), size_bytes: 260e6 } },
      nodeBytes: 30e6,
      zstBytes: { project: 255e6 },
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
    // zstd archives: their own size and pieces (chain 5.1 + 1 + 9 = 15.1 s)
    expect(boundFor(ctx, "version_change", "archive-zst", PIECES)).toMatchObject({ bytes: 255e6, seconds: 15.1, binding: "chain" });
    expect(boundFor(ctx, "cold_parallel", "archive-zst", PIECES).bytes).toBe(285e6);
    expect(() => boundFor({ ...ctx, zstBytes: undefined }, "cold_parallel", "archive-zst", PIECES)).toThrow(/zst/);
    // with bootstrap.py's apt measured alone, the new runs' apt chain is that one; the legacy run keeps its own
    const withNew = [...PIECES, piece("new_apt_update", "new_apt", 2, 0.5, 0.5), piece("new_apt_install", "new_apt", 30, 6, 4)];
    expect(boundFor(ctx, "cold_parallel", "image", withNew).chain).toEqual(["apt_update", "apt_install"]);
    expect(boundFor(ctx, "cold_parallel", "image", withNew).seconds).toBe(32);
    expect(boundFor(ctx, "legacy", "archive", withNew)).toEqual(boundFor(ctx, "legacy", "archive", PIECES));
  });

  it("counts apt's bytes in the bytes term, nowhere else", () => {
    const ctx: BoundContext = {
      block: { bandwidthMBps: 50, fs: "root" } as Block,
      cores: 2,
      archiveBytes: { project: 250e6 },
      images: {},
      nodeBytes: 30e6,
    };
    const without = boundFor(ctx, "cold_parallel", "archive", PIECES);
    expect(boundFor(ctx, "cold_parallel", "archive", PIECES, 0)).toEqual(without);
    // 2 GB of packages at 50 MB/s: the link sets the bound (2.28 GB ÷ 50 MB/s = 45.6 s)
    const heavy = boundFor(ctx, "cold_parallel", "archive", PIECES, 2e9);
    expect(heavy).toMatchObject({ bytes: 2.28e9, binding: "bandwidth" });
    expect(heavy.seconds).toBeCloseTo(45.6);
    expect({ ...heavy, bytes: 0, bandwidth_s: 0, seconds: 0, binding: "" }).toEqual({ ...without, bytes: 0, bandwidth_s: 0, seconds: 0, binding: "" });
    expect(() => boundFor(ctx, "cold_parallel", "archive", PIECES, -1)).toThrow(/aptBytes/);
    expect(() => boundFor(ctx, "cold_parallel", "archive", PIECES, Number.NaN)).toThrow(/aptBytes/);
    fc.assert(
      fc.property(fc.double({ min: 0, max: 1e10, noNaN: true }), fc.double({ min: 0, max: 1e10, noNaN: true }), (a, b) => {
        const [lo, hi] = a <= b ? [a, b] : [b, a];
        const x = boundFor(ctx, "version_change", "archive", PIECES, lo);
        const y = boundFor(ctx, "version_change", "archive", PIECES, hi);
        // more bytes never lower the bound, and the bytes term is exactly the sum ÷ the link
        expect(y.seconds).toBeGreaterThanOrEqual(x.seconds);
        expect(y.bandwidth_s).toBeCloseTo((250e6 + hi) / 50e6, 6);
        expect(y.chain_s).toBe(x.chain_s);
        expect(y.cpu_s).toBe(x.cpu_s);
      }),
    );
  });
});

// --- robust isolated costs: minima over iterations, link floors -----------------------------------

const arbPiece = (name: string) =>
  fc.record({
    name: fc.constant(name),
    group: fc.constant("g"),
    wall_s: fc.double({ min: 0, max: 100, noNaN: true }),
    user_s: fc.double({ min: 0, max: 100, noNaN: true }),
    sys_s: fc.double({ min: 0, max: 100, noNaN: true }),
    bytes: fc.option(fc.integer({ min: 1, max: 1e9 }), { nil: null }),
  });
const PIECE_NAMES = ["apt_install", "download_project", "write_project", "image_download_tools"];
const arbIteration = fc.tuple(...PIECE_NAMES.map(arbPiece)).map((ps) => ps as Piece[]);

describe("isolated costs over iterations", () => {
  it("take each piece's minimum wall and, separately, its minimum CPU (hand-made case)", () => {
    const a = [piece("download_project", "project", 9, 0.5, 0.5, 250e6), piece("write_project", "project", 18, 2, 15)];
    const b = [piece("download_project", "project", 5, 0.9, 0.9, 250e6), piece("write_project", "project", 25, 1, 10)];
    expect(minimumPieces([a, b])).toEqual([
      piece("download_project", "project", 5, 0.5, 0.5, 250e6), // wall from b, CPU from a
      piece("write_project", "project", 18, 1, 10), // wall from a, CPU (and its user/system split) from b
    ]);
    // a piece measured in one iteration only is kept as measured
    expect(minimumPieces([a, [piece("apt_install", "apt", 17, 6, 4)]]).map((p) => p.name)).toEqual(["download_project", "write_project", "apt_install"]);
    expect(minimumPieces([])).toEqual([]);
  });

  it("minima: never above any iteration, each equal to one measured value, order of iterations irrelevant (property)", () => {
    fc.assert(
      fc.property(fc.array(arbIteration, { minLength: 1, maxLength: 6 }), (iterations) => {
        const min = minimumPieces(iterations);
        const rev = minimumPieces([...iterations].reverse());
        for (const m of min) {
          const all = iterations.map((it) => it.find((p) => p.name === m.name)!);
          expect(all.every((p) => m.wall_s <= p.wall_s)).toBe(true);
          expect(all.some((p) => p.wall_s === m.wall_s)).toBe(true);
          expect(all.every((p) => m.user_s + m.sys_s <= p.user_s + p.sys_s)).toBe(true);
          // the CPU split is a real measurement's, not a mix of two
          expect(all.some((p) => p.user_s === m.user_s && p.sys_s === m.sys_s)).toBe(true);
          const r = rev.find((p) => p.name === m.name)!;
          expect(r.wall_s).toBe(m.wall_s);
          expect(r.user_s + r.sys_s).toBe(m.user_s + m.sys_s);
        }
        expect(min.map((p) => p.name).sort()).toEqual([...PIECE_NAMES].sort());
      }),
    );
  });

  it("a bound from the minima is never above the bound of any single iteration (property)", () => {
    const ctx: BoundContext = { block: { bandwidthMBps: 50, fs: "root" } as Block, cores: 2, archiveBytes: { project: 250e6 }, images: {}, nodeBytes: 30e6 };
    const jitter = (p: Piece, f: number[]) => ({ ...p, wall_s: p.wall_s * f[0]!, user_s: p.user_s * f[1]!, sys_s: p.sys_s * f[2]! });
    const factors = fc.array(fc.array(fc.double({ min: 1, max: 3, noNaN: true }), { minLength: 3, maxLength: 3 }), {
      minLength: PIECES.length,
      maxLength: PIECES.length,
    });
    fc.assert(
      fc.property(fc.array(factors, { minLength: 1, maxLength: 5 }), (its) => {
        const iterations = its.map((f) => PIECES.map((p, i) => jitter(p, f[i]!)));
        const min = boundFor(ctx, "cold_parallel", "archive", minimumPieces(iterations));
        for (const it of iterations) expect(min.seconds).toBeLessThanOrEqual(boundFor(ctx, "cold_parallel", "archive", it).seconds + 1e-9);
        // and never below the bound of the unjittered costs (the jitter only adds)
        expect(min.seconds).toBeGreaterThanOrEqual(boundFor(ctx, "cold_parallel", "archive", PIECES).seconds - 1e-9);
      }),
    );
  });

  it("floor a download's wall at bytes ÷ bandwidth and warn when a measurement beat the link", () => {
    const ps = [
      piece("download_project", "project", 2, 0.5, 0.5, 250e6), // 250 MB in 2 s at 50 MB/s: impossible
      piece("image_download_tools", "image_tools", 1.02, 0, 0, 55e6), // 1.1 s floor, within the bucket's burst
      piece("zst_download_project", "zst_project", 7, 0, 0, 255e6), // slower than the link: as measured
      piece("write_project", "project", 1, 0, 0, 250e6), // not a download
      piece("download_node_sums", "node", 0.01, 0, 0, null), // size unknown: as measured
    ];
    const { pieces, warnings } = floorDownloads(ps, 50e6);
    expect(pieces.map((p) => p.wall_s)).toEqual([5, 1.1, 7, 1, 0.01]);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^download_project: 2\.00 s for 250\.0 MB is faster than the link allows \(5\.00 s at 50 MB\/s\)/);
    expect(floorDownloads(ps, null)).toEqual({ pieces: ps, warnings: [] });
    expect(ps[0]!.wall_s).toBe(2); // the input is not changed
    expect(["download_x", "image_download_x", "zst_download_x", "download_node_sums"].every((name) => isDownload({ name }))).toBe(true);
    expect(["downloader", "write_download", "verify_project"].some((name) => isDownload({ name }))).toBe(false);
    // the bound uses the floored wall: the chain is 5 + 1 + 18, not 2 + 1 + 18
    const ctx: BoundContext = { block: { bandwidthMBps: 50, fs: "root" } as Block, cores: 2, archiveBytes: { project: 250e6 }, images: {}, nodeBytes: 0 };
    const fast = PIECES.map((p) => (p.name === "download_project" ? { ...p, wall_s: 2 } : p));
    expect(boundFor(ctx, "version_change", "archive", fast).chain_s).toBeCloseTo(24);
  });

  it("floored walls: never below the link nor the measurement, a warning exactly when beaten by more than the burst (property)", () => {
    fc.assert(
      fc.property(fc.array(arbIteration, { minLength: 1, maxLength: 1 }), fc.integer({ min: 1, max: 1000 }), ([ps], mbps) => {
        const bw = mbps * 1e6;
        const { pieces, warnings } = floorDownloads(ps!, bw);
        pieces.forEach((p, i) => {
          const m = ps![i]!;
          expect(p.wall_s).toBeGreaterThanOrEqual(m.wall_s);
          if (isDownload(m) && m.bytes) expect(p.wall_s).toBe(Math.max(m.wall_s, m.bytes / bw));
          else expect(p.wall_s).toBe(m.wall_s);
        });
        const beaten = ps!.filter((m) => isDownload(m) && m.bytes && m.wall_s < m.bytes / bw - 0.1);
        expect(warnings.map((w) => w.split(":")[0])).toEqual(beaten.map((m) => m.name));
      }),
    );
  });

  it("rebounds a block's runs from the minima and keeps each run's own-iteration bound", () => {
    const ctx: BoundContext = { block: { bandwidthMBps: 50, fs: "root" } as Block, cores: 2, archiveBytes: { project: 250e6 }, images: {}, nodeBytes: 30e6 };
    // iteration 2 measured the project's extraction under contention (40 s instead of 18)
    const slow = PIECES.map((p) => (p.name === "decompress_project" || p.name === "write_project" ? { ...p, wall_s: 40 } : p));
    const iso: IsolatedCosts[] = [
      { bandwidth_mb_per_s: 50, fs: "root", iteration: 1, legacy_wall_s: 44, pieces: PIECES },
      { bandwidth_mb_per_s: 50, fs: "root", iteration: 2, legacy_wall_s: 70, pieces: slow },
    ];
    const r1 = syntheticRun("version_change", 1, 30_000);
    const r2 = syntheticRun("version_change", 2, 30_000);
    r2.apt_bytes = 500e6;
    reboundBlock([r1, r2], iso, ctx);
    expect(r1.lower_bound!.seconds).toBeCloseTo(24);
    expect(r1.lower_bound_iteration!.seconds).toBeCloseTo(24);
    expect(r2.lower_bound_iteration!.seconds).toBeCloseTo(46); // its own iteration: 5 + 1 + 40
    expect(r2.lower_bound!.chain_s).toBeCloseTo(24); // the minima
    expect(r2.lower_bound!.bytes).toBe(750e6); // its apt bytes count
    expect(r2.wall_over_bound).toBeCloseTo(30 / r2.lower_bound!.seconds);
    expect(r2.wall_over_bound_iteration).toBeCloseTo(30 / 46);
    // without isolated costs (no legacy run): no bound at all
    reboundBlock([r1], [], ctx);
    expect(r1).toMatchObject({ lower_bound: null, wall_over_bound: null, lower_bound_iteration: null });
  });

  it("the report's block costs: minima per block, warnings named by iteration", () => {
    const fast = PIECES.map((p) => (p.name === "download_project" ? { ...p, wall_s: 1 } : p));
    const costs = blockCosts([
      { bandwidth_mb_per_s: 50, fs: "root", iteration: 1, legacy_wall_s: 44, pieces: PIECES },
      { bandwidth_mb_per_s: 50, fs: "root", iteration: 2, legacy_wall_s: 40, pieces: fast },
      { bandwidth_mb_per_s: 200, fs: "ext4", iteration: 1, legacy_wall_s: 30, pieces: PIECES },
    ]);
    expect(costs.map((c) => [c.block, c.iterations])).toEqual([
      ["50:root", [1, 2]],
      ["200:ext4", [1]],
    ]);
    expect(costs[0]!.pieces.find((p) => p.name === "download_project")!.wall_s).toBe(1);
    expect(costs[0]!.warnings).toEqual([expect.stringMatching(/^iteration 2: download_project: 1\.00 s/)]);
    // 250 MB in 5 s at 200 MB/s is slower than the link: no warning
    expect(costs[1]!.warnings).toEqual([]);
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

  it("reports the zstd archives like the other formats, and apt's bytes when a run knows them", () => {
    const zst = [syntheticRun("cold_parallel", 1, 8_000, "archive-zst"), syntheticRun("cold_serial", 1, 16_000, "archive-zst")];
    zst[0]!.apt_bytes = 120e6;
    const r = buildResult({ ...result, runs: [...runs, ...zst] }, { ...settings, formats: ["archive", "archive-zst", "image"], zstd_level: 19 });
    const h = r.headline.find((x) => x.block === "50:root")!;
    expect(h.legacy_over_new["archive-zst"]).toMatchObject({ median: 5.5, n: 1 });
    expect(h.serial_over_parallel["archive-zst"]).toMatchObject({ median: 2 });
    const md = markdown(r);
    expect(md).toMatch(/\| zstd archives: cold, parallel \| 8\.0 \| .*\| 5\.50 \|/);
    expect(md).toContain("| zstd archives: cold, serial | 16.0 |");
    expect(md).toContain(".tar.zst at zstd level 19");
    // the apt row appears, with the one run that knows it
    expect(md).toMatch(/\| downloaded by apt \(MB\) \|[^\n]*120\.0/);
    // columns in the order archives, zstd archives, images
    const header = md.split("\n").find((l) => l.startsWith("| figure |"))!;
    expect(header.indexOf("archives: cold")).toBeLessThan(header.indexOf("zstd archives: cold"));
    expect(header.indexOf("zstd archives: cold")).toBeLessThan(header.indexOf("images: cold"));
    const dir = mkdtempSync(join(tmpdir(), "bench-report-zst-"));
    try {
      writeResults(dir, r);
      expect(readFileSync(join(dir, "waterfall-cold-parallel-zst.svg"), "utf8")).toContain("zstd archives");
      expect(readFileSync(join(dir, "waterfall-cold-serial-zst.svg"), "utf8")).toMatch(/^<svg/);
      const json = JSON.parse(readFileSync(join(dir, "result.json"), "utf8")) as typeof r;
      expect(json.runs.find((x) => x.format === "archive-zst" && x.kind === "cold_parallel")!.apt_bytes).toBe(120e6);
      expect(json.isolated_min[0]!.pieces.length).toBe(PIECES.length);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("writes result.json, a Markdown report per block and the waterfalls", () => {
    const md = markdown(result);
    expect(md).toContain("## 50 MB/s, hosts on this machine's root fs");
    expect(md).toContain("## 200 MB/s, hosts on this machine's root fs");
    expect(md).toContain("| archives: cold, parallel | 11.5 (11.0–12.0) |");
    expect(md).toMatch(/\| images: cold, parallel \| .*\| 4\.20 \(4\.00–4\.40\) ✓ \(aim ≥ 2\) \|/);
    expect(md).toContain("| decompress_project | 18.0 | 18.0 | 12.0 | 12.0 | 1.0 |  |");
    expect(md).toContain("| download_project | 5.0 | 5.0 | 1.0 | 1.0 | 0.5 | 5.0 |");
    expect(md).toContain("minimum over 1 iteration(s)");
    expect(md).not.toContain("downloaded by apt"); // no run knows its apt bytes: no row
    expect(md).not.toContain("**Warning**");
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
      zstdLevel: 19,
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
    expect(parseCli(["--formats", "archive,archive-zst,image", "--zstd-level", "6"], "/r", now)).toMatchObject({
      formats: ["archive", "archive-zst", "image"],
      zstdLevel: 6,
    });
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
    expect(() => parseCli(["--zstd-level", "23"], "/r")).toThrow(/--zstd-level/);
    expect(() => parseCli(["--zstd-level", "1.5"], "/r")).toThrow(/--zstd-level/);
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
  it("turns a .tar.xz into a .tar.zst of the same tar bytes, cached beside it by level, named as the real bundle", async () => {
    const dir = mkdtempSync(join(tmpdir(), "bench-zst-"));
    try {
      const chunks: Buffer[] = [];
      const tar = new TarWriter(async (c) => void chunks.push(c));
      await tar.dir("bundle/");
      await tar.file("bundle/index.js", Buffer.from("console.log(1);\n".repeat(500)), 0o644);
      await tar.end();
      const plain = Buffer.concat(chunks);
      const xzPath = join(dir, "bundle-linux-amd64.tar.xz");
      writeFileSync(xzPath, execFileSync("xz", ["-c", "-2"], { input: plain }));
      const layout = bundleLayout("project", "1.0.0");
      const b: WorkloadBundle = {
        path: xzPath,
        sha256: "0".repeat(64),
        size_bytes: 1,
        spec: { artifact: "project", version: "1.0.0", paddingBytes: 0, xzLevel: 2 },
        fileName: layout.fileName,
        topDir: layout.top,
        stripComponents: layout.strip_components,
        expectedFiles: layout.expected_files,
        executables: layout.executables,
        contentBytes: 8000,
        files: 1,
      };
      const z = await buildWorkloadZst(b, 3);
      expect(z.path).toBe(join(dir, "bundle-linux-amd64.z3.tar.zst"));
      expect(z.fileName).toBe("bundle-linux-amd64.tar.zst");
      expect(z.spec).toMatchObject({ compression: "zstd", zstdLevel: 3, version: "1.0.0" });
      expect(execFileSync("zstd", ["-dc", z.path]).equals(plain)).toBe(true);
      expect(z.size_bytes).toBe(readFileSync(z.path).length);
      expect(z.files).toBe(1);
      // cached: a second call reads the same file back
      expect(await buildWorkloadZst(b, 3)).toEqual(z);
      // an upgrade republishes it under the new version, still .tar.zst
      expect(asVersion(z, "1.0.7")).toMatchObject({ fileName: "bundle-linux-amd64.tar.zst", spec: { version: "1.0.7" }, path: z.path });
      await expect(buildWorkloadZst(b, 0)).rejects.toThrow(/zstd level/);
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
