/**
 * The progress page, in the browser: fetch `status`, then follow `stream`
 * (server-sent `status` events) and redraw. A one-second tick keeps running
 * bars, the ETA and the silence note moving between events.
 */
import type { HostStatus, StepStatus } from "../status-types.js";

const SVG_NS = "http://www.w3.org/2000/svg";

let current: HostStatus | null = null;
// Local time when `current` arrived; maps the host clock onto "now".
let receivedAt = 0;

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`missing #${id}`);
  return e as T;
}

function fmtDuration(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return "";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  const r = Math.round(s % 60);
  return m < 60 ? `${m} min ${r} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** The host clock now, estimated from the last event's time. */
function hostNow(s: HostStatus): number | null {
  if (s.last_event_ts === null) return null;
  return s.ended_ts ?? s.last_event_ts + Math.max(0, Date.now() / 1000 - receivedAt);
}

function stepLabel(st: StepStatus, now: number | null): string {
  if (st.state === "running" && st.started_ts !== null && now !== null) return `running · ${fmtDuration(now - st.started_ts)}`;
  if (st.duration_s !== null) return `${st.state} · ${fmtDuration(st.duration_s)}`;
  return st.state;
}

function renderSteps(s: HostStatus, now: number | null): void {
  const list = el("steps");
  const items = s.steps.map((st) => {
    const li = document.createElement("li");
    li.dataset.step = st.name;
    li.dataset.state = st.state;
    const dot = document.createElement("span");
    dot.className = "dot";
    const name = document.createElement("span");
    name.className = "step-name";
    name.textContent = st.name;
    if (st.hint) name.title = st.hint;
    const state = document.createElement("span");
    state.className = "step-state";
    state.textContent = stepLabel(st, now);
    li.append(dot, name, state);
    return li;
  });
  if (items.length === 0) {
    const li = document.createElement("li");
    li.textContent = "no steps reported yet";
    items.push(li);
  }
  list.replaceChildren(...items);
}

const STATE_COLORS: Record<string, string> = {
  running: "#1565c0",
  changed: "#2e7d32",
  unchanged: "#66bb6a",
  failed: "#c62828",
  blocked: "#9e9e9e",
  pending: "#e5e7eb",
};

function svgEl(tag: string, attrs: Record<string, string | number>): SVGElement {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/** A round tick interval giving at most about 8 ticks over `span` seconds. */
function niceTick(span: number): number {
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
  return steps.find((t) => span / t <= 8) ?? 7200;
}

function fmtTick(s: number): string {
  return s < 60 ? `${s}s` : s % 60 === 0 ? `${s / 60}m` : `${Math.floor(s / 60)}m${s % 60}s`;
}

/** A waterfall: one row per step, a bar from its start to its end (or now). */
function renderWaterfall(s: HostStatus, now: number | null): void {
  const svg = el("waterfall") as unknown as SVGSVGElement;
  const labelW = 150;
  const rowH = 20;
  const width = Math.max(400, svg.clientWidth || 900);
  const t0 = s.started_ts ?? Math.min(...s.steps.map((st) => st.started_ts ?? Infinity));
  const end = Math.max(now ?? 0, ...s.steps.map((st) => st.ended_ts ?? 0));
  const span = Number.isFinite(t0) ? Math.max(1, end - t0) : 1;
  const plotW = width - labelW - 60;
  const x = (t: number) => labelW + ((t - t0) / span) * plotW;
  const height = 24 + Math.max(1, s.steps.length) * rowH;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", String(height));
  const nodes: SVGElement[] = [];
  const tick = niceTick(span);
  for (let dt = 0; dt <= span + 1e-9 && Number.isFinite(t0); dt += tick) {
    const tx = x(t0 + dt);
    nodes.push(svgEl("line", { x1: tx, x2: tx, y1: 14, y2: height, stroke: "#e5e7eb" }));
    const label = svgEl("text", { x: tx, y: 10, "text-anchor": "middle" });
    label.textContent = dt === 0 ? "0" : fmtTick(dt);
    nodes.push(label);
  }
  s.steps.forEach((st, i) => {
    const y = 20 + i * rowH;
    const name = svgEl("text", { x: 0, y: y + 13 });
    name.textContent = st.name;
    nodes.push(name);
    if (st.started_ts === null || !Number.isFinite(t0)) return;
    const stop = st.ended_ts ?? now ?? st.started_ts;
    const took = st.duration_s ?? stop - st.started_ts;
    const bx = x(st.started_ts);
    const bw = Math.max(2, x(stop) - bx);
    const bar = svgEl("rect", { x: bx, y: y + 3, width: bw, height: rowH - 6, rx: 3, fill: STATE_COLORS[st.state] ?? "#999" });
    bar.setAttribute("data-step", st.name);
    const title = svgEl("title", {});
    title.textContent = `${st.name}: ${stepLabel(st, now)}`;
    bar.append(title);
    nodes.push(bar);
    const dur = svgEl("text", { x: bx + bw + 4, y: y + 13 });
    dur.textContent = fmtDuration(took);
    nodes.push(dur);
  });
  svg.replaceChildren(...nodes);
}

function renderFailure(s: HostStatus): void {
  const box = el("failure");
  const f = s.failure;
  box.hidden = f === null;
  if (!f) return;
  el("failure-step").textContent = f.step ?? "an unknown step";
  el("failure-message").textContent = f.message ?? "";
  el("failure-hint").textContent = f.hint ? `Hint: ${f.hint}` : "";
  const tail = el("log-tail");
  tail.textContent = f.log_tail ?? "";
  tail.hidden = !f.log_tail;
}

function renderClock(s: HostStatus): void {
  const now = hostNow(s);
  const elapsed = Date.now() / 1000 - receivedAt;
  const eta = s.eta_s === null ? null : Math.max(0, s.eta_s - elapsed);
  el("eta").textContent = s.state === "running" && eta !== null ? `about ${fmtDuration(eta)} left` : s.wall_s !== null ? `took ${fmtDuration(s.wall_s)}` : "";
  const silent = s.silent_s === null ? null : s.silent_s + elapsed;
  el("silence").textContent = s.state === "stale" ? `No news from the host for ${fmtDuration(silent)}; it may still be working.` : "";
  renderSteps(s, now);
  renderWaterfall(s, now);
}

function render(s: HostStatus): void {
  current = s;
  receivedAt = Date.now() / 1000;
  const state = el("state");
  state.textContent = s.state;
  state.className = `badge ${s.state}`;
  el("run").textContent = s.run_id ? `run ${s.run_id}${s.version ? ` · bootstrap.py ${s.version}` : ""}` : "no run yet";
  el("phase").textContent = s.phase;
  el("percent").textContent = `${Math.round(s.percent)}%`;
  const bar = el("bar");
  bar.className = `bar ${s.state}`;
  (bar.firstElementChild as HTMLElement).style.width = `${s.percent}%`;
  renderFailure(s);
  el("meta").textContent =
    `${s.events} events${s.missing_seqs ? ` (${s.missing_seqs} not arrived yet)` : ""} · ${s.runs} run${s.runs === 1 ? "" : "s"} · updated ${new Date(s.generated_at * 1000).toLocaleTimeString()}`;
  document.title = `${Math.round(s.percent)}% ${s.state} · bootstrap`;
  renderClock(s);
}

async function main(): Promise<void> {
  try {
    const res = await fetch("status", { cache: "no-store" });
    if (res.ok) render((await res.json()) as HostStatus);
    else el("phase").textContent = `Cannot load status: HTTP ${res.status}`;
  } catch (err) {
    el("phase").textContent = `Cannot load status: ${String(err)}`;
  }
  const stream = new EventSource("stream");
  stream.addEventListener("status", (e) => render(JSON.parse((e as MessageEvent<string>).data) as HostStatus));
  setInterval(() => {
    if (current) renderClock(current);
  }, 1000);
}

void main();
