/** Host records, site settings and events for the tests. */
import { randomUUID } from "node:crypto";
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import type { HostRecordInput, SiteSettingsInput } from "../../cloud/bootstrap/hosts.js";

export function hostRecord(over: Partial<HostRecordInput> = {}): HostRecordInput {
  const id = over.id ?? randomUUID();
  return {
    id,
    name: `host-${id.slice(0, 8)}`,
    region: "us-west1",
    runtime_user: "ubuntu",
    arch: "amd64",
    disk_size_gb: 100,
    public_url: "https://host.example.com",
    internal_url: "http://127.0.0.1:9002",
    ...over,
  };
}

export function siteSettings(softwareBaseUrl: string, over: Partial<SiteSettingsInput> = {}): SiteSettingsInput {
  return {
    software_base_url: softwareBaseUrl,
    bootstrap_url: "http://127.0.0.1:9/bootstrap",
    hub_url: "https://hub.example.com",
    conat_urls: ["https://hub.example.com/conat"],
    node_version: "20.18.1",
    secret_names: ["conat-password"],
    ...over,
  };
}

export const PLAN = [
  { name: "preflight", deps: [], weight: 1 },
  { name: "apt", deps: ["preflight"], weight: 30 },
  { name: "download.project_host", deps: ["preflight"], weight: 10 },
  { name: "node", deps: ["preflight"], weight: 10 },
  { name: "install", deps: ["apt", "download.project_host", "node"], weight: 5 },
  { name: "services", deps: ["install"], weight: 4 },
];

/** Events of one run, numbered from 0, one second apart from `t0`. */
export class RunScript {
  readonly events: BootstrapEventInput[] = [];
  private t: number;

  constructor(
    readonly runId = `run-${randomUUID().slice(0, 12)}`,
    t0 = 1_750_000_000,
  ) {
    this.t = t0;
  }

  private push(e: Record<string, unknown>, dt = 1): BootstrapEventInput {
    const ev = { run_id: this.runId, seq: this.events.length, ts: this.t, ...e } as BootstrapEventInput;
    this.t += dt;
    this.events.push(ev);
    return ev;
  }

  /** Let `seconds` pass before the next event. */
  wait(seconds: number): this {
    this.t += seconds;
    return this;
  }

  start(steps = PLAN): this {
    this.push({ type: "run_start", version: "0.1.0", parallel: true, steps });
    return this;
  }
  stepStart(step: string): this {
    this.push({ type: "step_start", step });
    return this;
  }
  stepEnd(step: string, outcome: "changed" | "unchanged" | "failed" | "blocked", duration = 1, extra: Record<string, unknown> = {}): this {
    this.push({ type: "step_end", step, outcome, duration_s: duration, ...extra });
    return this;
  }
  progress(phase: string, percent: number): this {
    this.push({ type: "progress", phase, percent });
    return this;
  }
  end(ok: boolean, extra: Record<string, unknown> = {}): this {
    this.push({ type: "run_end", ok, wall_s: this.events.length, ...extra });
    return this;
  }
}
