#!/usr/bin/env node
/**
 * Start the hub side on its own:
 *
 *   node dist/cloud/bootstrap/server.js --artifact-base-url URL [options]
 *   tsx cloud/bootstrap/server.ts ...            (from the package, no build)
 *
 * Prints one JSON line `{"url": ..., "bootstrap_url": ...}` once it listens.
 */
import { parseArgs } from "node:util";
import { startHub } from "./hub.js";

const HELP = `Usage: cocalc-bootstrap-hub --artifact-base-url URL [options]

  --port N               port to listen on (default 0: any free port)
  --host ADDR            address to bind (default 127.0.0.1)
  --database-url URL     PostgreSQL URL; prefer the DATABASE_URL environment
                         variable when it holds a password (argv is public)
  --data-dir DIR         embedded PGlite data directory (default: in memory)
  --public-url URL       URL hosts use to reach this hub (default http://host:port)
  --prefix PATH          where the bootstrap routes are mounted (default /bootstrap)
  --artifact-base-url U  base of <artifact>/latest-<os>-<arch>.json manifests
  --node-version X.Y.Z   Node.js version for hosts (default 20.18.1)
  --node-dist-url URL    Node.js dist mirror (default https://nodejs.org/dist)
  --conat-url URL        conat server for hosts (default the public URL)
  --stale-after S        seconds of silence before a run shows as stale (default 120)
  --admin                enable POST /admin/hosts (loopback only, off by default) to
                         provision hosts; an existing host only with "replace": true
  -h, --help             this help
`;

async function main(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    // `pnpm start -- --flag` passes the `--` through.
    args: argv[0] === "--" ? argv.slice(1) : argv,
    options: {
      port: { type: "string" },
      host: { type: "string" },
      "database-url": { type: "string" },
      "data-dir": { type: "string" },
      "public-url": { type: "string" },
      prefix: { type: "string" },
      "artifact-base-url": { type: "string" },
      "node-version": { type: "string" },
      "node-dist-url": { type: "string" },
      "conat-url": { type: "string" },
      "stale-after": { type: "string" },
      admin: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (v.help) {
    process.stdout.write(HELP);
    return 0;
  }
  if (!v["artifact-base-url"]) {
    process.stderr.write(`error: --artifact-base-url is required\n\n${HELP}`);
    return 2;
  }
  const settings: Record<string, unknown> = {};
  if (v["node-version"]) settings.node_version = v["node-version"];
  if (v["node-dist-url"]) settings.node_dist_url = v["node-dist-url"];
  if (v["conat-url"]) settings.conat_urls = [v["conat-url"]];
  const hub = await startHub({
    port: v.port === undefined ? 0 : Number(v.port),
    host: v.host,
    dbUrl: v["database-url"] ?? process.env.DATABASE_URL,
    dataDir: v["data-dir"],
    publicUrl: v["public-url"],
    prefix: v.prefix,
    artifactBaseUrl: v["artifact-base-url"],
    settings,
    staleAfterS: v["stale-after"] === undefined ? undefined : Number(v["stale-after"]),
    enableAdmin: v.admin ?? false,
  });
  process.stdout.write(`${JSON.stringify({ url: hub.url, bootstrap_url: hub.bootstrapUrl, database: hub.db.kind })}\n`);
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  await hub.close();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`error: ${(err as Error).message}\n`);
    process.exit(1);
  },
);
