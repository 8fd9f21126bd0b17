/**
 * The fleet view: the percentile definition (property tests, and PostgreSQL's
 * percentile_cont agrees with it), the step durations over a window on both
 * databases, and the JSON route, including hostile query strings.
 */
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Db } from "../cloud/bootstrap/db.js";
import { FLEET_WINDOW_MAX_S, type FleetView, fleetStepDurations, percentileCont } from "../cloud/bootstrap/fleet.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { insertEvents } from "../cloud/bootstrap/store.js";
import { describeOnDatabases } from "./support/databases.js";
import { hostRecord, RunScript } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const RUNS = Number(process.env.FUZZ_RUNS ?? 100);
const sorted = (xs: readonly number[]) => [...xs].sort((a, b) => a - b);
const durations = fc.array(fc.double({ min: 0, max: 1e6, noNaN: true, noDefaultInfinity: true }), { minLength: 1, maxLength: 60 });
const quantile = fc.double({ min: 0, max: 1, noNaN: true });
const close = (a: number, b: number) => Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(a), Math.abs(b));

describe("percentileCont", () => {
  it("lies between the smallest and the largest value, and p=0 / p=1 are exactly those", () => {
    fc.assert(
      fc.property(durations, quantile, (xs, p) => {
        const s = sorted(xs);
        const v = percentileCont(s, p);
        expect(v).toBeGreaterThanOrEqual(s[0]!);
        expect(v).toBeLessThanOrEqual(s.at(-1)!);
        expect(percentileCont(s, 0)).toBe(s[0]);
        expect(percentileCont(s, 1)).toBe(s.at(-1));
      }),
      { numRuns: RUNS },
    );
  });

  it("never decreases as p grows (p50 <= p95)", () => {
    fc.assert(
      fc.property(durations, quantile, quantile, (xs, a, b) => {
        const s = sorted(xs);
        const [lo, hi] = a <= b ? [a, b] : [b, a];
        expect(percentileCont(s, lo)).toBeLessThanOrEqual(percentileCont(s, hi) + 1e-9 * Math.max(1, s.at(-1)!));
      }),
      { numRuns: RUNS },
    );
  });

  it("is the value itself for one run, and the order the runs came in does not matter", () => {
    fc.assert(
      fc.property(durations, quantile, (xs, p) => {
        expect(percentileCont([xs[0]!], p)).toBe(xs[0]);
        expect(percentileCont(sorted(xs), p)).toBe(percentileCont(sorted([...xs].reverse()), p));
      }),
      { numRuns: RUNS },
    );
  });

  it("moves with a shift of every duration", () => {
    fc.assert(
      fc.property(durations, quantile, fc.double({ min: 0, max: 1e3, noNaN: true }), (xs, p, c) => {
        const s = sorted(xs);
        expect(
          close(
            percentileCont(
              s.map((x) => x + c),
              p,
            ),
            percentileCont(s, p) + c,
          ),
        ).toBe(true);
      }),
      { numRuns: RUNS },
    );
  });

  it("refuses a p outside [0, 1] and answers NaN for no values", () => {
    expect(() => percentileCont([1], 1.5)).toThrow(/within \[0, 1\]/);
    expect(() => percentileCont([1], Number.NaN)).toThrow(/within \[0, 1\]/);
    expect(percentileCont([], 0.5)).toBeNaN();
    expect(percentileCont([1, 2, 3, 4], 0.5)).toBe(2.5);
    expect(percentileCont([10, 20], 0.95)).toBe(19.5);
  });
});

/** Events of a run whose steps took `durations` (seconds), started at `t0`. */
function runWith(t0: number, steps: Record<string, { d: number; outcome?: "changed" | "unchanged" | "failed" | "blocked" }>): RunScript {
  const run = new RunScript(undefined, t0).start(Object.keys(steps).map((name) => ({ name, deps: [], weight: 1 })));
  for (const [name, { d, outcome }] of Object.entries(steps)) run.stepStart(name).stepEnd(name, outcome ?? "changed", d);
  return run;
}

describeOnDatabases("fleet step durations", (h) => {
  it("PostgreSQL's percentile_cont is percentileCont", async () => {
    await fc.assert(
      fc.asyncProperty(durations, quantile, async (xs, p) => {
        const rows = await h.db.query<{ v: number }>("SELECT percentile_cont($2::float8) WITHIN GROUP (ORDER BY x) AS v FROM unnest($1::float8[]) AS x", [
          xs,
          p,
        ]);
        expect(close(Number(rows[0]!.v), percentileCont(sorted(xs), p))).toBe(true);
      }),
      { numRuns: Math.min(RUNS, 40) },
    );
  });

  it("p50 and p95 per step over the runs that started in the window: the latest end of each step per run, blocked ones left out", async () => {
    const now = Date.now() / 1000;
    const apt = [12, 40, 33, 90, 25, 31];
    for (const [i, d] of apt.entries()) {
      const host = hostRecord().id;
      const run = runWith(now - 3600 + i, { apt: { d }, node: { d: 5, outcome: i === 0 ? "failed" : "unchanged" }, service: { d: 0, outcome: "blocked" } });
      if (i === 1) run.stepEnd("apt", "changed", 41); // a later end of the same step in the run wins: 41, not 40
      await insertEvents(h.db, host, run.events as never, new Date());
    }
    // a run before the window does not count
    await insertEvents(h.db, hostRecord().id, runWith(now - 10 * 86400, { apt: { d: 5000 } }).events as never, new Date());
    const steps = await fleetStepDurations(h.db, now - 86400);
    const byName = new Map(steps.map((s) => [s.step, s]));
    const aptDurations = sorted(apt.map((d) => (d === 40 ? 41 : d)));
    expect(byName.get("apt")).toEqual({
      step: "apt",
      runs: 6,
      p50_s: percentileCont(aptDurations, 0.5),
      p95_s: percentileCont(aptDurations, 0.95),
      max_s: 90,
      changed: 6,
      failed: 0,
      work_p50_s: percentileCont(aptDurations, 0.5),
      work_p95_s: percentileCont(aptDurations, 0.95),
    });
    // node: five unchanged 5 s, one failed 5 s: only the failed one did work
    expect(byName.get("node")).toMatchObject({ runs: 6, p50_s: 5, failed: 1, changed: 0, work_p50_s: 5, work_p95_s: 5 });
    expect(byName.has("service")).toBe(false); // blocked in every run: never ran
    expect(steps[0]!.step).toBe("apt"); // slowest p95 first
  });
});

describe("GET /fleet/status", () => {
  let srv: ManifestServer;
  let hub: RunningHub;
  let db: Db;
  const ids: Record<string, string> = {};

  beforeAll(async () => {
    srv = await startManifestServer();
    serveGoodManifests(srv);
    hub = await startHub({ artifactBaseUrl: srv.baseUrl, staleAfterS: 120 });
    db = hub.db;
    const now = Date.now() / 1000;
    const post = async (name: string, events: BootstrapEventInput[] | null) => {
      const p = await hub.provisionHost(hostRecord({ name }), { secrets: {} });
      ids[name] = p.hostId;
      if (!events) return;
      const r = await fetch(`${p.baseUrl}/events`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${p.token}` },
        body: JSON.stringify({ host_id: p.hostId, events }),
      });
      expect(r.status).toBe(200);
    };
    await post("done-1", runWith(now - 600, { apt: { d: 30 }, service: { d: 5 } }).end(true).events);
    await post("failed-1", runWith(now - 300, { apt: { d: 50, outcome: "failed" } }).end(false, { failed_step: "apt" }).events);
    await post("running-1", new RunScript(undefined, now - 20).start().stepStart("apt").progress("installing packages", 35).events);
    await post("pending-1", null);
    // silent for an hour: stale, not failed (its event times are the host's; the hub heard it just now, so
    // it is stale only by its own clock's gap, which the status does not use): build it with an old receive time
    const stale = await hub.provisionHost(hostRecord({ name: "stale-1" }), { secrets: {} });
    ids["stale-1"] = stale.hostId;
    await insertEvents(db, stale.hostId, new RunScript(undefined, now - 3600).start().stepStart("node").events as never, new Date(Date.now() - 3_600_000));
  });

  afterAll(async () => {
    await hub?.close();
    await srv?.close();
  });

  const get = (q = "") => fetch(`${hub.bootstrapUrl}/fleet/status${q}`);

  it("lists every host's latest run, the ones that need attention first, and the steps' p50 and p95", async () => {
    const r = await get();
    expect(r.status).toBe(200);
    const v = (await r.json()) as FleetView;
    expect(v.hosts_total).toBe(5);
    expect(v.counts).toEqual({ failed: 1, stale: 1, running: 1, pending: 1, done: 1 });
    expect(v.hosts.map((x) => x.name)).toEqual(["failed-1", "stale-1", "running-1", "pending-1", "done-1"]);
    const running = v.hosts.find((x) => x.name === "running-1")!;
    expect(running).toMatchObject({ state: "running", phase: "installing packages", percent: 35, current_steps: ["apt"], runs: 1 });
    expect(running.age_s).toBeGreaterThanOrEqual(19);
    expect(running.age_s).toBeLessThan(600);
    expect(v.hosts.find((x) => x.name === "failed-1")).toMatchObject({ state: "failed", failed_step: "apt", phase: "failed at apt" });
    expect(v.hosts.find((x) => x.name === "pending-1")).toMatchObject({ state: "pending", run_id: null, age_s: null });
    expect(v.steps.find((s) => s.step === "apt")).toMatchObject({ runs: 2, p50_s: 40, p95_s: 49, max_s: 50, failed: 1 });
    expect(v.window_s).toBe(7 * 86400);
  });

  it("limit shows the most recently active hosts and says how many there are", async () => {
    const v = (await (await get("?limit=2&window_s=3600")).json()) as FleetView;
    expect(v.hosts).toHaveLength(2);
    expect(v.hosts_total).toBe(5);
    expect(v.window_s).toBe(3600);
  });

  const refusals: [string, RegExp][] = [
    ["?window_s=abc", /invalid fleet query: window_s: must be a whole number of digits/],
    ["?window_s=59", /window_s: must be at least 60/],
    [`?window_s=${FLEET_WINDOW_MAX_S + 1}`, /window_s: must be at most/],
    ["?window_s=99999999999999999999", /window_s: must be a whole number/],
    ["?window_s=-5", /window_s: must be a whole number/],
    ["?window_s=1e5", /window_s: must be a whole number/],
    ["?window_s=3600&window_s=7200", /window_s: must be given once/],
    ["?window_s[]=3600", /invalid fleet query:.*window_s\[\]/],
    ["?limit=0", /limit: must be at least 1/],
    ["?limit=", /limit: must be a whole number/],
    ["?host=%27%3B%20DROP%20TABLE%20bootstrap_runs", /invalid fleet query:.*host/],
  ];
  for (const [q, why] of refusals) {
    it(`refuses ${q} with a 400 that says why`, async () => {
      const r = await get(q);
      expect(r.status).toBe(400);
      expect(((await r.json()) as { error: string }).error).toMatch(why);
    });
  }

  it("the page refuses a bad query the same way", async () => {
    const r = await fetch(`${hub.bootstrapUrl}/fleet/?window_s=nope`);
    expect(r.status).toBe(400);
  });

  it("any query string is a 200 or a 400, never a 5xx", async () => {
    const key = fc.constantFrom("window_s", "limit", "window_s[]", "x", "__proto__", "constructor", "");
    const value = fc.oneof(fc.string({ maxLength: 24 }), fc.integer().map(String), fc.constantFrom("%", "%zz", "1%00", "３６００"));
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(key, value), { maxLength: 4 }), async (pairs) => {
        const q = pairs.map(([k, v]) => `${encodeURIComponent(k)}=${v.startsWith("%") ? v : encodeURIComponent(v)}`).join("&");
        const r = await get(`?${q}`);
        expect([200, 400]).toContain(r.status);
        await r.arrayBuffer();
      }),
      { numRuns: Math.min(RUNS, 60) },
    );
  });
});
