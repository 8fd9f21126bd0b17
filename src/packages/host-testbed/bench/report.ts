/**
 * The benchmark's output: result.json (every run and the summary), a
 * Markdown table (median, min–max of each figure per run kind; also
 * printed) and the cold runs' waterfalls as SVG.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Stat, type StepTiming, stat } from "./metrics.js";
import type { BenchRun, RunKind, RunRecord } from "./runner.js";
import { RUN_KINDS } from "./runner.js";

export interface BenchSettings {
  command: string;
  runs: number;
  scale: number;
  smoke: boolean;
  bandwidth_mb_per_s: number;
  latency_ms: number;
  xz_at_start?: boolean;
  machine: { cpus: number; kernel: string; node: string };
}

/** A figure: how to read it off a run, and how to show it. */
interface Figure {
  key: string;
  label: string;
  unit: string;
  digits: number;
  of: (r: RunRecord) => number | null;
}

export const FIGURES: Figure[] = [
  { key: "wall_s", label: "wall time (stub, end to end)", unit: "s", digits: 1, of: (r) => r.wall_s },
  { key: "engine_wall_s", label: "wall time (bootstrap.py)", unit: "s", digits: 1, of: (r) => r.engine_wall_s },
  { key: "critical_path_s", label: "critical path (step timings)", unit: "s", digits: 1, of: (r) => r.critical_path_s },
  { key: "wall_over_critical", label: "wall ÷ critical path", unit: "", digits: 2, of: (r) => r.wall_over_critical },
  { key: "engine_overhead_s", label: "engine overhead (no step running)", unit: "s", digits: 2, of: (r) => r.engine_overhead_s },
  { key: "stub_overhead_s", label: "stub overhead (outside bootstrap.py)", unit: "s", digits: 2, of: (r) => r.stub_overhead_s },
  { key: "downloads_done_s", label: "downloads finished at", unit: "s", digits: 1, of: (r) => r.milestones.downloads_s },
  { key: "apt_done_s", label: "apt finished at", unit: "s", digits: 1, of: (r) => r.milestones.apt_s },
  { key: "node_done_s", label: "node finished at", unit: "s", digits: 1, of: (r) => r.milestones.node_s },
  { key: "apt_update_s", label: "apt-get update", unit: "s", digits: 1, of: (r) => r.apt_update_s },
  { key: "apt_install_s", label: "apt-get install", unit: "s", digits: 1, of: (r) => r.apt_install_s },
  { key: "download_mb_per_s", label: "download throughput", unit: "MB/s", digits: 1, of: (r) => (r.download ? r.download.bytes_per_s / 1e6 : null) },
  { key: "download_fraction", label: "download throughput ÷ limit", unit: "", digits: 2, of: (r) => r.download?.fraction_of_limit ?? null },
  { key: "download_mb", label: "downloaded from the artifact server", unit: "MB", digits: 1, of: (r) => (r.download ? r.download.bytes / 1e6 : 0) },
  { key: "extraction_mb_per_s", label: "extraction rate (MB/s of archive)", unit: "MB/s", digits: 1, of: (r) => r.extraction_mb_per_s },
  { key: "peak_rss_mb", label: "peak memory of bootstrap.py (VmHWM)", unit: "MB", digits: 1, of: (r) => r.peak_rss_mb },
  { key: "changed_steps", label: "steps that did work", unit: "", digits: 0, of: (r) => r.changed_steps.length },
  { key: "service_restarts", label: "daemon (re)started (runs)", unit: "", digits: 0, of: (r) => (r.service_restarted ? 1 : 0) },
  { key: "loadavg_1m", label: "machine load (1-min avg) at start", unit: "", digits: 1, of: (r) => r.noise.loadavg_1m },
  { key: "cpu_probe_ms", label: "CPU probe (sha256 32 MB)", unit: "ms", digits: 0, of: (r) => r.noise.cpu_probe_ms },
  { key: "disk_probe_ms", label: "disk probe (64 MB + fsync)", unit: "ms", digits: 0, of: (r) => r.noise.disk_probe_ms },
];

export type Summary = Record<RunKind, Record<string, Stat | null>>;

export interface Headline {
  wall_over_critical_parallel: Stat | null;
  serial_over_parallel: { median: number; min: number; max: number } | null;
  warm_wall_s: Stat | null;
  download_fraction: Stat | null;
}

export interface BenchResult extends BenchRun {
  settings: BenchSettings;
  summary: Summary;
  headline: Headline;
}

export function summarize(runs: readonly RunRecord[]): Summary {
  const out = {} as Summary;
  for (const kind of RUN_KINDS) {
    const mine = runs.filter((r) => r.kind === kind);
    out[kind] = Object.fromEntries(FIGURES.map((f) => [f.key, stat(mine.map(f.of))]));
  }
  return out;
}

/**
 * The figures the issue asks about. serial ÷ parallel pairs the runs of the
 * same iteration (they ran back to back), so min and max are real pairs.
 */
export function headline(runs: readonly RunRecord[], summary: Summary): Headline {
  const ratios: number[] = [];
  for (const s of runs.filter((r) => r.kind === "cold_serial")) {
    const p = runs.find((r) => r.kind === "cold_parallel" && r.iteration === s.iteration);
    if (p && p.wall_s > 0) ratios.push(s.wall_s / p.wall_s);
  }
  const sp = stat(ratios);
  return {
    wall_over_critical_parallel: summary.cold_parallel.wall_over_critical ?? null,
    serial_over_parallel: sp ? { median: sp.median, min: sp.min, max: sp.max } : null,
    warm_wall_s: summary.warm.wall_s ?? null,
    download_fraction: summary.cold_parallel.download_fraction ?? null,
  };
}

export function buildResult(run: BenchRun, settings: BenchSettings): BenchResult {
  const summary = summarize(run.runs);
  return { ...run, settings, summary, headline: headline(run.runs, summary) };
}

// --- Markdown ---------------------------------------------------------------------------

function fmt(s: Stat | null | undefined, digits: number): string {
  if (!s) return "–";
  const f = (x: number) => x.toFixed(digits);
  return s.n > 1 ? `${f(s.median)} (${f(s.min)}–${f(s.max)})` : f(s.median);
}

const KIND_LABEL: Record<RunKind, string> = {
  cold_parallel: "cold, parallel",
  cold_serial: "cold, serial",
  warm: "warm re-run",
  version_change: "project version changed",
};

export function markdown(result: BenchResult): string {
  const { settings, summary, headline: h, workload } = result;
  const kinds = RUN_KINDS.filter((k) => result.runs.some((r) => r.kind === k));
  const lines: string[] = [];
  lines.push(`# Bootstrap benchmark ${settings.smoke ? "(smoke)" : ""}`.trim(), "");
  lines.push(
    `\`${settings.command}\` — ${result.started_at} — ${settings.runs} run(s) per kind, scale ${settings.scale}, ` +
      `bandwidth ${settings.bandwidth_mb_per_s > 0 ? `${settings.bandwidth_mb_per_s} MB/s shared` : "unlimited"}, ` +
      `first-byte latency ${settings.latency_ms} ms${settings.xz_at_start ? ", xz in the host from the start" : ""}; ${settings.machine.cpus} CPUs, Linux ${settings.machine.kernel}, Node ${settings.machine.node}.`,
    "",
  );
  const bundles = workload.bundles.map((b) => `${b.artifact} ${(b.size_bytes / 1e6).toFixed(1)} MB (${b.ratio.toFixed(1)}x, ${b.files} files)`);
  lines.push(
    `Workload: ${bundles.join(", ")}; node ${workload.node.version} ${(workload.node.size_bytes / 1e6).toFixed(1)} MB; ` +
      `apt: ${workload.apt_packages.join(" ")}.`,
    "",
  );
  lines.push("## Headline", "");
  const sp = h.serial_over_parallel;
  lines.push("| figure | value | aim |", "|---|---|---|");
  lines.push(
    `| wall ÷ critical path, cold parallel | ${fmt(h.wall_over_critical_parallel, 2)} | ≤ 1.10 ${mark(h.wall_over_critical_parallel?.median, (x) => x <= 1.1)} |`,
  );
  lines.push(
    `| serial ÷ parallel (wall) | ${sp ? (sp.min !== sp.max ? `${sp.median.toFixed(2)} (${sp.min.toFixed(2)}–${sp.max.toFixed(2)})` : sp.median.toFixed(2)) : "–"} | > 1 |`,
  );
  lines.push(`| warm re-run wall | ${fmt(h.warm_wall_s, 2)} s | < 2 s ${mark(h.warm_wall_s?.median, (x) => x < 2)} |`);
  lines.push(
    `| download throughput ÷ bandwidth, cold parallel | ${fmt(h.download_fraction, 2)} | ≥ 0.9 ${mark(h.download_fraction?.median, (x) => x >= 0.9)} |`,
  );
  lines.push("", "## All figures (median, min–max)", "");
  lines.push(`| figure | ${kinds.map((k) => KIND_LABEL[k]).join(" | ")} |`);
  lines.push(`|---|${kinds.map(() => "---").join("|")}|`);
  for (const f of FIGURES) {
    const unit = f.unit ? ` (${f.unit})` : "";
    lines.push(`| ${f.label}${unit} | ${kinds.map((k) => fmt(summary[k][f.key], f.digits)).join(" | ")} |`);
  }
  lines.push("", "## Machine noise", "");
  lines.push(noiseNote(result));
  const cold = medianRun(result.runs, "cold_parallel");
  if (cold) {
    lines.push("", `## Critical path of the median cold parallel run (#${cold.iteration})`, "");
    lines.push(cold.critical_path.map((n) => `${n} ${cold.steps.find((s) => s.name === n)?.duration_s.toFixed(1)} s`).join(" → "));
    lines.push("", "![waterfall](waterfall-cold-parallel.svg)");
  }
  lines.push("");
  return lines.join("\n");
}

function mark(x: number | undefined, ok: (x: number) => boolean): string {
  return x === undefined ? "" : ok(x) ? "✓" : "✗";
}

function noiseNote(result: BenchResult): string {
  const load = stat(result.runs.map((r) => r.noise.loadavg_1m));
  const cpu = stat(result.runs.map((r) => r.noise.cpu_probe_ms));
  const disk = stat(result.runs.map((r) => r.noise.disk_probe_ms));
  const walls = RUN_KINDS.map((k) => [k, result.summary[k].wall_s] as const).filter(([, s]) => s && s.n > 1);
  const parts = [
    `Load average at run start ${fmt(load, 1)} on ${result.settings.machine.cpus} CPUs` +
      ` (other work on the machine shares the CPUs and the disk with the host under test).`,
    `CPU probe ${fmt(cpu, 0)} ms, disk probe ${fmt(disk, 0)} ms (spread ${pct(cpu?.spread)} and ${pct(disk?.spread)}).`,
  ];
  if (walls.length) parts.push(`Wall-time spread (max − min) ÷ median: ${walls.map(([k, s]) => `${KIND_LABEL[k]} ${pct(s!.spread)}`).join(", ")}.`);
  else parts.push("One run per kind: no spread to report (use --runs 3 or more).");
  return parts.join(" ");
}

function pct(x: number | undefined): string {
  return x === undefined ? "–" : `${(x * 100).toFixed(0)}%`;
}

/** The run whose wall time is the median of its kind (lower middle for even counts). */
export function medianRun(runs: readonly RunRecord[], kind: RunKind): RunRecord | null {
  const mine = runs.filter((r) => r.kind === kind).sort((a, b) => a.wall_s - b.wall_s);
  return mine.length ? mine[(mine.length - 1) >> 1]! : null;
}

// --- SVG waterfall ----------------------------------------------------------------------

const COLORS: Record<string, string> = { changed: "#4c78a8", unchanged: "#bab0ac", failed: "#e45756", blocked: "#f2cf5b" };

function esc(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** One bar per step (start → end, seconds since the engine started); the critical path outlined. */
export function waterfallSvg(run: RunRecord, title: string): string {
  const steps: StepTiming[] = [...run.steps].sort((a, b) => a.start_s - b.start_s || a.name.localeCompare(b.name));
  const critical = new Set(run.critical_path);
  const total = Math.max(run.engine_wall_s, ...steps.map((s) => s.end_s), 0.001);
  const left = 170;
  const width = 720;
  const row = 22;
  const top = 44;
  const height = top + steps.length * row + 40;
  const x = (t: number) => left + (t / total) * width;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${left + width + 90}" height="${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="10" y="20" font-size="14" font-weight="bold">${esc(title)}</text>`);
  out.push(
    `<text x="10" y="36" fill="#555">wall ${run.engine_wall_s.toFixed(1)} s (bootstrap.py), critical path ${run.critical_path_s.toFixed(1)} s (outlined), ` +
      `${run.changed_steps.length} steps did work</text>`,
  );
  const tick = niceTick(total);
  for (let t = 0; t <= total + 1e-9; t += tick) {
    out.push(`<line x1="${x(t).toFixed(1)}" y1="${top - 4}" x2="${x(t).toFixed(1)}" y2="${height - 30}" stroke="#eee"/>`);
    out.push(`<text x="${x(t).toFixed(1)}" y="${height - 16}" text-anchor="middle" fill="#555">${+t.toFixed(2)} s</text>`);
  }
  steps.forEach((s, i) => {
    const y = top + i * row;
    const w = Math.max(1, x(s.end_s) - x(s.start_s));
    const stroke = critical.has(s.name) ? ` stroke="#000" stroke-width="2"` : "";
    out.push(`<text x="${left - 8}" y="${y + 15}" text-anchor="end">${esc(s.name)}</text>`);
    out.push(
      `<rect x="${x(s.start_s).toFixed(1)}" y="${y + 3}" width="${w.toFixed(1)}" height="${row - 6}" fill="${COLORS[s.outcome] ?? "#999"}"${stroke}>` +
        `<title>${esc(`${s.name}: ${s.outcome}, ${s.start_s.toFixed(2)}–${s.end_s.toFixed(2)} s (${s.duration_s.toFixed(2)} s)`)}</title></rect>`,
    );
    out.push(`<text x="${(x(s.start_s) + w + 4).toFixed(1)}" y="${y + 15}" fill="#333">${s.duration_s.toFixed(1)} s</text>`);
  });
  out.push("</svg>");
  return `${out.join("\n")}\n`;
}

function niceTick(total: number): number {
  const raw = total / 8;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * p).find((t) => t >= raw) ?? raw;
}

// --- the folder -------------------------------------------------------------------------

/** Write result.json, result.md and the waterfalls into `dir`; returns the Markdown. */
export function writeResults(dir: string, result: BenchResult): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "result.json"), `${JSON.stringify(result, null, 2)}\n`);
  const md = markdown(result);
  writeFileSync(join(dir, "result.md"), md);
  for (const kind of ["cold_parallel", "cold_serial"] as const) {
    const run = medianRun(result.runs, kind);
    if (run) {
      const title = `${KIND_LABEL[kind]} bootstrap, run #${run.iteration} (median wall of ${result.runs.filter((r) => r.kind === kind).length})`;
      writeFileSync(join(dir, `waterfall-${kind.replace("_", "-")}.svg`), waterfallSvg(run, title));
    }
  }
  return md;
}
