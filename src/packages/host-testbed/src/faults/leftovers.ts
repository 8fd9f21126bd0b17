/**
 * "Nothing left over": after a fault and the run that converged, the host
 * holds nothing of ours that a finished clean run would not: no `.part`,
 * staging, temporary or scratch file, no half-installed version behind a
 * `current` link, dpkg consistent, apt's timers and man-db's trigger as
 * they were found, one tagged fstab line, and the hub's record of the run
 * complete and in order. Also: every event the hub holds is the host's own
 * (never a sequence number reused for other content).
 */
import { readdirSync } from "node:fs";
import type { BootstrapConfig } from "@cocalc/project-host-bootstrap";
import { expect } from "../expect.js";
import type { ThrowawayHost } from "../host.js";
import type { ProvisionedTestHost } from "../testbed.js";

export const APT_TIMERS = ["apt-daily.timer", "apt-daily-upgrade.timer"];
export const MAN_DB_AUTO_UPDATE = "/var/lib/man-db/auto-update";

/** What the host looked like before the first run: the things a run must put back. */
export interface FoundState {
  timers: Record<string, string>;
  unattendedUpgrades: string;
  manDbAutoUpdate: boolean;
}

export async function foundState(host: ThrowawayHost): Promise<FoundState> {
  const timers: Record<string, string> = {};
  for (const t of APT_TIMERS) timers[t] = (await host.exec(["systemctl", "is-active", t], { allowFailure: true })).stdout.trim();
  const uu = (await host.exec(["systemctl", "is-active", "unattended-upgrades.service"], { allowFailure: true })).stdout.trim();
  const manDb = (await host.exec(["test", "-e", MAN_DB_AUTO_UPDATE], { allowFailure: true })).code === 0;
  return { timers, unattendedUpgrades: uu, manDbAutoUpdate: manDb };
}

/** Files of ours that only a killed run leaves (find -print, one per line). */
export async function debrisOnHost(host: ThrowawayHost, c: BootstrapConfig): Promise<string[]> {
  const root = c.bootstrap_root;
  const script = [
    // downloads in progress, staging directories, atomic-write temporaries, symlink temporaries
    `find ${root} ${c.home}/.nvm -xdev \\( -name '*.part' -o -name '.staging-*' -o -name '.*.tmp' -o -name '.current-*' -o -name '.bootstrap-log.fifo' \\) -print 2>/dev/null`,
    // write_root_file's temporaries beside the files it replaces, and its sources in /tmp
    `find /etc -xdev -name '.*.tmp' -print 2>/dev/null`,
    `find /tmp /var/tmp -maxdepth 1 \\( -name 'cocalc-bootstrap-*' -o -name 'tmp*' \\) -user ${c.bootstrap_user} -print 2>/dev/null`,
    `find /tmp /var/tmp -maxdepth 1 -name 'cocalc-bootstrap-*' -print 2>/dev/null`,
    // the record of apt's timers a killed run stopped
    `ls -d ${c.bootstrap_dir}/apt-quiesced.json 2>/dev/null`,
    "true",
  ].join("; ");
  const out = await host.sh(script);
  return [...new Set(out.split("\n").filter((l) => l.trim() !== ""))].sort();
}

/** Every check of "nothing left over"; call after the end-state checks of a clean run. */
export async function expectNothingLeftOver(host: ThrowawayHost, prov: ProvisionedTestHost, found: FoundState): Promise<void> {
  const c = prov.config;
  expect(await debrisOnHost(host, c), "debris of a killed run").toEqual([]);

  // the secrets: on /btrfs, nothing left in the staging directory
  const staged = await host.sh(`find ${c.bootstrap_dir}/secrets-staging -type f 2>/dev/null; true`);
  expect(staged.trim(), "secrets still staged outside /btrfs").toBe("");

  // every `current` points to a complete version (its install marker is there)
  for (const a of ["project_host", "project", "tools"] as const) {
    const dir = `${c.bootstrap_root}/bundles/${a}`;
    const target = (await host.sh(`readlink ${dir}/current`)).trim();
    expect(target, `${a}: current`).toBe(c.artifacts[a].version);
    const marker = await host.exec(["test", "-f", `${dir}/${target}/.bootstrap-installed.json`], { allowFailure: true });
    expect(marker.code, `${a}/${target} has no install marker (half-installed)`).toBe(0);
    // no other version directories than the current one (an interrupted install leaves none)
    const versions = (await host.sh(`ls -A ${dir}`)).split("\n").filter((l) => l && l !== "current");
    expect(versions, `${a}: version directories`).toEqual([target]);
  }

  // dpkg consistent: nothing half-installed or pending, no journal of an interrupted run
  expect((await host.exec(["dpkg", "--audit"], { allowFailure: true })).stdout.trim(), "dpkg --audit").toBe("");
  expect((await host.sh("ls -A /var/lib/dpkg/updates")).trim(), "/var/lib/dpkg/updates").toBe("");

  // apt's timers, unattended-upgrades and man-db's trigger as found
  expect(await foundState(host), "apt timers / unattended-upgrades / man-db as found").toEqual(found);

  // exactly one tagged fstab line (and one marker comment)
  const fstab = host.readFile("/etc/fstab").split("\n");
  expect(
    fstab.filter((l) => l.includes("x-cocalc-bootstrap") && !l.trimStart().startsWith("#")),
    "tagged fstab lines",
  ).toHaveLength(1);
  expect(fstab.filter((l) => l.startsWith("# cocalc-bootstrap:")).length, "fstab marker comments").toBeLessThanOrEqual(1);
}

export interface HubEvent {
  run_id: string;
  seq: number;
  type: string;
  body: Record<string, unknown>;
}

/** The host's events as the hub stored them, per run, ordered by seq. */
export async function hubEvents(prov: ProvisionedTestHost): Promise<Map<string, HubEvent[]>> {
  const rows = await prov.hub.db.query<{ run_id: string; seq: number; type: string; body: Record<string, unknown> }>(
    "SELECT run_id, seq, type, body FROM bootstrap_events WHERE host_id = $1 ORDER BY run_id, seq",
    [prov.hostId],
  );
  const out = new Map<string, HubEvent[]>();
  for (const r of rows) {
    const list = out.get(r.run_id) ?? [];
    list.push({ run_id: r.run_id, seq: Number(r.seq), type: r.type, body: r.body });
    out.set(r.run_id, list);
  }
  return out;
}

/**
 * The hub's record: the last run `done`, and every run's events numbered
 * 0..n-1 without a gap (a killed run's tail may be missing, never its middle).
 */
export async function expectHubRecordComplete(prov: ProvisionedTestHost, lastRunId: string): Promise<void> {
  const runs = await hubEvents(prov);
  for (const [run, events] of runs) {
    expect(
      events.map((e) => e.seq),
      `run ${run}: sequence numbers`,
    ).toEqual(events.map((_, i) => i));
  }
  const last = runs.get(lastRunId) ?? [];
  expect(last.length, `the hub has no events of the last run ${lastRunId}`).toBeGreaterThan(0);
  expect(last[0]!.type).toBe("run_start");
  expect(last.at(-1)!.type).toBe("run_end");
  expect(last.at(-1)!.body.ok).toBe(true);
}

/** The host's spooled events (files that are still there), per run. */
export function spooledEvents(host: ThrowawayHost, c: BootstrapConfig): Map<string, Record<string, unknown>[]> {
  const out = new Map<string, Record<string, unknown>[]>();
  let names: string[] = [];
  try {
    names = readdirSync(host.path(`${c.bootstrap_dir}/events`)).filter((n) => n.endsWith(".jsonl"));
  } catch {
    return out;
  }
  for (const n of names) {
    const events: Record<string, unknown>[] = [];
    for (const line of host.readFile(`${c.bootstrap_dir}/events/${n}`).split("\n")) {
      if (!line.trim()) continue;
      try {
        events.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        break; // a torn last line
      }
    }
    out.set(n.replace(/\.jsonl$/, ""), events);
  }
  return out;
}

/**
 * Every event the hub holds for a run whose spool the host still has is,
 * byte for byte, the host's event with that seq: the hub never got an event
 * the host later lost (synced before sent), and no seq was reused.
 */
export async function expectHubMatchesSpool(host: ThrowawayHost, prov: ProvisionedTestHost): Promise<{ runs: number; compared: number }> {
  const spool = spooledEvents(host, prov.config);
  const hub = await hubEvents(prov);
  let compared = 0;
  for (const [run, hostEvents] of spool) {
    const bySeq = new Map(hostEvents.map((e) => [e.seq as number, e]));
    for (const e of hub.get(run) ?? []) {
      const mine = bySeq.get(e.seq);
      expect(mine, `run ${run} seq ${e.seq}: the hub has it (${e.type}), the host's spool lost it`).toBeDefined();
      expect(e.body, `run ${run} seq ${e.seq}: the hub's content differs from the host's`).toEqual(mine);
      compared++;
    }
  }
  return { runs: spool.size, compared };
}
