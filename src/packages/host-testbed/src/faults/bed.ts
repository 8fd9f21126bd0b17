/**
 * The testbed with faults: a fault proxy in front of the artifact server
 * and one in front of the hub (a hub variant whose artifact site and public
 * URL are the proxies'), and a runner that starts the stub in a throwaway
 * host and kills it (SIGKILL of its process tree, or a power cut) when a
 * trigger fires.
 */
import type { HostStatus } from "@cocalc/server";
import type { ThrowawayHost } from "../host.js";
import type { RunResult } from "../proc.js";
import { type ProvisionedTestHost, STUB_PATH, Testbed, type TestbedOptions } from "../testbed.js";
import { describeTrigger, fileSize, type KillPoint, killTree, makeTriggerPoll, newRecords, waitForTrigger } from "./kill.js";
import type { PowerCutDisk } from "./power.js";
import { type FaultProxy, startFaultProxy } from "./proxy.js";

export interface FaultRun {
  run: RunResult & { wallMs: number };
  /** The run id bootstrap.py logged (null when it never started). */
  runId: string | null;
  /** Set when the kill point fired: ms after the start, and what was killed. */
  killed: { afterMs: number; how: "sigkill" | "power"; processes: string[] } | null;
  /** The log records of this run (bootstrap.log). */
  records: Record<string, unknown>[];
  /** When the stub's process ended (ms since the epoch, this machine's clock = the host's). */
  exitAt: number;
}

export class FaultBed {
  private constructor(
    readonly bed: Testbed,
    /** In front of the artifact server: bundles, manifests, the Node.js mirror. */
    readonly art: FaultProxy,
    /** In front of the hub: the stub's downloads, events, secrets. */
    readonly hubProxy: FaultProxy,
  ) {}

  static async start(opts: TestbedOptions = {}): Promise<FaultBed> {
    const bed = await Testbed.start(opts);
    const art = await startFaultProxy({ upstream: bed.artifactServer.url });
    const hubProxy = await startFaultProxy();
    return new FaultBed(bed, art, hubProxy);
  }

  /** Provision `host` at the proxied hub (serial or parallel). */
  async provision(host: ThrowawayHost, opts: { parallel?: boolean } = {}): Promise<ProvisionedTestHost> {
    const variant = { parallel: opts.parallel ?? true, artifactUrl: this.art.url, publicUrl: this.hubProxy.url };
    const hub = await this.bed.hubFor(variant);
    this.hubProxy.setUpstream(hub.url);
    const p = await this.bed.provision(host, variant);
    // the hub's own URLs (status, page) are the proxy's; the tests read them directly
    const direct = (u: string) => u.replace(this.hubProxy.url, hub.url);
    return { ...p, pageUrl: direct(p.pageUrl), statusUrl: direct(p.statusUrl) };
  }

  status(p: ProvisionedTestHost): Promise<HostStatus> {
    return this.bed.status(p);
  }

  settledStatus(p: ProvisionedTestHost, timeoutMs?: number): Promise<HostStatus> {
    return this.bed.settledStatus(p, timeoutMs);
  }

  /**
   * Run the stub; with `kill`, wait for its trigger and kill the run then
   * (SIGKILL of the tree, or a power cut through `disk`). A trigger that
   * never fires before the run ends leaves `killed` null.
   */
  async run(
    host: ThrowawayHost,
    p: ProvisionedTestHost,
    opts: { kill?: KillPoint; disk?: PowerCutDisk; log?: (l: string) => void; timeoutMs?: number } = {},
  ): Promise<FaultRun> {
    const logFile = `${p.config.bootstrap_root}/logs/bootstrap.log`;
    const offset = fileSize(host.path(logFile));
    const running = this.bed.bootstrap(host, p, { onOutput: opts.log, timeoutMs: opts.timeoutMs });
    let killed: FaultRun["killed"] = null;
    if (opts.kill) {
      const poll = makeTriggerPoll(opts.kill.trigger, {
        hostPath: (i) => host.path(i),
        logFile,
        logOffset: offset,
        init: () => host.pid1(),
        stubPath: STUB_PATH,
      });
      const at = await waitForTrigger(poll, running);
      if (at !== null) {
        const how = opts.kill.how ?? "sigkill";
        let processes: string[] = [];
        if (how === "power") {
          if (!opts.disk) throw new Error(`kill point ${opts.kill.name}: a power cut needs the host on a PowerCutDisk`);
          await opts.disk.cut(host);
        } else {
          processes = killTree(host.pid1(), STUB_PATH).map((x) => x.cmdline.slice(0, 120));
        }
        killed = { afterMs: at, how, processes };
        opts.log?.(
          `[fault] ${opts.kill.name}: ${how} ${describeTrigger(opts.kill.trigger)} after ${(at / 1000).toFixed(1)} s (${processes.length} processes)\n`,
        );
      }
    }
    const run = await running;
    const exitAt = Date.now();
    // after a power cut the log is on a disk that is not mounted: read it after power-on
    const records = killed?.how === "power" ? [] : (newRecords(host.path(logFile), offset) as Record<string, unknown>[]);
    const runId = (records.find((r) => typeof r.run_id === "string" && r.run_id) as { run_id?: string } | undefined)?.run_id ?? null;
    return { run, runId, killed, records, exitAt };
  }

  async close(): Promise<void> {
    await this.art.close();
    await this.hubProxy.close();
    await this.bed.close();
  }
}

/** Seconds from a run's first record to `step`'s step_end record in it (null when absent). */
export function stepDoneAfterS(records: Record<string, unknown>[], step: string): number | null {
  const first = records.find((r) => typeof r.ts === "string");
  const end = records.find((r) => r.event === "step_end" && r.step === step);
  if (!first || !end) return null;
  return (Date.parse(String(end.ts)) - Date.parse(String(first.ts))) / 1000;
}
