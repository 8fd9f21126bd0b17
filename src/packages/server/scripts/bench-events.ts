/**
 * Benchmark (not a test): how many events per second the events endpoint
 * stores, on embedded PGlite and on a real PostgreSQL, with several hosts
 * posting batches of 20 at once (each host posts its batches one after the
 * other, like bootstrap.py's sender).
 *
 *   pnpm --filter @cocalc/server bench [-- --hosts 8 --batches 60 --batch-size 20 --db both]
 *
 * PostgreSQL: a throwaway cluster from Debian's postgresql package, or
 * DATABASE_URL when set (the benchmark creates its own database in it).
 */
import { parseArgs } from "node:util";
import { type Db, openPglite, pgDbFromUrl } from "../cloud/bootstrap/db.js";
import { startHub } from "../cloud/bootstrap/hub.js";
import { hostRecord, RunScript } from "../test/support/fixtures.js";
import { serveGoodManifests, startManifestServer } from "../test/support/manifest-server.js";
import { createDatabase, startThrowawayPostgres } from "../test/support/throwaway-postgres.js";

interface BenchOptions {
  hosts: number;
  batches: number;
  batchSize: number;
}

interface BenchResult {
  db: string;
  events: number;
  seconds: number;
  eventsPerSecond: number;
  p50BatchMs: number;
  p95BatchMs: number;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

async function bench(label: string, db: Db, o: BenchOptions): Promise<BenchResult> {
  const manifests = await startManifestServer();
  serveGoodManifests(manifests);
  const hub = await startHub({ db, artifactBaseUrl: manifests.baseUrl, streamRecheckMs: 600_000 });
  try {
    const hosts = await Promise.all(Array.from({ length: o.hosts }, () => hub.provisionHost(hostRecord(), { secrets: {} })));
    // Prepare every body up front so only the endpoint is timed.
    const plans = hosts.map((h) => {
      const run = new RunScript().start();
      while (run.events.length < o.batches * o.batchSize) run.progress("benchmark", (run.events.length / (o.batches * o.batchSize)) * 100);
      const bodies = Array.from({ length: o.batches }, (_, i) =>
        JSON.stringify({ host_id: h.hostId, events: run.events.slice(i * o.batchSize, (i + 1) * o.batchSize) }),
      );
      return { host: h, bodies };
    });
    const latencies: number[] = [];
    const t0 = performance.now();
    await Promise.all(
      plans.map(async ({ host, bodies }) => {
        for (const body of bodies) {
          const t = performance.now();
          const res = await fetch(`${host.baseUrl}/events`, {
            method: "POST",
            headers: { "content-type": "application/json", authorization: `Bearer ${host.token}` },
            body,
          });
          const answer = (await res.json()) as { stored?: number };
          if (res.status !== 200 || answer.stored !== o.batchSize) throw new Error(`batch not stored: ${res.status} ${JSON.stringify(answer)}`);
          latencies.push(performance.now() - t);
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    const events = o.hosts * o.batches * o.batchSize;
    latencies.sort((a, b) => a - b);
    return {
      db: label,
      events,
      seconds: Math.round(seconds * 100) / 100,
      eventsPerSecond: Math.round(events / seconds),
      p50BatchMs: Math.round(percentile(latencies, 50) * 10) / 10,
      p95BatchMs: Math.round(percentile(latencies, 95) * 10) / 10,
    };
  } finally {
    await hub.close();
    await manifests.close();
  }
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const { values } = parseArgs({
    // `pnpm bench -- --flag` passes the `--` through.
    args: argv[0] === "--" ? argv.slice(1) : argv,
    options: {
      hosts: { type: "string", default: "8" },
      batches: { type: "string", default: "60" },
      "batch-size": { type: "string", default: "20" },
      db: { type: "string", default: "both" },
    },
  });
  const o: BenchOptions = { hosts: Number(values.hosts), batches: Number(values.batches), batchSize: Number(values["batch-size"]) };
  console.log(`events endpoint: ${o.hosts} hosts posting ${o.batches} batches of ${o.batchSize} at once`);
  const results: BenchResult[] = [];
  if (values.db === "both" || values.db === "pglite") {
    const db = await openPglite();
    try {
      results.push(await bench("pglite (in-process)", db, o));
    } finally {
      await db.close();
    }
  }
  if (values.db === "both" || values.db === "postgres") {
    const cluster = process.env.DATABASE_URL ? null : await startThrowawayPostgres();
    const db = pgDbFromUrl(await createDatabase(process.env.DATABASE_URL ?? cluster!.url, "bench"));
    try {
      results.push(await bench(`postgresql${cluster ? " (throwaway cluster, fsync off)" : ""}`, db, o));
    } finally {
      await db.close();
      await cluster?.stop();
    }
  }
  console.table(results);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
