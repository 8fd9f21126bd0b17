/**
 * The fault suite: the bootstrap on throwaway hosts, broken the way a fleet
 * breaks it, and run again. Every case ends with the end-state checks of a
 * clean run (src/end-state.ts) and "nothing left over"
 * (src/faults/leftovers.ts).
 *
 * FAULTS=subset (the default, what .ci/run runs): 6 kill points (5 SIGKILLs
 * and a power cut) in one chain, the hub down from the moment the host has its
 * config and secrets to the end of a run, each kind of artifact fault, the apt
 * locks held 30 s, a full disk, the hub's 409 for a conflicting repeat.
 * FAULTS=full (`pnpm test:faults`): the whole matrix. FAULTS=off skips it
 * (said so); so does SKIP_E2E=1.
 *
 * A kill chain is one host bootstrapped with a kill at each of its points in
 * turn (a kill point is a step's start or a moment inside it), each next run
 * starting on what the last one left; after the last point the stub runs
 * once more and must converge. The report (stderr, and FAULTS_REPORT=<file>
 * as JSON) has every kill's recovery time: how long the next run took to get
 * past the killed step.
 */
import { copyFileSync, existsSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { watchArgv } from "../src/argv-watch.js";
import { testBundleSpecs } from "../src/artifacts.js";
import { expectBootstrappedHost, type Observed, outputOf } from "../src/end-state.js";
import { FaultBed, type FaultRun, stepDoneAfterS } from "../src/faults/bed.js";
import { APT_LISTS_LOCK, DPKG_LOCKS, fullFs, holdLocks, LOCK_HOLDER } from "../src/faults/inside.js";
import { fileSize, type KillPoint, makeTriggerPoll, newRecords, waitForTrigger } from "../src/faults/kill.js";
import {
  debrisOnHost,
  expectHubMatchesSpool,
  expectHubRecordComplete,
  expectNothingLeftOver,
  type FoundState,
  foundState,
  hubEvents,
} from "../src/faults/leftovers.js";
import { PowerCutDisk } from "../src/faults/power.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import { type ProvisionedTestHost, STUB_PATH } from "../src/testbed.js";

const MODE = (process.env.FAULTS ?? "subset").toLowerCase();
const FULL = MODE === "full";
const why = whyNotSupported();
const skipReason = process.env.SKIP_E2E === "1" ? "SKIP_E2E=1" : MODE === "off" || MODE === "0" ? `FAULTS=${process.env.FAULTS}` : null;
const log = (line: string) => process.stderr.write(`[faults] ${line}\n`);
if (skipReason) log(`skipping the fault suite: ${skipReason}${why ? ` (and ${why})` : ""}`);
else log(`fault suite: FAULTS=${FULL ? "full" : "subset"}`);

/** What the closing note's table is made of. */
interface Row {
  fault: string;
  cases: number;
  passed: number;
  notes: string[];
}
const report = {
  mode: FULL ? "full" : "subset",
  rows: new Map<string, Row>(),
  kills: [] as { chain: string; point: string; how: string; firedAfterS: number; recoveryS: number | null; debris: string[] }[],
  finalRunsS: [] as { chain: string; s: number }[],
  hubOutage: [] as { case: string; endDelayS: number; referenceEndDelayS: number | null; wallS: number }[],
  timings: {} as Record<string, number>,
};

function row(fault: string): Row {
  let r = report.rows.get(fault);
  if (!r) {
    r = { fault, cases: 0, passed: 0, notes: [] };
    report.rows.set(fault, r);
  }
  return r;
}

/** Count a case under `fault`; passed only if `body` does not throw. */
async function counted(fault: string, body: () => Promise<void>): Promise<void> {
  const r = row(fault);
  r.cases++;
  await body();
  r.passed++;
}

const median = (xs: number[]) => {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function linePrefixer(prefix: string): (chunk: string) => void {
  let partial = "";
  return (chunk) => {
    const lines = (partial + chunk).split("\n");
    partial = lines.pop() ?? "";
    for (const line of lines) process.stderr.write(`${prefix}${line}\n`);
  };
}

// -- kill points -------------------------------------------------------------------

const ARCHIVE = (artifact: string) => (c: ProvisionedTestHost["config"]) =>
  `${c.bootstrap_root}/bundles/.downloads/${artifact}-${c.artifacts[artifact as "project"].version}.tar.xz.part`;

function stagingUnder(dirOf: (c: ProvisionedTestHost["config"]) => string) {
  return (c: ProvisionedTestHost["config"]) => (hostPath: (i: string) => string) => {
    try {
      return readdirSync(hostPath(dirOf(c))).some((n) => n.startsWith(".staging-"));
    } catch {
      return false;
    }
  };
}

interface PointSpec {
  name: string;
  step: string;
  how?: "sigkill" | "power";
  /** Build the trigger for this host's config. */
  trigger: (c: ProvisionedTestHost["config"]) => KillPoint["trigger"];
  /** Artifact-proxy rule to hold the moment open (a download stalled halfway). */
  stall?: RegExp;
}

const STALL_AT = 256 * 1024;
const NODE_TARBALL = /node-v[^/]+-linux-[^/]+\.tar\.xz$/;

/** The artifact proxy is holding a download of `path` after STALL_AT bytes (set by the suite). */
let stalledNow: (path: RegExp) => boolean = () => false;

function startOf(step: string, how?: "sigkill" | "power"): PointSpec {
  return { name: `${step}:start`, step, how, trigger: () => ({ kind: "step-start", step }) };
}

const P = {
  aptUpdate: { name: "apt:apt-get update", step: "apt", trigger: () => ({ kind: "process", pattern: /apt-get .*\bupdate\b/ }) } as PointSpec,
  aptDpkg: { name: "apt:dpkg", step: "apt", trigger: () => ({ kind: "process", pattern: /\bdpkg .*--(unpack|configure)\b/ }) } as PointSpec,
  midDownload: (artifact: "project" | "tools" | "project_host", how?: "sigkill" | "power"): PointSpec => {
    const dash = artifact.replace("_", "-");
    const stall = new RegExp(`/${dash}/[^/]+/[^/]+\\.tar\\.xz$`); // <artifact>/<version>/<the real bundle's file name>
    return {
      name: `download_${artifact}:mid-download`,
      step: `download_${artifact}`,
      how,
      stall,
      trigger: (c) => ({
        kind: "file",
        describe: `${artifact}'s .part exists and the proxy holds its download at ${STALL_AT} bytes`,
        test: (hp) => existsSync(hp(ARCHIVE(artifact)(c))) && stalledNow(stall),
      }),
    };
  },
  nodeDownload: {
    name: "node:mid-download",
    step: "node",
    stall: NODE_TARBALL,
    trigger: (c) => ({
      kind: "file",
      describe: `node's .part exists and the proxy holds its download at ${STALL_AT} bytes`,
      test: (hp) => {
        try {
          const dir = `${c.bootstrap_root}/bundles/.downloads`;
          return readdirSync(hp(dir)).some((n) => n.startsWith("node-") && n.endsWith(".part")) && stalledNow(NODE_TARBALL);
        } catch {
          return false;
        }
      },
    }),
  } as PointSpec,
  nodeExtract: {
    name: "node:mid-extraction",
    step: "node",
    trigger: (c) => ({ kind: "file", describe: "node's staging directory exists", test: stagingUnder((c) => `${c.home}/.nvm/versions/node`)(c) }),
  } as PointSpec,
  midExtract: (artifact: "project" | "tools" | "project_host"): PointSpec => ({
    name: `install_${artifact}:mid-extraction`,
    step: `install_${artifact}`,
    trigger: (c) => ({
      kind: "file",
      describe: `${artifact}'s staging directory exists`,
      test: stagingUnder((c) => `${c.bootstrap_root}/bundles/${artifact}`)(c),
    }),
  }),
  mkfs: { name: "btrfs:mkfs", step: "btrfs", trigger: () => ({ kind: "process", pattern: /mkfs\.btrfs/ }) } as PointSpec,
  mount: { name: "btrfs:mount", step: "btrfs", trigger: () => ({ kind: "process", pattern: /(^|\/)mount \/btrfs|btrfs quota enable/ }) } as PointSpec,
  restart: (how?: "sigkill" | "power"): PointSpec => ({
    name: "service:restart",
    step: "service",
    how,
    trigger: () => ({ kind: "process", pattern: /systemctl (re)?start cocalc-project-host/ }),
  }),
  /** The service step waits for the daemon's health URL (~1-2 s): 60 % into it. */
  serviceMid: {
    name: "service:health-wait",
    step: "service",
    trigger: () => ({ kind: "step-fraction", step: "service", fraction: 0.6, expectedMs: 1000 }),
  } as PointSpec,
};

const ALL_STEPS = [
  "preflight",
  "directories",
  "files",
  "secrets",
  "apt",
  "download_project_host",
  "download_project",
  "download_tools",
  "node",
  "install_project_host",
  "install_project",
  "install_tools",
  "btrfs",
  "install_secrets",
  "service",
  "finalize",
];

interface Chain {
  name: string;
  parallel: boolean;
  points: PointSpec[];
  /** Set the host up before the first run. */
  prepare?: (host: ThrowawayHost) => Promise<void>;
}

const SUBSET_CHAIN: Chain = {
  name: "subset (serial)",
  parallel: false,
  points: [P.aptDpkg, P.midDownload("project"), P.midExtract("project"), P.mkfs, P.restart("power"), startOf("finalize")],
};

const FULL_CHAINS: Chain[] = [
  { name: "every step's start (serial)", parallel: false, points: ALL_STEPS.map((s) => startOf(s)) },
  {
    name: "inside the steps (serial)",
    parallel: false,
    points: [
      P.aptUpdate,
      P.aptDpkg,
      P.midDownload("project_host"),
      P.midDownload("tools"),
      P.nodeDownload,
      P.nodeExtract,
      P.midExtract("project_host"),
      P.midExtract("tools"),
      P.mount,
      P.restart(),
      P.serviceMid,
    ],
    // the rootfs's package lists may be fresh enough to skip apt-get update: age them
    prepare: (host) => host.sh("find /var/lib/apt/lists -maxdepth 1 -type f -exec touch -d '3 days ago' {} +").then(() => {}),
  },
  { name: "power cuts (parallel)", parallel: true, points: [{ ...P.aptDpkg, how: "power" }, P.mkfs, P.restart("power")] },
];

describe.skipIf(!!skipReason)("faults: the bootstrap broken and run again", () => {
  let fb: FaultBed;
  const hosts: ThrowawayHost[] = [];

  const disks = new Map<ThrowawayHost, PowerCutDisk>();

  async function freshHost(disk?: PowerCutDisk): Promise<ThrowawayHost> {
    const host = await ThrowawayHost.up({ log, prepareRootfs: disk?.prepare });
    hosts.push(host);
    if (disk) disks.set(host, disk);
    return host;
  }

  async function takeDown(host: ThrowawayHost): Promise<void> {
    await host.down();
    await disks.get(host)?.detach();
    hosts.splice(hosts.indexOf(host), 1);
  }

  /** The final checks of every case: the clean run's end state, nothing left over, the hub's record. */
  async function expectConverged(host: ThrowawayHost, prov: ProvisionedTestHost, last: FaultRun, found: FoundState, hits: string[]): Promise<void> {
    const status = await fb.settledStatus(prov);
    const observed: Observed = { host, prov, run: last.run, argvHits: hits, status };
    await expectBootstrappedHost(observed);
    await expectNothingLeftOver(host, prov, found);
    expect(last.runId).not.toBeNull();
    expect(status.run_id).toBe(last.runId);
    expect(status.missing_seqs).toBe(0);
    await expectHubRecordComplete(prov, last.runId!);
  }

  /** Run the stub without a fault, watching argv for the token. */
  async function cleanRun(host: ThrowawayHost, prov: ProvisionedTestHost, label: string): Promise<{ r: FaultRun; hits: string[] }> {
    const watch = watchArgv(prov.token);
    const r = await fb.run(host, prov, { log: linePrefixer(`[${label}] `) });
    return { r, hits: watch.stop().hits };
  }

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set FAULTS=off (or SKIP_E2E=1) to skip it (reported as skipped).`);
    const t0 = Date.now();
    // The project bundle is bigger than the other tests' (24 MB of text, ~1 s to extract): a
    // kill "mid-extraction" needs an extraction that lasts long enough to be caught.
    const bundles = testBundleSpecs().map((b) => (b.artifact === "project" ? { ...b, paddingBytes: 24_000_000 } : b));
    fb = await FaultBed.start({ log, bundles });
    stalledNow = (path) => fb.art.log.some((e) => e.fault?.startsWith("stall:") && path.test(e.path) && e.bytes >= STALL_AT);
    report.timings.testbed_start_s = (Date.now() - t0) / 1000;
  });

  afterAll(async () => {
    // hosts still up are those of failed cases: keep their console logs for a look
    for (const h of hosts) {
      const keep = `${tmpdir()}/faults-console-${h.name}.log`;
      try {
        copyFileSync(`${h.dir}/console.log`, keep);
        log(`${h.name}: console log kept at ${keep}`);
      } catch {
        // no console
      }
      await h.down().catch((e: unknown) => log(`down ${h.name}: ${String(e)}`));
      await disks.get(h)?.detach();
    }
    await fb?.close();
    printReport();
  });

  async function runChain(chain: Chain): Promise<void> {
    const needsPower = chain.points.some((p) => p.how === "power");
    const disk = needsPower ? new PowerCutDisk() : undefined;
    const t0 = Date.now();
    const host = await freshHost(disk);
    await chain.prepare?.(host);
    const found = await foundState(host);
    const prov = await fb.provision(host, { parallel: chain.parallel });
    const runs: FaultRun[] = [];
    for (const point of chain.points) {
      const rule = point.stall
        ? fb.art.add({ kind: "stall", match: point.stall, afterBytes: STALL_AT, ms: 20_000, times: 1, label: `stall:${point.name}` })
        : null;
      const r = await fb.run(host, prov, {
        kill: { name: point.name, trigger: point.trigger(prov.config), how: point.how },
        disk,
        log: linePrefixer(`[${chain.name}/${point.name}] `),
      });
      rule?.();
      expect(
        r.killed,
        `${chain.name}: kill point ${point.name} never came (the run ended first: exit ${r.run.code})\n${outputOf({ run: r.run } as Observed)}`,
      ).not.toBeNull();
      if (r.killed!.how === "power") {
        await disk!.powerOn(host);
        // the events the hub got before the cut are all still on the host's disk, unchanged
        const cmp = await expectHubMatchesSpool(host, prov);
        log(`${chain.name}/${point.name}: after the power cut the hub's ${cmp.compared} events of ${cmp.runs} spooled runs match the host's spool`);
        // (its end may be zeros now: the size of the log reached the disk, its last writes did not)
        const records = newRecords(host.path(`${prov.config.bootstrap_root}/logs/bootstrap.log`), 0) as Record<string, unknown>[];
        r.records = records.filter((x) => x.run_id && x.run_id === records.at(-1)?.run_id);
        r.runId = (r.records[0]?.run_id as string | undefined) ?? null;
      }
      const debris = await debrisOnHost(host, prov.config);
      report.kills.push({ chain: chain.name, point: point.name, how: r.killed!.how, firedAfterS: r.killed!.afterMs / 1000, recoveryS: null, debris });
      runs.push(r);
    }
    const { r: last, hits } = await cleanRun(host, prov, `${chain.name}/final`);
    runs.push(last);
    // recovery: how long the run after each kill took to get past the killed step
    const mine = report.kills.filter((k) => k.chain === chain.name);
    chain.points.forEach((p, i) => {
      mine[i]!.recoveryS = stepDoneAfterS(runs[i + 1]!.records, p.step);
    });
    report.finalRunsS.push({ chain: chain.name, s: last.run.wallMs / 1000 });
    await expectConverged(host, prov, last, found, hits);
    report.timings[`chain_${chain.name}_s`] = (Date.now() - t0) / 1000;
    await takeDown(host);
  }

  const chains = FULL ? [SUBSET_CHAIN, ...FULL_CHAINS] : [SUBSET_CHAIN];
  for (const chain of chains) {
    it(`kill chain ${chain.name}: ${chain.points.map((p) => `${p.name}${p.how === "power" ? " (power cut)" : ""}`).join(", ")}; then the stub converges`, async () => {
      for (const p of chain.points) row(p.how === "power" ? "power cut" : "SIGKILL of the tree").cases++;
      await runChain(chain);
      for (const p of chain.points) row(p.how === "power" ? "power cut" : "SIGKILL of the tree").passed++;
    });
  }

  // "The hub down for the whole run" as it happens: the stub needs the hub for bootstrap.py
  // and the config, bootstrap.py for the secrets (fetched first thing, right after the
  // directories); a hub that goes down once a host has those must not stop the run. The hub
  // down before the secrets is the other case: a clean failure at secrets (full matrix).
  it("hub unreachable from the moment the host has its config and secrets to the end of the run (and the apt locks held 30 s): the run succeeds; every event arrives in order once the hub is back", async () => {
    await counted("hub unreachable, the rest of the run", async () => {
      await counted("apt locks held 30 s", async () => {
        const host = await freshHost();
        const found = await foundState(host);
        const prov = await fb.provision(host);
        expect(prov.config.secrets.length, "the test host has secrets to fetch").toBeGreaterThan(0);
        const lock = await holdLocks(host, [...DPKG_LOCKS, APT_LISTS_LOCK], 30);
        // once the last secret is answered, the hub refuses every connection (for an hour, or until accept())
        const lastSecret = prov.config.secrets.at(-1)!;
        fb.hubProxy.refuseAfter(new RegExp(`/hosts/${prov.hostId}/secrets/${lastSecret}$`), 3600_000);
        let down: FaultRun;
        let since: number | null;
        try {
          down = await fb.run(host, prov, { log: linePrefixer("[hub down] ") });
          expect(fb.hubProxy.refusing, "the hub stayed unreachable to the end of the run").toBe(true);
          since = fb.hubProxy.refusingSince;
        } finally {
          await fb.hubProxy.clear(); // the hub is back (also for the next cases when this one fails)
        }
        await lock.done;
        expect(down.run.code, outputOf({ run: down.run } as Observed)).toBe(0);
        // the outage began early: before apt (whose locks were held 30 s) was done
        expect(since).not.toBeNull();
        const tsOf = (pred: (x: Record<string, unknown>) => boolean) => Date.parse(String(down.records.find(pred)?.ts));
        const runStart = tsOf((x) => typeof x.ts === "string");
        const aptEnd = tsOf((x) => x.event === "step_end" && x.step === "apt");
        expect(since!, "the hub went down before apt was done").toBeLessThan(aptEnd);
        // the hub holds at most what was sent before: a gapless prefix of the run, never its end
        const early = (await hubEvents(prov)).get(down.runId!) ?? [];
        expect(early.map((e) => e.seq)).toEqual(early.map((_, i) => i));
        expect(early.some((e) => e.type === "run_end")).toBe(false);
        // the lock: waited for, holder named
        const waits = down.records.filter((r) => r.event === "lock_wait");
        expect(waits.length, "no lock_wait record").toBeGreaterThan(0);
        expect(String(waits[0]!.message)).toContain(LOCK_HOLDER);
        const endDelay = endDelayS(down);
        report.hubOutage.push({
          case: "the rest of the run (from the secrets on)",
          endDelayS: endDelay,
          referenceEndDelayS: null,
          wallS: down.run.wallMs / 1000,
        });
        log(
          `hub down ${((since! - runStart) / 1000).toFixed(1)} s into the run, to its end: exit ${down.run.code} in ${(down.run.wallMs / 1000).toFixed(1)} s; ${endDelay.toFixed(1)} s from the last step to the exit; the hub had ${early.length} events of it`,
        );
        // the hub is back: the next run sends the spooled events of the first, then its own
        const { r: again, hits } = await cleanRun(host, prov, "hub back");
        report.hubOutage.at(-1)!.referenceEndDelayS = endDelayS(again);
        await expectConverged(host, prov, again, found, hits);
        const runs = await hubEvents(prov);
        expect([...runs.keys()]).toEqual(expect.arrayContaining([down.runId, again.runId]));
        const first = runs.get(down.runId!)!;
        expect(first.length).toBeGreaterThan(early.length);
        expect(first.at(-1)!.type).toBe("run_end");
        expect(first.at(-1)!.body.ok).toBe(true);
        await takeDown(host);
      });
    });
  });

  /** Seconds from the run's last step_end record to the stub's exit. */
  function endDelayS(r: FaultRun): number {
    const ends = r.records.filter((x) => x.event === "step_end");
    const lastTs = Date.parse(String(ends.at(-1)?.ts));
    return (r.exitAt - lastTs) / 1000;
  }

  it("artifact server: 5xx for the first requests, a reset and a truncation mid-body, a 60 s stall: retried and resumed to success", async () => {
    const host = await freshHost();
    const found = await foundState(host);
    const prov = await fb.provision(host);
    const bundle = (a: string) => new RegExp(`/${a}/[^/]+/[^/]+\\.tar\\.xz$`); // <artifact>/<version>/<file>
    fb.art.add({ kind: "status", status: 503, times: 3, match: bundle("project-host"), label: "5xx" });
    fb.art.add({ kind: "reset", afterBytes: 2_500_000, times: 2, match: bundle("project"), label: "reset" });
    fb.art.add({ kind: "truncate", afterBytes: 500_000, times: 1, match: bundle("tools"), label: "truncate" });
    fb.art.add({ kind: "stall", afterBytes: 1 << 20, ms: 60_000, times: 1, match: /node-v[^/]+-linux-[^/]+\.tar\.xz$/, label: "stall" });
    const seen = fb.art.log.length;
    try {
      const { r, hits } = await cleanRun(host, prov, "artifact faults");
      for (const f of ["5xx", "reset", "truncate", "stall"]) {
        await counted(`artifact: ${f}`, async () => expect(fb.art.fired(f), `${f} never applied`).toBeGreaterThan(0));
      }
      const reqs = fb.art.log.slice(seen);
      // reset and truncation were resumed with Range, not started over
      for (const name of ["project", "tools"]) {
        const mine = reqs.filter((e) => bundle(name).test(e.path));
        expect(
          mine.some((e) => e.range?.startsWith("bytes=") && !e.range.startsWith("bytes=0-")),
          `${name}: no resumed (Range) request: ${JSON.stringify(mine)}`,
        ).toBe(true);
      }
      await expectConverged(host, prov, r, found, hits);
      for (const s of ["download_project_host", "download_project", "download_tools", "node"]) {
        expect(
          r.records.some((x) => x.event === "step_end" && x.step === s && x.outcome === "changed"),
          `${s} did not succeed`,
        ).toBe(true);
      }
      report.timings.artifact_faults_run_s = r.run.wallMs / 1000;
    } finally {
      await fb.art.clear();
    }
    await takeDown(host);
  });

  it("wrong bytes: a clean failure with a hint and nothing installed; a full disk where bundles land: a clean failure naming the file system and the space needed; then success", async () => {
    const host = await freshHost();
    const found = await foundState(host);
    const prov = await fb.provision(host);
    const c = prov.config;
    await counted("artifact: wrong bytes", async () => {
      fb.art.add({ kind: "corrupt", fromByte: 100_000, match: /\/project\/[^/]+\/[^/]+\.tar\.xz$/, label: "corrupt" });
      let r: FaultRun;
      try {
        r = await fb.run(host, prov, { log: linePrefixer("[wrong bytes] ") });
      } finally {
        await fb.art.clear();
      }
      expect(r.run.code, outputOf({ run: r.run } as Observed)).not.toBe(0);
      const s = await fb.settledStatus(prov);
      expect(s.state).toBe("failed");
      expect(s.failure?.step).toBe("download_project");
      expect(s.failure?.message ?? "").toMatch(/sha256|verification/i);
      expect(s.failure?.hint ?? "").toMatch(/Nothing was installed/);
      expect(r.run.stdout + r.run.stderr).toContain("hint:");
      const leftovers = await host.sh(
        `find ${c.bootstrap_root}/bundles \\( -path '*/bundles/project' -o -path '*/bundles/project/*' -o -name 'project-[0-9]*' \\) -print`,
      );
      expect(leftovers.trim(), "nothing of the project bundle").toBe("");
    });
    await counted("disk full", async () => {
      const full = await fullFs(host, `${c.bootstrap_root}/bundles`, { sizeBytes: 160 << 20, leaveBytes: 200 << 10, owner: c.bootstrap_user });
      const r = await fb.run(host, prov, { log: linePrefixer("[disk full] ") });
      expect(r.run.code, outputOf({ run: r.run } as Observed)).not.toBe(0);
      const s = await fb.settledStatus(prov);
      expect(s.state).toBe("failed");
      const text = `${s.failure?.message ?? ""}\n${s.failure?.hint ?? ""}`;
      expect(text, "the failure names the file system").toContain(full.mountPoint);
      expect(text, "the failure says how much space is needed").toMatch(/\d+(\.\d+)?\s*(bytes|[KMG]i?B)/);
      // a failed run leaves no debris (a partial download is kept on purpose: the next run resumes it)
      expect(
        (await debrisOnHost(host, c)).filter((p) => !p.endsWith(".part")),
        "a failed run leaves no debris",
      ).toEqual([]);
      await full.free();
      const { r: again, hits } = await cleanRun(host, prov, "space freed");
      await expectConverged(host, prov, again, found, hits);
    });
    await takeDown(host);
  });

  if (FULL) {
    it("hub unreachable from the config on (before the secrets): a clean failure at secrets naming hub.secrets_url, nothing of a secret written; the hub back, the next run converges and every event arrives", async () => {
      await counted("hub unreachable before the secrets", async () => {
        const host = await freshHost();
        const found = await foundState(host);
        const prov = await fb.provision(host);
        const c = prov.config;
        // the stub's last request to the hub on a fresh host: bootstrap.py (after the sha256 and the config, one curl)
        fb.hubProxy.refuseAfter(new RegExp(`/hosts/${prov.hostId}/bootstrap\\.py$`), 3600_000);
        let down: FaultRun;
        try {
          down = await fb.run(host, prov, { log: linePrefixer("[hub down early] ") });
          expect(fb.hubProxy.refusing, "the hub stayed unreachable to the end of the run").toBe(true);
        } finally {
          await fb.hubProxy.clear(); // the hub is back (also for the next cases when this one fails)
        }
        expect(down.run.code, outputOf({ run: down.run } as Observed)).not.toBe(0);
        const secretsEnd = down.records.find((x) => x.event === "step_end" && x.step === "secrets");
        expect(secretsEnd?.outcome, "the secrets step failed").toBe("failed");
        const out = down.run.stdout + down.run.stderr;
        expect(out).toContain("hint:");
        expect(out).toContain("hub.secrets_url");
        const written = await host.sh(`find ${c.bootstrap_dir}/secrets-staging ${c.btrfs.mount_point}/data/secrets -type f 2>/dev/null; true`);
        expect(written.trim(), "nothing of a secret written").toBe("");
        report.hubOutage.push({
          case: "from the config on (fails at secrets)",
          endDelayS: endDelayS(down),
          referenceEndDelayS: null,
          wallS: down.run.wallMs / 1000,
        });
        const { r: again, hits } = await cleanRun(host, prov, "hub back (secrets)");
        report.hubOutage.at(-1)!.referenceEndDelayS = endDelayS(again);
        await expectConverged(host, prov, again, found, hits);
        const first = (await hubEvents(prov)).get(down.runId!)!;
        expect(first.at(-1)!.type).toBe("run_end");
        expect(first.at(-1)!.body.ok).toBe(false);
        await takeDown(host);
      });
    });

    it("hub unreachable for a window in the middle of the run: success, every event delivered in order, the added delay bounded", async () => {
      await counted("hub unreachable, window", async () => {
        const host = await freshHost();
        const found = await foundState(host);
        const prov = await fb.provision(host);
        const logFile = `${prov.config.bootstrap_root}/logs/bootstrap.log`;
        const poll = makeTriggerPoll(
          { kind: "step-start", step: "apt" },
          { hostPath: (i) => host.path(i), logFile, logOffset: fileSize(host.path(logFile)), init: () => host.pid1(), stubPath: STUB_PATH },
        );
        const watch = watchArgv(prov.token);
        const running = fb.run(host, prov, { log: linePrefixer("[hub window] ") });
        const at = await waitForTrigger(poll, running);
        expect(at).not.toBeNull();
        await fb.hubProxy.refuseFor(20_000);
        const r = await running;
        const delay = endDelayS(r);
        report.hubOutage.push({ case: "20 s window from apt's start", endDelayS: delay, referenceEndDelayS: null, wallS: r.run.wallMs / 1000 });
        await expectConverged(host, prov, r, found, watch.stop().hits);
        await takeDown(host);
      });
    });

    it("apt: the locks held for ever: fails within the configured timeout, the holder in the hint; released, the re-run succeeds", async () => {
      await counted("apt locks held for ever", async () => {
        const host = await freshHost();
        const found = await foundState(host);
        const prov = await fb.provision(host);
        const timeoutS = 20;
        const undo = fb.hubProxy.add({
          kind: "rewrite",
          match: new RegExp(`/hosts/${prov.hostId}/config$`),
          transform: (b) => {
            const cfg = JSON.parse(b.toString()) as { apt: { lock_timeout_s: number } };
            cfg.apt.lock_timeout_s = timeoutS;
            return JSON.stringify(cfg);
          },
          label: "lock timeout 20 s",
        });
        const lock = await holdLocks(host, [...DPKG_LOCKS], 3600);
        let r: FaultRun;
        try {
          r = await fb.run(host, prov, { log: linePrefixer("[locked] ") });
        } finally {
          undo();
        }
        expect(r.run.code).not.toBe(0);
        const s = await fb.settledStatus(prov);
        expect(s.failure?.step).toBe("apt");
        expect(`${s.failure?.message}\n${s.failure?.hint}`).toContain(LOCK_HOLDER);
        const aptEnd = r.records.find((x) => x.event === "step_end" && x.step === "apt");
        expect(Number(aptEnd?.duration_s)).toBeLessThan(timeoutS + 15);
        await lock.release();
        const { r: again, hits } = await cleanRun(host, prov, "unlocked");
        await expectConverged(host, prov, again, found, hits);
        await takeDown(host);
      });
    });
  }

  it("a batch that repeats a stored (host, run, seq) with other content: the hub refuses it, the host logs the refusal", async () => {
    const host = await freshHost();
    const prov = await fb.provision(host);
    await counted("hub refuses a conflicting repeat (409)", async () => {
      // the hub itself, over HTTP: the same (run, seq) again with other content is a 409, not a silent first-write-wins
      const probeRun = "20000101T000000000000Z-00000000";
      const ev = (phase: string) => ({ run_id: probeRun, seq: 0, ts: 946684800, type: "progress", phase, percent: 1 });
      const post = (msg: string) =>
        fetch(prov.config.hub.events_url.replace(fb.hubProxy.url, prov.hub.url), {
          method: "POST",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${prov.token}` },
          body: JSON.stringify({ host_id: prov.hostId, events: [ev(msg)] }),
        });
      const a = await post("first");
      expect(a.status, `a plain event: ${await a.text()}`).toBe(200);
      const same = await post("first");
      expect(same.status, "the same event again is a duplicate, not a conflict").toBe(200);
      const b = await post("second, different");
      expect(b.status, `other content for a stored (run, seq): ${await b.text()}`).toBe(409);
      await prov.hub.db.query("DELETE FROM bootstrap_events WHERE host_id = $1 AND run_id = $2", [prov.hostId, probeRun]);

      // a run whose events cannot be sent, killed; the hub then holds other content for its seq 0
      fb.hubProxy.add({ kind: "drop", match: (r) => r.method === "POST" && r.path.endsWith("/events"), label: "events dropped" });
      const killed = await fb.run(host, prov, { kill: { name: "apt:start", trigger: { kind: "step-start", step: "apt" } } });
      await fb.hubProxy.clear();
      expect(killed.runId).not.toBeNull();
      await prov.hub.db.query(
        `INSERT INTO bootstrap_events (host_id, run_id, seq, type, ts, body, received_at) VALUES ($1, $2, 0, 'progress', 0, $3::jsonb, now())`,
        [prov.hostId, killed.runId, JSON.stringify({ run_id: killed.runId, seq: 0, ts: 0, type: "progress", phase: "not the host's", percent: 1 })],
      );
      const { r } = await cleanRun(host, prov, "conflict");
      expect(r.run.code).toBe(0);
      const refusal = r.records.find((x) => x.event === "events" && /409/.test(String(x.message)));
      expect(refusal, "the host did not log the hub's 409").toBeDefined();
      expect(r.run.stdout + r.run.stderr, "the operator sees the refusal").toMatch(/409/);
    });
    await takeDown(host);
  });

  function printReport(): void {
    const lines: string[] = [];
    lines.push(`fault suite (${report.mode}):`);
    lines.push("| fault | cases | passed |");
    lines.push("| --- | ---: | ---: |");
    for (const r of report.rows.values()) lines.push(`| ${r.fault} | ${r.cases} | ${r.passed} |`);
    const rec = report.kills.map((k) => k.recoveryS).filter((x): x is number => x !== null);
    lines.push(
      `kills: ${report.kills.length}; recovery (next run past the killed step) median ${median(rec).toFixed(1)} s, max ${Math.max(...rec, 0).toFixed(1)} s`,
    );
    for (const k of report.kills) {
      lines.push(
        `  ${k.chain} / ${k.point} (${k.how}) after ${k.firedAfterS.toFixed(1)} s: recovery ${k.recoveryS?.toFixed(1) ?? "-"} s; debris left: ${k.debris.join(" ") || "none"}`,
      );
    }
    for (const f of report.finalRunsS) lines.push(`  final converging run of ${f.chain}: ${f.s.toFixed(1)} s`);
    for (const h of report.hubOutage) {
      lines.push(
        `hub outage (${h.case}): run ${h.wallS.toFixed(1)} s, last step to exit ${h.endDelayS.toFixed(1)} s (hub up: ${h.referenceEndDelayS?.toFixed(1) ?? "-"} s)`,
      );
    }
    lines.push(`timings: ${JSON.stringify(report.timings)}`);
    log(lines.join("\n"));
    if (process.env.FAULTS_REPORT) {
      writeFileSync(process.env.FAULTS_REPORT, `${JSON.stringify({ ...report, rows: [...report.rows.values()] }, null, 2)}\n`);
    }
  }
});
