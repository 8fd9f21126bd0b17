/**
 * The demo's background half: builds the artifacts, serves them and runs the
 * hub (embedded PGlite, persisted in the demo's directory) until SIGTERM.
 * `demo.ts` starts it detached and reads `services.json` once it is ready.
 *
 *   tsx src/demo-services.ts --dir DIR [--port N]
 */
import { renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Testbed } from "./testbed.js";

export interface DemoServices {
  pid: number;
  hubUrl: string;
  bootstrapUrl: string;
  artifactUrl: string;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { dir: { type: "string" }, port: { type: "string" } } });
  if (!values.dir) throw new Error("--dir is required");
  const log = (line: string) => process.stderr.write(`${line}\n`);
  const bed = await Testbed.start({
    log,
    hubPort: values.port ? Number(values.port) : 0,
    hubDataDir: join(values.dir, "pglite"),
    workDir: join(values.dir, "site"),
    enableAdmin: true,
  });
  const info: DemoServices = { pid: process.pid, hubUrl: bed.hub.url, bootstrapUrl: bed.hub.bootstrapUrl, artifactUrl: bed.artifactServer.url };
  const file = join(values.dir, "services.json");
  writeFileSync(`${file}.tmp`, `${JSON.stringify(info, null, 2)}\n`);
  renameSync(`${file}.tmp`, file);
  log(`ready: hub ${info.hubUrl}`);
  await new Promise<void>((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  await bed.close();
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    process.stderr.write(`error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exit(1);
  },
);
