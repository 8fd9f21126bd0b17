/**
 * One database interface, two adapters: `pg` (production; several hubs share
 * one PostgreSQL) and PGlite (embedded default for the demo and tests). The
 * store only ever talks to `Db`, so the same SQL runs on both.
 */
import { PGlite } from "@electric-sql/pglite";
import pg from "pg";

/** What the store needs from a connection: parameterised queries. */
export interface Queryable {
  query<Row extends object>(sql: string, params?: readonly unknown[]): Promise<Row[]>;
  /** Several statements without parameters (migrations). */
  exec(sql: string): Promise<void>;
}

export interface Db extends Queryable {
  readonly kind: "pg" | "pglite";
  /** Run `fn` in one transaction on one connection; rolled back if it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  /** LISTEN on a channel; resolves to a function that stops listening. */
  listen(channel: string, onPayload: (payload: string) => void): Promise<() => Promise<void>>;
  close(): Promise<void>;
}

const defaultLogError = (message: string, error: unknown) => console.error(`bootstrap db: ${message}:`, error);

const CHANNEL_RE = /^[a-z_][a-z0-9_]{0,62}$/;

function checkChannel(channel: string): string {
  // LISTEN takes an identifier, not a parameter; only allow plain names.
  if (!CHANNEL_RE.test(channel)) throw new Error(`invalid channel name ${JSON.stringify(channel)}`);
  return channel;
}

// --- PostgreSQL through pg ------------------------------------------------------

export function pgDb(pool: pg.Pool, logError: (message: string, error: unknown) => void = defaultLogError): Db {
  // One dedicated connection carries every LISTEN of this process.
  let listener: Promise<pg.PoolClient> | null = null;
  let closed = false;
  const handlers = new Map<string, Set<(payload: string) => void>>();

  // Without a listener, an idle client's error (server restart, network) would crash the process.
  pool.on("error", (err) => logError("idle PostgreSQL connection failed", err));

  async function connectListener(): Promise<pg.PoolClient> {
    const client = await pool.connect();
    client.on("notification", (msg) => {
      for (const h of handlers.get(msg.channel) ?? []) h(msg.payload ?? "");
    });
    client.on("error", (err) => {
      // Lost the LISTEN connection: drop it and listen again on a new one.
      // Streams re-derive their status on a timer, so a missed NOTIFY only delays them.
      logError("PostgreSQL LISTEN connection failed; reconnecting", err);
      client.release(err);
      listener = null;
      if (!closed) setTimeout(() => void relisten(), 1000).unref();
    });
    for (const channel of handlers.keys()) await client.query(`LISTEN ${channel}`);
    return client;
  }

  function listenerClient(): Promise<pg.PoolClient> {
    listener ??= connectListener().catch((err: unknown) => {
      listener = null;
      throw err;
    });
    return listener;
  }

  async function relisten(): Promise<void> {
    if (closed || handlers.size === 0) return;
    try {
      await listenerClient();
    } catch (err) {
      logError("PostgreSQL LISTEN reconnect failed; retrying", err);
      setTimeout(() => void relisten(), 5000).unref();
    }
  }

  return {
    kind: "pg",
    async query<Row extends object>(sql: string, params: readonly unknown[] = []) {
      const r = await pool.query(sql, params as unknown[]);
      return r.rows as Row[];
    },
    async exec(sql) {
      await pool.query(sql);
    },
    async transaction(fn) {
      const client = await pool.connect();
      try {
        await client.query("BEGIN");
        const tx: Queryable = {
          async query<Row extends object>(sql: string, params: readonly unknown[] = []) {
            return (await client.query(sql, params as unknown[])).rows as Row[];
          },
          async exec(sql: string) {
            await client.query(sql);
          },
        };
        const out = await fn(tx);
        await client.query("COMMIT");
        return out;
      } catch (err) {
        await client.query("ROLLBACK").catch(() => undefined);
        throw err;
      } finally {
        client.release();
      }
    },
    async listen(channel, onPayload) {
      checkChannel(channel);
      let set = handlers.get(channel);
      const isNew = !set;
      if (!set) {
        set = new Set();
        handlers.set(channel, set);
      }
      set.add(onPayload);
      const client = await listenerClient();
      // A client connected after the channel was added has LISTENed already; once more is harmless.
      if (isNew) await client.query(`LISTEN ${channel}`);
      const handlerSet = set;
      return async () => {
        handlerSet.delete(onPayload);
      };
    },
    async close() {
      closed = true;
      const l = listener;
      listener = null;
      if (l) (await l.catch(() => null))?.release();
      await pool.end();
    },
  };
}

export function pgDbFromUrl(url: string, max = 10): Db {
  return pgDb(new pg.Pool({ connectionString: url, max }));
}

// --- PGlite (embedded) ------------------------------------------------------------

export function pgliteDb(db: PGlite): Db {
  return {
    kind: "pglite",
    async query<Row extends object>(sql: string, params: readonly unknown[] = []) {
      return (await db.query<Row>(sql, params as unknown[])).rows;
    },
    async exec(sql) {
      await db.exec(sql);
    },
    async transaction(fn) {
      return db.transaction(async (t) =>
        fn({
          async query<Row extends object>(sql: string, params: readonly unknown[] = []) {
            return (await t.query<Row>(sql, params as unknown[])).rows;
          },
          async exec(sql: string) {
            await t.exec(sql);
          },
        }),
      );
    },
    async listen(channel, onPayload) {
      const stop = await db.listen(checkChannel(channel), onPayload);
      return stop;
    },
    async close() {
      await db.close();
    },
  };
}

/** Embedded PGlite: in memory when `dataDir` is undefined, else persisted there. */
export async function openPglite(dataDir?: string): Promise<Db> {
  const db = dataDir ? await PGlite.create(dataDir) : await PGlite.create();
  return pgliteDb(db);
}

/** `postgres://...` → pg; anything else (or nothing) → embedded PGlite. */
export async function openDb(opts: { databaseUrl?: string; dataDir?: string } = {}): Promise<Db> {
  if (opts.databaseUrl) return pgDbFromUrl(opts.databaseUrl);
  return openPglite(opts.dataDir);
}
