/**
 * vitest globalSetup: one throwaway PostgreSQL cluster for the whole run.
 * Its URL (or why there is none) is handed to the tests with `provide`;
 * tests that need it fail with that reason unless SKIP_POSTGRES=1.
 */
import type { TestProject } from "vitest/node";
import { startThrowawayPostgres } from "./support/throwaway-postgres.js";

export interface PostgresForTests {
  url: string | null;
  error: string | null;
  skipped: string | null;
}

declare module "vitest" {
  export interface ProvidedContext {
    postgres: PostgresForTests;
  }
}

export default async function setup(project: TestProject): Promise<(() => Promise<void>) | undefined> {
  if (process.env.SKIP_POSTGRES === "1") {
    const why = "SKIP_POSTGRES=1 is set";
    console.warn(`PostgreSQL tests skipped: ${why}`);
    project.provide("postgres", { url: null, error: null, skipped: why });
    return undefined;
  }
  try {
    const cluster = await startThrowawayPostgres();
    project.provide("postgres", { url: cluster.url, error: null, skipped: null });
    return () => cluster.stop();
  } catch (err) {
    project.provide("postgres", { url: null, error: (err as Error).message, skipped: null });
    return undefined;
  }
}
