/**
 * The fleet page, in the browser: fetch `status` (with this page's query
 * string: window_s, limit) every few seconds and redraw both tables. Text
 * only ever goes in through textContent.
 */
import type { FleetHost, FleetStep, FleetView } from "../fleet-types.js";

const REFRESH_MS = 5000;

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`missing #${id}`);
  return e as T;
}

function fmtDuration(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return "–";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  const h = Math.floor(m / 60);
  return h < 48 ? `${h} h ${m % 60} min` : `${Math.floor(h / 24)} d ${h % 24} h`;
}

function cell(text: string, className = ""): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function hostRow(h: FleetHost): HTMLTableRowElement {
  const tr = document.createElement("tr");
  tr.dataset.host = h.host_id;
  tr.dataset.state = h.state;
  const name = document.createElement("td");
  const link = document.createElement("a");
  link.href = `../hosts/${encodeURIComponent(h.host_id)}/`;
  link.textContent = h.name ?? h.host_id;
  link.title = h.host_id;
  name.append(link);
  const state = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = `badge ${h.state}`;
  badge.textContent = h.state;
  state.append(badge);
  const phase = cell(h.phase, "phase");
  const percent = document.createElement("td");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(100, h.percent))}%`;
  bar.append(fill);
  percent.append(bar, document.createTextNode(`${h.percent.toFixed(0)}%`));
  percent.className = "percent";
  tr.append(name, state, phase, percent, cell(fmtDuration(h.age_s), "age"), cell(h.silent_s === null ? "–" : `${fmtDuration(h.silent_s)} ago`, "silent"));
  return tr;
}

function stepRow(s: FleetStep, slowest: number): HTMLTableRowElement {
  const tr = document.createElement("tr");
  tr.dataset.step = s.step;
  const spark = document.createElement("td");
  const scale = (v: number) => `${slowest > 0 ? Math.max(1, Math.round((160 * v) / slowest)) : 1}px`;
  const p50 = document.createElement("span");
  p50.className = "spark p50";
  p50.style.width = scale(s.p50_s);
  const p95 = document.createElement("span");
  p95.className = "spark";
  p95.style.width = scale(Math.max(0, s.p95_s - s.p50_s));
  spark.append(p50, p95);
  tr.append(
    cell(s.step, "mono"),
    cell(String(s.runs), "runs"),
    cell(fmtDuration(s.p50_s), "p50"),
    cell(fmtDuration(s.p95_s), "p95"),
    cell(fmtDuration(s.max_s), "max"),
    cell(String(s.failed), "failed"),
    cell(String(s.changed + s.failed), "work-runs"),
    cell(fmtDuration(s.work_p50_s), "work-p50"),
    cell(fmtDuration(s.work_p95_s), "work-p95"),
    spark,
  );
  return tr;
}

function render(v: FleetView): void {
  const c = v.counts;
  const shown = v.hosts.length < v.hosts_total ? ` (showing ${v.hosts.length})` : "";
  el("summary").textContent =
    `${v.hosts_total} host${v.hosts_total === 1 ? "" : "s"}${shown}: ${c.failed} failed · ${c.stale} stale · ${c.running} running · ${c.pending} pending · ${c.done} done`;
  const hosts = el("hosts").querySelector("tbody")!;
  hosts.replaceChildren(...v.hosts.map(hostRow));
  if (v.hosts.length === 0) {
    const tr = document.createElement("tr");
    tr.append(cell("no hosts yet"));
    hosts.replaceChildren(tr);
  }
  el("window").textContent = `(p50 and p95 over the runs of the last ${fmtDuration(v.window_s)}; slowest p95 first)`;
  const slowest = Math.max(0, ...v.steps.map((s) => s.p95_s));
  const steps = el("steps").querySelector("tbody")!;
  steps.replaceChildren(...v.steps.map((s) => stepRow(s, slowest)));
  if (v.steps.length === 0) {
    const tr = document.createElement("tr");
    tr.append(cell("no step has ended in this window"));
    steps.replaceChildren(tr);
  }
  el("meta").textContent = `updated ${new Date(v.generated_at * 1000).toLocaleTimeString()}`;
}

async function refresh(): Promise<void> {
  try {
    const res = await fetch(`status${location.search}`, { cache: "no-store" });
    const body: unknown = await res.json();
    if (!res.ok) {
      el("meta").textContent = `the hub answered ${res.status}: ${(body as { error?: string }).error ?? ""}`;
      return;
    }
    render(body as FleetView);
  } catch (err) {
    el("meta").textContent = `cannot reach the hub (${String(err)}); retrying`;
  } finally {
    setTimeout(() => void refresh(), REFRESH_MS);
  }
}

void refresh();
