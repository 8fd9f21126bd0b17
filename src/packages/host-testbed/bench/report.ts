/**
 * The benchmark's output: result.json (every run, the isolated costs and the
 * summary), a Markdown report (per block: the headline table with wall ÷
 * lower bound and legacy ÷ new, the isolated costs, every figure as median
 * and min–max per kind of run, the machine's load; also printed) and the
 * median cold runs' waterfalls as SVG.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Format, floorDownloads, isDownload, minimumPieces, type Piece, type Stat, type StepTiming, stat } from "./metrics.js";
import type { BenchRun, Block, IsolatedCosts, RunKind, RunRecord } from "./runner.js";
import { FORMATS, fsLabel, RUN_KINDS } from "./runner.js";

export interface BenchSettings {
  command: string;
  runs: number;
  scale: number;
  smoke: boolean;
  blocks: Block[];
  formats: Format[];
  kinds: RunKind[];
  latency_ms: number;
  xz_at_start?: boolean;
  /** Where the hosts' apt fetched from (absent in older results: the mirror). */
  apt_source?: string;
  /** zstd level of the images; null: the converter's default (19). */
  image_level?: number | null;
  /** zstd level of the .tar.zst archives (archive-zst format); null when not run. */
  zstd_level?: number | null;
  machine: { cpus: number; kernel: string; node: string };
  /** Written after an iteration, before the whole run finished. */
  partial?: boolean;
}

/** A figure: how to read it off a run, and how to show it. */
interface Figure {
  key: string;
  label: string;
  unit: string;
  digits: number;
  of: (r: RunRecord) => number | null;
  /** Shown only when some run has it. */
  optional?: boolean;
}

export const FIGURES: Figure[] = [
  { key: "wall_s", label: "wall time (stub, end to end)", unit: "s", digits: 1, of: (r) => r.wall_s },
  { key: "lower_bound_s", label: "resource lower bound", unit: "s", digits: 1, of: (r) => r.lower_bound?.seconds ?? null },
  { key: "wall_over_bound", label: "wall ÷ lower bound", unit: "", digits: 2, of: (r) => r.wall_over_bound },
  { key: "bound_bandwidth_s", label: "bound: bytes ÷ bandwidth", unit: "s", digits: 1, of: (r) => r.lower_bound?.bandwidth_s ?? null },
  { key: "bound_chain_s", label: "bound: longest chain of isolated costs", unit: "s", digits: 1, of: (r) => r.lower_bound?.chain_s ?? null },
  { key: "bound_cpu_s", label: "bound: isolated CPU-s ÷ cores", unit: "s", digits: 1, of: (r) => r.lower_bound?.cpu_bound_s ?? null },
  {
    key: "lower_bound_iteration_s",
    label: "lower bound from its own iteration's costs alone",
    unit: "s",
    digits: 1,
    of: (r) => r.lower_bound_iteration?.seconds ?? null,
  },
  { key: "wall_over_bound_iteration", label: "wall ÷ that bound", unit: "", digits: 2, of: (r) => r.wall_over_bound_iteration ?? null },
  { key: "engine_wall_s", label: "wall time (bootstrap.py)", unit: "s", digits: 1, of: (r) => r.engine_wall_s },
  { key: "critical_path_s", label: "critical path (diagnostic: contended step times)", unit: "s", digits: 1, of: (r) => r.critical_path_s },
  { key: "wall_over_critical", label: "wall ÷ critical path (diagnostic)", unit: "", digits: 2, of: (r) => r.wall_over_critical },
  { key: "steps_cpu_s", label: "CPU-seconds the steps report", unit: "s", digits: 1, of: (r) => r.steps_cpu_s },
  { key: "ours_cpu_s", label: "CPU-seconds of the run (host + bench)", unit: "s", digits: 1, of: (r) => r.cpu.ours_cpu_s },
  { key: "machine_cpu_s", label: "CPU-seconds of the whole machine", unit: "s", digits: 1, of: (r) => r.cpu.machine_cpu_s },
  { key: "not_ours_fraction", label: "share of the machine's CPU not ours", unit: "", digits: 2, of: (r) => r.cpu.not_ours_fraction },
  { key: "cores_busy", label: "cores busy (machine)", unit: "", digits: 2, of: (r) => r.cpu.cores_busy },
  { key: "engine_overhead_s", label: "engine overhead (no step running)", unit: "s", digits: 2, of: (r) => (r.kind === "legacy" ? null : r.engine_overhead_s) },
  { key: "stub_overhead_s", label: "stub overhead (outside bootstrap.py)", unit: "s", digits: 2, of: (r) => (r.kind === "legacy" ? null : r.stub_overhead_s) },
  { key: "downloads_done_s", label: "downloads finished at", unit: "s", digits: 1, of: (r) => r.milestones.downloads_s },
  { key: "apt_done_s", label: "apt finished at", unit: "s", digits: 1, of: (r) => r.milestones.apt_s },
  { key: "node_done_s", label: "node finished at", unit: "s", digits: 1, of: (r) => r.milestones.node_s },
  { key: "apt_update_s", label: "apt-get update", unit: "s", digits: 1, of: (r) => r.apt_update_s },
  { key: "apt_install_s", label: "apt-get install", unit: "s", digits: 1, of: (r) => r.apt_install_s },
  { key: "download_mb_per_s", label: "download throughput", unit: "MB/s", digits: 1, of: (r) => (r.download ? r.download.bytes_per_s / 1e6 : null) },
  { key: "download_fraction", label: "download throughput ÷ limit", unit: "", digits: 2, of: (r) => r.download?.fraction_of_limit ?? null },
  {
    key: "download_mb",
    label: "downloaded from the artifact server",
    unit: "MB",
    digits: 1,
    of: (r) => (r.kind === "legacy" ? null : r.download ? r.download.bytes / 1e6 : 0),
  },
  {
    key: "apt_mb",
    label: "downloaded by apt",
    unit: "MB",
    digits: 1,
    of: (r) => (typeof r.apt_bytes === "number" ? r.apt_bytes / 1e6 : null),
    optional: true,
  },
  { key: "extraction_mb_per_s", label: "extraction rate (MB/s of archive)", unit: "MB/s", digits: 1, of: (r) => r.extraction_mb_per_s },
  { key: "peak_rss_mb", label: "peak memory of bootstrap.py (VmHWM)", unit: "MB", digits: 1, of: (r) => r.peak_rss_mb },
  { key: "changed_steps", label: "steps that did work", unit: "", digits: 0, of: (r) => (r.kind === "legacy" ? null : r.changed_steps.length) },
  { key: "service_restarts", label: "daemon (re)started (runs)", unit: "", digits: 0, of: (r) => (r.kind === "legacy" ? null : r.service_restarted ? 1 : 0) },
  { key: "loadavg_1m", label: "machine load (1-min avg) at start", unit: "", digits: 1, of: (r) => r.noise.loadavg_1m },
  { key: "cpu_probe_ms", label: "CPU probe (sha256 32 MB)", unit: "ms", digits: 0, of: (r) => r.noise.cpu_probe_ms },
  { key: "disk_probe_ms", label: "disk probe (64 MB + fsync)", unit: "ms", digits: 0, of: (r) => r.noise.disk_probe_ms },
];

/** A kind of run within a block: the legacy run, or a format's kind. */
export function columnKey(r: Pick<RunRecord, "kind" | "format">): string {
  return r.kind === "legacy" ? "legacy" : `${r.format}:${r.kind}`;
}

export function blockKey(b: { bandwidth_mb_per_s: number; fs: string }): string {
  return `${b.bandwidth_mb_per_s}:${b.fs}`;
}

/** block → column → figure → median (min–max). */
export type Summary = Record<string, Record<string, Record<string, Stat | null>>>;

export interface BlockHeadline {
  block: string;
  bandwidth_mb_per_s: number;
  fs: string;
  /** legacy wall ÷ cold parallel wall of the same iteration, per format. */
  legacy_over_new: Partial<Record<Format, Stat | null>>;
  /** cold serial wall ÷ cold parallel wall of the same iteration, per format. */
  serial_over_parallel: Partial<Record<Format, Stat | null>>;
}

/** A block's isolated costs as the bounds use them: each piece's minimum over the block's iterations. */
export interface BlockCosts {
  block: string;
  bandwidth_mb_per_s: number;
  fs: string;
  iterations: number[];
  /** Minimum wall and, separately, minimum CPU (user/system as that measurement split them), per piece. */
  pieces: Piece[];
  /** Download measurements faster than the link allows (floored in the bound). */
  warnings: string[];
}

export interface BenchResult extends BenchRun {
  settings: BenchSettings;
  summary: Summary;
  headline: BlockHeadline[];
  /** Per block: the minima the bounds rest on (the per-iteration measurements stay in `isolated`). */
  isolated_min: BlockCosts[];
}

/** Each block's minima over its iterations, and a warning for every download faster than the link. */
export function blockCosts(isolated: readonly IsolatedCosts[]): BlockCosts[] {
  const blocks = [...new Set(isolated.map(blockKey))];
  return blocks.map((block) => {
    const mine = isolated.filter((x) => blockKey(x) === block);
    const first = mine[0]!;
    const bw = first.bandwidth_mb_per_s > 0 ? first.bandwidth_mb_per_s * 1e6 : null;
    const warnings = mine.flatMap((x) => floorDownloads(x.pieces, bw).warnings.map((w) => `iteration ${x.iteration}: ${w}`));
    return {
      block,
      bandwidth_mb_per_s: first.bandwidth_mb_per_s,
      fs: first.fs,
      iterations: mine.map((x) => x.iteration),
      pieces: minimumPieces(mine.map((x) => x.pieces)),
      warnings,
    };
  });
}

export function summarize(runs: readonly RunRecord[]): Summary {
  const out: Summary = {};
  for (const r of runs) {
    const b = blockKey(r);
    const c = columnKey(r);
    out[b] ??= {};
    if (out[b][c]) continue;
    const mine = runs.filter((x) => blockKey(x) === b && columnKey(x) === c);
    out[b][c] = Object.fromEntries(FIGURES.map((f) => [f.key, stat(mine.map(f.of))]));
  }
  return out;
}

/** a.wall ÷ b.wall over the iterations where both ran in the block (they ran back to back, so min and max are real pairs). */
export function pairedRatio(runs: readonly RunRecord[], block: string, top: (r: RunRecord) => boolean, bottom: (r: RunRecord) => boolean): Stat | null {
  const ratios: number[] = [];
  for (const a of runs.filter((r) => blockKey(r) === block && top(r))) {
    const b = runs.find((r) => blockKey(r) === block && bottom(r) && r.iteration === a.iteration);
    if (b && b.wall_s > 0) ratios.push(a.wall_s / b.wall_s);
  }
  return stat(ratios);
}

export function headline(runs: readonly RunRecord[]): BlockHeadline[] {
  const blocks = [...new Set(runs.map(blockKey))];
  return blocks.map((block) => {
    const first = runs.find((r) => blockKey(r) === block)!;
    const formats = [...new Set(runs.filter((r) => blockKey(r) === block && r.kind !== "legacy").map((r) => r.format))];
    const legacy_over_new: BlockHeadline["legacy_over_new"] = {};
    const serial_over_parallel: BlockHeadline["serial_over_parallel"] = {};
    for (const f of formats) {
      const cold = (r: RunRecord) => r.kind === "cold_parallel" && r.format === f;
      legacy_over_new[f] = pairedRatio(runs, block, (r) => r.kind === "legacy", cold);
      serial_over_parallel[f] = pairedRatio(runs, block, (r) => r.kind === "cold_serial" && r.format === f, cold);
    }
    return { block, bandwidth_mb_per_s: first.bandwidth_mb_per_s, fs: first.fs, legacy_over_new, serial_over_parallel };
  });
}

export function buildResult(run: BenchRun, settings: BenchSettings): BenchResult {
  return { ...run, settings, summary: summarize(run.runs), headline: headline(run.runs), isolated_min: blockCosts(run.isolated) };
}

// --- Markdown ---------------------------------------------------------------------------

function fmt(s: Stat | null | undefined, digits: number): string {
  if (!s) return "–";
  const f = (x: number) => x.toFixed(digits);
  return s.n > 1 ? `${f(s.median)} (${f(s.min)}–${f(s.max)})` : f(s.median);
}

const KIND_LABEL: Record<RunKind, string> = {
  legacy: "legacy (old serial flow)",
  cold_parallel: "cold, parallel",
  cold_serial: "cold, serial",
  warm: "warm re-run",
  version_change: "one-bundle upgrade (project)",
};

const FORMAT_LABEL: Record<Format, string> = { archive: "archives", "archive-zst": "zstd archives", image: "images" };

export function columnLabel(key: string): string {
  if (key === "legacy") return KIND_LABEL.legacy;
  const [format, kind] = key.split(":") as [Format, RunKind];
  return `${FORMAT_LABEL[format]}: ${KIND_LABEL[kind]}`;
}

/** The issue's aims on this machine (default workload), per column. */
function aim(key: string, figure: "bound" | "legacy" | "wall"): { text: string; ok: (x: number) => boolean } | null {
  if (figure === "wall" && key.endsWith(":warm")) return { text: "≤ 0.5 s", ok: (x) => x <= 0.5 };
  if (figure === "bound" && key === "image:cold_parallel") return { text: "≤ 1.15", ok: (x) => x <= 1.15 };
  if (figure === "bound" && (key === "archive:cold_parallel" || key === "archive-zst:cold_parallel")) return { text: "≤ 1.3", ok: (x) => x <= 1.3 };
  if (figure === "bound" && key.endsWith(":version_change")) return { text: "≤ 1.1", ok: (x) => x <= 1.1 };
  if (figure === "legacy" && key === "image:cold_parallel") return { text: "≥ 2", ok: (x) => x >= 2 };
  return null;
}

function withAim(s: Stat | null | undefined, digits: number, a: ReturnType<typeof aim>): string {
  const text = fmt(s, digits);
  return a && s ? `${text} ${a.ok(s.median) ? "✓" : "✗"} (aim ${a.text})` : text;
}

function columnsOf(result: BenchResult, block: string): string[] {
  const present = new Set(result.runs.filter((r) => blockKey(r) === block).map(columnKey));
  const order = ["legacy", ...FORMATS.flatMap((f) => RUN_KINDS.filter((k) => k !== "legacy").map((k) => `${f}:${k}`))];
  return order.filter((k) => present.has(k));
}

export function markdown(result: BenchResult): string {
  const { settings, summary, workload } = result;
  const lines: string[] = [];
  lines.push(
    `# Bootstrap benchmark ${settings.smoke ? "(smoke)" : ""}${settings.partial ? " (partial: written after a host's runs, the run went on)" : ""}`.trim(),
    "",
  );
  lines.push(
    `\`${settings.command}\` — ${result.started_at} — ${settings.runs} run(s) per kind and block, scale ${settings.scale}, ` +
      `first-byte latency ${settings.latency_ms} ms${settings.xz_at_start ? ", xz in the host from the start" : ""}` +
      `, apt ${settings.apt_source === "cache" ? "through the local cache at the block's bandwidth" : "from the mirror, not limited"}` +
      `${settings.image_level ? `, images at zstd level ${settings.image_level}` : ""}` +
      `${settings.zstd_level ? `, .tar.zst at zstd level ${settings.zstd_level}` : ""}; ` +
      `${settings.machine.cpus} CPUs, Linux ${settings.machine.kernel}, Node ${settings.machine.node}.`,
    "",
  );
  const bundles = workload.bundles.map(
    (b) =>
      `${b.artifact} ${(b.size_bytes / 1e6).toFixed(1)} MB .tar.xz${b.zst_bytes ? ` / ${(b.zst_bytes / 1e6).toFixed(1)} MB .tar.zst` : ""}` +
      `${b.image_bytes ? ` / ${(b.image_bytes / 1e6).toFixed(1)} MB image` : ""} (${b.ratio.toFixed(1)}x, ${b.files} files)`,
  );
  lines.push(
    `Workload: ${bundles.join(", ")}; node ${workload.node.version} ${(workload.node.size_bytes / 1e6).toFixed(1)} MB; ` +
      `apt: ${workload.apt_packages.join(" ")}.`,
    "",
    "Each figure: median (min–max) over the runs. Lower bound = max(bytes ÷ bandwidth, longest chain of isolated costs, " +
      "isolated CPU-seconds ÷ cores); each isolated cost is the minimum over the block's iterations (wall and CPU separately), " +
      "a download's wall floored at bytes ÷ bandwidth (see the README).",
    "",
  );
  for (const h of result.headline) {
    const block = h.block;
    const cols = columnsOf(result, block);
    const sum = summary[block] ?? {};
    lines.push(`## ${h.bandwidth_mb_per_s > 0 ? `${h.bandwidth_mb_per_s} MB/s` : "unlimited bandwidth"}, hosts on ${fsLabel(h.fs as Block["fs"])}`, "");
    lines.push("| run | wall (s) | lower bound (s) | wall ÷ lower bound | legacy ÷ new | serial ÷ parallel |", "|---|---|---|---|---|---|");
    for (const c of cols) {
      const s = sum[c] ?? {};
      const format = c.split(":")[0] as Format;
      const legacy = c.endsWith(":cold_parallel") ? withAim(h.legacy_over_new[format], 2, aim(c, "legacy")) : "";
      const serial = c.endsWith(":cold_serial") ? fmt(h.serial_over_parallel[format], 2) : "";
      const binding = boundBinding(result.runs, block, c);
      lines.push(
        `| ${columnLabel(c)} | ${withAim(s.wall_s, c.endsWith(":warm") ? 2 : 1, aim(c, "wall"))} | ${fmt(s.lower_bound_s, 1)}${binding ? ` (${binding})` : ""} | ` +
          `${withAim(s.wall_over_bound, 2, aim(c, "bound"))} | ${legacy} | ${serial} |`,
      );
    }
    const iso = result.isolated.filter((x) => blockKey(x) === block);
    const costs = (result.isolated_min ?? []).find((x) => x.block === block);
    if (iso.length && costs) {
      lines.push(
        "",
        `Isolated costs (each piece alone on the legacy host; CPU = user + system of the process and its reaped children). ` +
          `The bounds use the minimum over ${iso.length} iteration(s), wall and CPU separately:`,
        "",
      );
      lines.push(isolatedTable(iso, costs, h.bandwidth_mb_per_s));
      for (const w of costs.warnings) lines.push("", `**Warning**: ${w}.`);
    }
    lines.push("", "<details><summary>All figures</summary>", "");
    lines.push(`| figure | ${cols.map(columnLabel).join(" | ")} |`);
    lines.push(`|---|${cols.map(() => "---").join("|")}|`);
    for (const f of FIGURES) {
      if (f.optional && cols.every((c) => !sum[c]?.[f.key])) continue;
      const unit = f.unit ? ` (${f.unit})` : "";
      lines.push(`| ${f.label}${unit} | ${cols.map((c) => fmt(sum[c]?.[f.key], f.digits)).join(" | ")} |`);
    }
    lines.push("", "</details>", "");
    lines.push(noiseNote(result, block), "");
  }
  const cold = medianRun(
    result.runs.filter((r) => blockKey(r) === result.headline[0]?.block),
    "cold_parallel",
  );
  if (cold) {
    lines.push(`## Critical path (diagnostic) of the median cold parallel run (${cold.format}, #${cold.iteration})`, "");
    lines.push(cold.critical_path.map((n) => `${n} ${cold.steps.find((s) => s.name === n)?.duration_s.toFixed(1)} s`).join(" → "));
    lines.push("", "![waterfall](waterfall-cold-parallel.svg)");
  }
  lines.push("");
  return lines.join("\n");
}

/** The term that set the bound in most of the column's runs. */
function boundBinding(runs: readonly RunRecord[], block: string, column: string): string {
  const counts = new Map<string, number>();
  for (const r of runs) {
    if (blockKey(r) !== block || columnKey(r) !== column || !r.lower_bound || r.lower_bound.binding === "none") continue;
    const text = r.lower_bound.binding === "chain" ? `chain: ${r.lower_bound.chain.join(" → ")}` : r.lower_bound.binding;
    counts.set(text, (counts.get(text) ?? 0) + 1);
  }
  return [...counts.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] ?? "";
}

function isolatedTable(iso: readonly IsolatedCosts[], costs: BlockCosts, bandwidthMBps: number): string {
  const names = [...new Set(iso.flatMap((x) => x.pieces.map((p) => p.name)))];
  const rows = [
    "| piece | wall (s), min: used | wall (s), median (min–max) | CPU (s), min: used | CPU (s), median (min–max) | of which system (s) | link floor (s) |",
    "|---|---|---|---|---|---|---|",
  ];
  for (const n of names) {
    const ps = iso.map((x) => x.pieces.find((p) => p.name === n)).filter((p) => p !== undefined);
    const min = costs.pieces.find((p) => p.name === n);
    const floor = min && isDownload(min) && min.bytes && bandwidthMBps > 0 ? (min.bytes / (bandwidthMBps * 1e6)).toFixed(1) : "";
    rows.push(
      `| ${n} | ${min ? min.wall_s.toFixed(1) : "–"} | ${fmt(stat(ps.map((p) => p.wall_s)), 1)} | ${min ? (min.user_s + min.sys_s).toFixed(1) : "–"} | ` +
        `${fmt(stat(ps.map((p) => p.user_s + p.sys_s)), 1)} | ${min ? min.sys_s.toFixed(1) : "–"} | ${floor} |`,
    );
  }
  rows.push(`| (legacy flow, whole) | | ${fmt(stat(iso.map((x) => x.legacy_wall_s)), 1)} | | | | |`);
  return rows.join("\n");
}

function noiseNote(result: BenchResult, block: string): string {
  const mine = result.runs.filter((r) => blockKey(r) === block);
  const load = stat(mine.map((r) => r.noise.loadavg_1m));
  const notOurs = stat(mine.map((r) => r.cpu.not_ours_fraction));
  const busy = stat(mine.map((r) => r.cpu.cores_busy));
  const cpu = stat(mine.map((r) => r.noise.cpu_probe_ms));
  const disk = stat(mine.map((r) => r.noise.disk_probe_ms));
  const cols = columnsOf(result, block);
  const spreads = cols.map((c) => [c, result.summary[block]?.[c]?.wall_s] as const).filter(([, s]) => s && s.n > 1);
  const parts = [
    `Machine during the runs: cores busy ${fmt(busy, 2)}, share of the machine's CPU-seconds that was not ours ${fmt(notOurs, 2)}, ` +
      `load average at run start ${fmt(load, 1)} on ${result.settings.machine.cpus} CPUs.`,
    `CPU probe ${fmt(cpu, 0)} ms, disk probe ${fmt(disk, 0)} ms.`,
  ];
  if (spreads.length) parts.push(`Wall-time spread (max − min) ÷ median: ${spreads.map(([c, s]) => `${columnLabel(c)} ${pct(s!.spread)}`).join(", ")}.`);
  else parts.push("One run per kind: no spread to report (use --runs 3 or more).");
  return parts.join(" ");
}

function pct(x: number | undefined): string {
  return x === undefined ? "–" : `${(x * 100).toFixed(0)}%`;
}

/** The run whose wall time is the median of its kind (lower middle for even counts); archives first. */
export function medianRun(runs: readonly RunRecord[], kind: RunKind, format?: Format): RunRecord | null {
  const pick = format ?? (runs.some((r) => r.kind === kind && r.format === "archive") ? "archive" : "image");
  const mine = runs.filter((r) => r.kind === kind && r.format === pick).sort((a, b) => a.wall_s - b.wall_s);
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

/** waterfall-<kind><suffix>.svg per format. */
export const WATERFALL_SUFFIX: Record<Format, string> = { archive: "", "archive-zst": "-zst", image: "-images" };

/** Write result.json, result.md and the waterfalls into `dir`; returns the Markdown. */
export function writeResults(dir: string, result: BenchResult): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "result.json"), `${JSON.stringify(result, null, 2)}\n`);
  const md = markdown(result);
  writeFileSync(join(dir, "result.md"), md);
  for (const kind of ["cold_parallel", "cold_serial"] as const) {
    for (const format of FORMATS) {
      // the first block's runs (the default: 50 MB/s on the root fs)
      const first = result.runs.filter((r) => blockKey(r) === result.headline[0]?.block);
      const run = medianRun(first, kind, format);
      if (!run) continue;
      const n = first.filter((r) => r.kind === kind && r.format === format).length;
      const title = `${KIND_LABEL[kind]} bootstrap (${FORMAT_LABEL[format]}), run #${run.iteration}, ${run.bandwidth_mb_per_s} MB/s, ${run.fs} fs (median wall of ${n})`;
      const svg = waterfallSvg(run, title);
      writeFileSync(join(dir, `waterfall-${kind.replace("_", "-")}${WATERFALL_SUFFIX[format]}.svg`), svg);
    }
  }
  return md;
}
