import { randomUUID } from "node:crypto";
import type { BootstrapEvent } from "@cocalc/project-host-bootstrap";
import { EventBatchSchema } from "@cocalc/project-host-bootstrap";
import { describe, expect, inject, it } from "vitest";
import { loadMigrations, migrate } from "../cloud/bootstrap/migrate.js";
import {
  findToken,
  getHost,
  getSecret,
  HOST_CHANGED_CHANNEL,
  insertEvents,
  insertToken,
  listHostTokens,
  listRunEvents,
  listRuns,
  notifyHostChanged,
  revokeHostTokens,
  saveHost,
  saveSecret,
} from "../cloud/bootstrap/store.js";
import { describeOnDatabases, openTestPostgres } from "./support/databases.js";
import { RunScript } from "./support/fixtures.js";

function parsed(run: RunScript, hostId: string): BootstrapEvent[] {
  return EventBatchSchema.parse({ host_id: hostId, events: run.events }).events;
}

describe("migrations", () => {
  it("are numbered 001, 002, ... and non-empty", () => {
    const ms = loadMigrations();
    expect(ms.length).toBeGreaterThan(0);
    ms.forEach((m, i) => {
      expect(m.version).toBe(i + 1);
      expect(m.sql).toMatch(/\b(CREATE|ALTER) TABLE\b/);
    });
  });
});

describeOnDatabases("store", (h) => {
  it("migrates once: a second run applies nothing", async () => {
    expect(await migrate(h.db)).toEqual([]);
    const rows = await h.db.query<{ version: number }>("SELECT version FROM bootstrap_migrations ORDER BY version");
    expect(rows.map((r) => r.version)).toEqual(loadMigrations().map((m) => m.version));
  });

  it("concurrent migrators take turns", async () => {
    const results = await Promise.all([migrate(h.db), migrate(h.db), migrate(h.db)]);
    expect(results.flat()).toEqual([]);
  });

  it("saves and updates hosts", async () => {
    const hostId = randomUUID();
    const now = new Date("2025-01-01T00:00:00Z");
    await saveHost(h.db, { hostId, record: { name: "a" }, config: { x: 1 }, now });
    await saveHost(h.db, { hostId, record: { name: "b" }, config: { x: 2 }, now: new Date(now.getTime() + 1000) });
    const host = await getHost(h.db, hostId);
    expect(host?.record).toEqual({ name: "b" });
    expect(host?.config).toEqual({ x: 2 });
    expect(host?.createdAt.getTime()).toBe(now.getTime());
    expect(host?.updatedAt.getTime()).toBe(now.getTime() + 1000);
    expect(await getHost(h.db, randomUUID())).toBeNull();
  });

  it("stores tokens by hash and revokes them", async () => {
    const hostId = randomUUID();
    const t = { tokenHash: "a".repeat(64), hostId, createdAt: new Date(), expiresAt: new Date(Date.now() + 60_000) };
    await insertToken(h.db, t);
    expect((await findToken(h.db, t.tokenHash))?.hostId).toBe(hostId);
    expect(await revokeHostTokens(h.db, hostId, new Date())).toBe(1);
    expect(await revokeHostTokens(h.db, hostId, new Date())).toBe(0);
    expect((await listHostTokens(h.db, hostId))[0]?.revokedAt).toBeInstanceOf(Date);
    await expect(insertToken(h.db, { ...t, tokenHash: "not-a-hash" })).rejects.toThrow();
  });

  it("stores secrets per host", async () => {
    const hostId = randomUUID();
    await saveSecret(h.db, hostId, "conat-password", "s1");
    await saveSecret(h.db, hostId, "conat-password", "s2");
    expect(await getSecret(h.db, hostId, "conat-password")).toBe("s2");
    expect(await getSecret(h.db, randomUUID(), "conat-password")).toBeNull();
  });

  it("stores events idempotently and reads them in seq order", async () => {
    const hostId = randomUUID();
    const run = new RunScript().start().stepStart("preflight").stepEnd("preflight", "unchanged").progress("apt", 10);
    const events = parsed(run, hostId);
    const late = events.slice(2);
    const early = events.slice(0, 2);
    expect(await insertEvents(h.db, hostId, late, new Date())).toBe(late.length);
    expect(await insertEvents(h.db, hostId, early, new Date())).toBe(early.length);
    expect(await insertEvents(h.db, hostId, events, new Date())).toBe(0);
    const stored = await listRunEvents(h.db, hostId, run.runId);
    expect(stored.map((e) => e.event.seq)).toEqual([0, 1, 2, 3]);
    expect(stored.map((e) => e.event)).toEqual(events);
  });

  it("lists runs newest first and keeps hosts apart", async () => {
    const hostId = randomUUID();
    const other = randomUUID();
    const old = new RunScript("run-old-000001", 1000).start();
    const fresh = new RunScript("run-new-000001", 2000).start().stepStart("preflight");
    await insertEvents(h.db, hostId, parsed(fresh, hostId), new Date());
    await insertEvents(h.db, hostId, parsed(old, hostId), new Date());
    await insertEvents(h.db, other, parsed(new RunScript().start(), other), new Date());
    const runs = await listRuns(h.db, hostId);
    expect(runs.map((r) => [r.runId, r.events])).toEqual([
      ["run-new-000001", 2],
      ["run-old-000001", 1],
    ]);
  });

  it("delivers NOTIFY to LISTEN", async () => {
    const hostId = randomUUID();
    let resolve: (payload: string) => void = () => undefined;
    const got = new Promise<string>((r) => (resolve = r));
    const stop = await h.db.listen(HOST_CHANGED_CHANNEL, (payload) => {
      if (payload === hostId) resolve(payload);
    });
    await notifyHostChanged(h.db, hostId);
    expect(await got).toBe(hostId);
    await stop();
  });

  it("insertEvents notifies listeners when something was new, and only then", async () => {
    const hostId = randomUUID();
    const marker = randomUUID();
    const heard: string[] = [];
    const stop = await h.db.listen(HOST_CHANGED_CHANNEL, (payload) => heard.push(payload));
    const events = parsed(new RunScript().start(), hostId);
    expect(await insertEvents(h.db, hostId, events, new Date())).toBe(1);
    expect(await insertEvents(h.db, hostId, events, new Date())).toBe(0);
    // Notifications arrive in order: once the marker is here, so is anything the replay sent.
    await notifyHostChanged(h.db, marker);
    await expect.poll(() => heard.includes(marker)).toBe(true);
    expect(heard.filter((p) => p === hostId)).toHaveLength(1);
    await stop();
  });

  it("rolls back a failed transaction", async () => {
    const hostId = randomUUID();
    await expect(
      h.db.transaction(async (tx) => {
        await saveSecret(tx, hostId, "x", "y");
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    expect(await getSecret(h.db, hostId, "x")).toBeNull();
  });
});

describe("pg adapter: LISTEN survives a lost connection", () => {
  const pgInfo = inject("postgres");
  it.skipIf(pgInfo.skipped !== null)("re-LISTENs on a new connection after the old one is killed", async () => {
    if (pgInfo.error) throw new Error(pgInfo.error);
    const db = await openTestPostgres();
    const errors: string[] = [];
    const origError = console.error;
    console.error = (...args: unknown[]) => errors.push(args.map(String).join(" "));
    try {
      await migrate(db);
      const heard: string[] = [];
      await db.listen(HOST_CHANGED_CHANNEL, (p) => heard.push(p));
      const killed = await db.query<{ n: number }>(
        `SELECT count(pg_terminate_backend(pid))::integer AS n FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()`,
      );
      expect(killed[0]?.n).toBe(1);
      const marker = randomUUID();
      // Keep notifying until the new LISTEN connection hears one.
      await expect
        .poll(
          async () => {
            await notifyHostChanged(db, marker);
            return heard.includes(marker);
          },
          { timeout: 15_000, interval: 500 },
        )
        .toBe(true);
      expect(errors.join("\n")).toMatch(/LISTEN connection failed; reconnecting/);
    } finally {
      console.error = origError;
      await db.close();
    }
  });
});
