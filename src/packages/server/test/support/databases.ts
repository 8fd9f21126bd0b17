/**
 * The two databases every store test runs on: PGlite (always) and a real
 * PostgreSQL (the throwaway cluster of the global setup). `describeOnDatabases`
 * registers a suite per database; the PostgreSQL one fails with the reason when
 * the server is missing, unless SKIP_POSTGRES=1 (then it says why it skips).
 */
import { afterAll, beforeAll, describe, inject, it } from "vitest";
import { type Db, openPglite, pgDbFromUrl } from "../../cloud/bootstrap/db.js";
import { migrate } from "../../cloud/bootstrap/migrate.js";
import { createDatabase } from "./throwaway-postgres.js";

export interface DbHandle {
  db: Db;
}

export async function openTestPostgres(): Promise<Db> {
  const pgInfo = inject("postgres");
  if (!pgInfo.url) throw new Error(pgInfo.error ?? pgInfo.skipped ?? "no PostgreSQL");
  return pgDbFromUrl(await createDatabase(pgInfo.url));
}

export function describeOnDatabases(title: string, body: (h: DbHandle) => void): void {
  const kinds: ["pglite", "postgres"] = ["pglite", "postgres"];
  for (const kind of kinds) {
    const pgInfo = inject("postgres");
    if (kind === "postgres" && pgInfo.skipped) {
      console.warn(`${title} [postgres] skipped: ${pgInfo.skipped}`);
      describe.skip(`${title} [postgres]`, () => body({ db: undefined as unknown as Db }));
      continue;
    }
    if (kind === "postgres" && pgInfo.error) {
      describe(`${title} [postgres]`, () => {
        it("needs a PostgreSQL server", () => {
          throw new Error(pgInfo.error!);
        });
      });
      continue;
    }
    describe(`${title} [${kind}]`, () => {
      const handle = {} as DbHandle;
      beforeAll(async () => {
        handle.db = kind === "pglite" ? await openPglite() : await openTestPostgres();
        await migrate(handle.db);
      });
      afterAll(async () => {
        await handle.db?.close();
      });
      body(handle);
    });
  }
}
