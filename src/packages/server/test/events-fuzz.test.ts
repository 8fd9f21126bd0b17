/**
 * Property-based tests (fast-check) of the events route against the real hub
 * on PGlite and PostgreSQL:
 *
 * - generated batches (valid events, events with one field replaced by
 *   anything, hostile text, odd numbers, wrong host, repeats of stored
 *   sequence numbers with other content) never get a 5xx, and the status
 *   route never fails after them;
 * - whatever was refused, a later valid batch is stored (nothing blocks a host);
 * - the status the hub derives from its run summaries and indexed lookups is
 *   the status folded from all of the run's events.
 *
 * Bounded for CI: FUZZ_RUNS (default 25) runs per property; FUZZ_SEED replays
 * a failure (the seed is printed when a property fails).
 */
import { randomUUID } from "node:crypto";
import { STEP_OUTCOMES } from "@cocalc/project-host-bootstrap";
import fc from "fast-check";
import { afterAll, beforeAll, expect, it } from "vitest";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { deriveStatus, deriveStatusFromDigest, digestEvents, hostStatus } from "../cloud/bootstrap/status.js";
import { insertEvents, listRunEvents } from "../cloud/bootstrap/store.js";
import { describeOnDatabases } from "./support/databases.js";
import { hostRecord } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const RUNS = Number(process.env.FUZZ_RUNS ?? 25);
const SEED = process.env.FUZZ_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.FUZZ_SEED);

async function check<Ts extends [unknown, ...unknown[]]>(name: string, prop: fc.IAsyncProperty<Ts>, numRuns = RUNS): Promise<void> {
  try {
    await fc.assert(prop, { numRuns, seed: SEED, endOnFailure: true });
  } catch (err) {
    console.error(`fuzz: "${name}" failed; replay with FUZZ_SEED=${SEED} FUZZ_RUNS=${numRuns}`);
    throw err;
  }
}

// --- arbitraries ---------------------------------------------------------------------------

const STEPS = ["preflight", "apt", "node", "install", "download.tools", "services"] as const;
const stepName = fc.constantFrom(...STEPS);
/** Any UTF-16 code unit, with the troublesome ones often. */
const unit = fc.oneof(
  fc.constantFrom("\u0000", "\ud800", "\udfff", "\ud83d\ude00", "\u00e9", "\n", "\\", '"', "'", "\u2028"),
  fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)),
);
const hostileText = fc.string({ unit, maxLength: 40 });
const safeText = fc.string({ unit: "grapheme", maxLength: 40 });
const oddNumber = fc.oneof(fc.double(), fc.integer(), fc.constantFrom(0, -0, -1, 5e-324, 1e308, -1e308, 2 ** 31, 2 ** 53 + 1, 1_000_000, 1_000_001, 100.5));
const anything = fc.oneof(hostileText, oddNumber, fc.boolean(), fc.constant(null), fc.jsonValue({ maxDepth: 2 }));
const ts = fc.oneof(fc.double({ min: 0, max: 4e9, noNaN: true, noDefaultInfinity: true }), fc.constantFrom(0, 5e-324, 1e12, 1e300));
const duration = fc.double({ min: 0, max: 1e6, noNaN: true, noDefaultInfinity: true });

const eventBody = fc.oneof(
  fc.record({
    type: fc.constant("run_start"),
    version: fc.constantFrom("0.1.0", "0.2.0"),
    parallel: fc.boolean(),
    steps: fc.uniqueArray(fc.record({ name: stepName, deps: fc.uniqueArray(stepName, { maxLength: 2 }), weight: fc.nat(100) }), {
      maxLength: 5,
      selector: (s) => s.name,
    }),
  }),
  fc.record({ type: fc.constant("step_start"), step: stepName }),
  fc.record({
    type: fc.constant("step_end"),
    step: stepName,
    outcome: fc.constantFrom(...STEP_OUTCOMES),
    duration_s: duration,
    message: safeText,
    hint: fc.option(safeText, { nil: null }),
    log_tail: fc.option(safeText, { nil: null }),
  }),
  fc.record({ type: fc.constant("progress"), phase: safeText, percent: fc.double({ min: 0, max: 100, noNaN: true }) }),
  fc.record({
    type: fc.constant("run_end"),
    ok: fc.boolean(),
    wall_s: duration,
    failed_step: fc.option(stepName, { nil: null }),
    hint: fc.option(safeText, { nil: null }),
    log_tail: fc.option(safeText, { nil: null }),
  }),
);

type Ev = Record<string, unknown>;

/** A valid event of `runId` at `seq`. */
const validEvent = (runId: string, seq: number) => fc.tuple(eventBody, ts).map(([body, t]): Ev => ({ run_id: runId, seq, ts: t, ...body }));

/** A valid event with every free-text field it has replaced by hostile text (NUL, lone surrogates, ...). */
const hostileTextEvent = (runId: string, seq: number) =>
  fc.tuple(validEvent(runId, seq), hostileText).map(([e, text]) => {
    const out: Ev = { ...e };
    for (const key of ["message", "hint", "log_tail", "phase", "version"]) if (key in out) out[key] = text;
    return out;
  });

/** A valid event, one with hostile text, or one with a field replaced (or added) by anything. */
const maybeBroken = (runId: string, seq: number) =>
  fc.oneof(
    { weight: 2, arbitrary: validEvent(runId, seq) },
    { weight: 2, arbitrary: hostileTextEvent(runId, seq) },
    {
      weight: 3,
      arbitrary: fc
        .tuple(validEvent(runId, seq), fc.constantFrom("run_id", "seq", "ts", "type", "step", "message", "phase", "percent", "steps", "extra"), anything)
        .map(([e, key, value]) => ({ ...e, [key]: value })),
    },
  );

const runIdArb = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_-]{7,20}$/);

// --- the properties ----------------------------------------------------------------------------

let srv: ManifestServer;
beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
});
afterAll(async () => {
  await srv?.close();
});

describeOnDatabases("events route under generated batches", (h) => {
  let hub: RunningHub;
  const logged: string[] = [];
  beforeAll(async () => {
    hub = await startHub({ db: h.db, artifactBaseUrl: srv.baseUrl, streamRecheckMs: 600_000, logError: (m, e) => logged.push(`${m}: ${String(e)}`) });
  });
  afterAll(async () => {
    await hub?.close();
  });

  const post = (hostId: string, token: string, body: string) =>
    fetch(`${hub.bootstrapUrl}/hosts/${hostId}/events`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body,
    });

  it("never a 5xx, and a valid batch always goes through afterwards", { timeout: 300_000 }, async () => {
    const host = await hub.provisionHost(hostRecord(), { secrets: {} });
    const seen = new Map<string, number>(); // "status error-prefix" -> how often
    await check(
      "batches",
      fc.asyncProperty(
        runIdArb,
        fc.integer({ min: 1, max: 6 }),
        fc.constantFrom("valid", "hostile-text", "broken", "wrong-host", "raw"),
        fc.infiniteStream(fc.integer({ min: 0, max: 8 })),
        fc.gen(),
        async (runId, n, mode, seqs, gen) => {
          const seq = () => seqs.next().value as number;
          const events = Array.from({ length: n }, () => gen(validEvent, runId, seq()));
          if (mode === "hostile-text") events[gen(fc.nat, n - 1)] = gen(hostileTextEvent, runId, seq());
          if (mode === "broken") events[gen(fc.nat, n - 1)] = gen(maybeBroken, runId, seq());
          const body =
            mode === "raw"
              ? gen(() => fc.oneof(fc.json({ maxDepth: 3 }), hostileText, fc.constant(JSON.stringify({ host_id: host.hostId, events }).slice(0, -3))))
              : JSON.stringify({ host_id: mode === "wrong-host" ? randomUUID() : host.hostId, events });
          const res = await post(host.hostId, host.token, body);
          const text = await res.text();
          expect(res.status, text).toBeLessThan(500);
          expect([200, 400, 409, 413, 415, 422], text).toContain(res.status);
          const kind = `${res.status} ${text.replace(/^\{"error":"/, "").slice(0, 40)}`;
          seen.set(kind, (seen.get(kind) ?? 0) + 1);
          const status = await fetch(`${hub.bootstrapUrl}/hosts/${host.hostId}/status`);
          expect(status.status, await status.clone().text()).toBe(200);
          // Whatever happened, the next valid batch of a new run is stored.
          const next = gen(validEvent, `ok-${randomUUID().slice(0, 12)}`, 0);
          const ok = await post(host.hostId, host.token, JSON.stringify({ host_id: host.hostId, events: [next] }));
          expect(ok.status, await ok.clone().text()).toBe(200);
          expect(await ok.json()).toEqual({ stored: 1, duplicates: 0 });
        },
      ),
    );
    console.log(`fuzz[${h.db.kind}] answers seen (status, first words: count): ${JSON.stringify(Object.fromEntries(seen))}`);
    expect(logged.filter((l) => !l.includes("refused by the database"))).toEqual([]);
  });

  it("the bounded status equals the status folded from all events", { timeout: 300_000 }, async () => {
    await check(
      "digest",
      fc.asyncProperty(
        fc.array(fc.tuple(eventBody, ts), { minLength: 1, maxLength: 40 }),
        fc.integer({ min: 1, max: 10 }),
        fc.infiniteStream(fc.integer({ min: 1, max: 15 })),
        async (bodies, batchSize, skews) => {
          const hostId = randomUUID();
          const runId = `run-${randomUUID().slice(0, 12)}`;
          const events = bodies.map(([body, t], seq) => ({ run_id: runId, seq, ts: t, ...body }));
          // Batches in shuffled order, each received at its own (possibly earlier) hub time.
          const batches: Ev[][] = [];
          for (let i = 0; i < events.length; i += batchSize) batches.push(events.slice(i, i + batchSize));
          batches.reverse();
          const base = Date.now();
          for (const b of batches) {
            await insertEvents(h.db, hostId, b as never, new Date(base - 1000 * (skews.next().value as number)));
          }
          const now = new Date(base + 5000);
          const fromStore = await hostStatus(h.db, hostId, { now, staleAfterS: 120 });
          const all = await listRunEvents(h.db, hostId, runId);
          const o = { hostId, now, staleAfterS: 120, runs: 1 };
          // The same digest selected in TypeScript, and the fold over every event (no digest at all).
          expect(fromStore).toEqual(deriveStatus(all, o));
          expect(fromStore).toEqual(deriveStatusFromDigest({ ...digestEvents(all)!, events: all }, o));
        },
      ),
    );
  });
});
