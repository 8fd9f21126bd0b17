/**
 * Numbered plain-SQL migrations (`migrations/NNN_name.sql`), applied in order,
 * in one transaction, recorded in `bootstrap_migrations`. An advisory
 * lock makes concurrent hubs starting against one database take turns.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Db, Queryable } from "./db.js";
import { MIGRATIONS_DIR } from "./paths.js";

const MIGRATION_FILE_RE = /^(\d{3})_([a-z0-9_]+)\.sql$/;
// Arbitrary constant shared by every hub: "one migrator at a time".
const MIGRATION_LOCK_KEY = 4_242_017;

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

export function loadMigrations(dir = MIGRATIONS_DIR): Migration[] {
  const migrations: Migration[] = [];
  for (const file of readdirSync(dir).sort()) {
    const m = MIGRATION_FILE_RE.exec(file);
    if (!m) continue;
    migrations.push({ version: Number(m[1]), name: m[2]!, sql: readFileSync(join(dir, file), "utf8") });
  }
  migrations.forEach((m, i) => {
    if (m.version !== i + 1) throw new Error(`migration numbers must run 001, 002, ... without gaps; found ${m.version} at position ${i + 1}`);
  });
  return migrations;
}

async function appliedVersions(tx: Queryable): Promise<Set<number>> {
  await tx.exec(`CREATE TABLE IF NOT EXISTS bootstrap_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
  )`);
  const rows = await tx.query<{ version: number }>("SELECT version FROM bootstrap_migrations");
  return new Set(rows.map((r) => r.version));
}

/** Apply every pending migration; returns the versions applied now. */
export async function migrate(db: Db, migrations = loadMigrations()): Promise<number[]> {
  return db.transaction(async (tx) => {
    await tx.query("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK_KEY]);
    const done = await appliedVersions(tx);
    const applied: number[] = [];
    for (const m of migrations) {
      if (done.has(m.version)) continue;
      await tx.exec(m.sql);
      await tx.query("INSERT INTO bootstrap_migrations (version, name) VALUES ($1, $2)", [m.version, m.name]);
      applied.push(m.version);
    }
    return applied;
  });
}
