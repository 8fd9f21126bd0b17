/**
 * A throwaway PostgreSQL cluster from Debian's `postgresql` package: initdb +
 * pg_ctl into a temp dir, listening on a free port on 127.0.0.1, run as
 * `nobody` when we are root (postgres refuses to run as root).
 */
import { execFile } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import pg from "pg";

const run = promisify(execFile);
const PG_RUN_AS = "nobody";

export const POSTGRES_MISSING_HELP =
  "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/<version>/bin, $PG_BIN_DIR or PATH. " +
  "Install Debian's postgresql package (apt-get install -y postgresql), or set SKIP_POSTGRES=1 to skip the PostgreSQL tests.";

export function findPostgresBin(): string | null {
  const candidates: string[] = [];
  // An explicit directory is the only place looked at (and lets CI prove the failure path).
  if (process.env.PG_BIN_DIR) return [process.env.PG_BIN_DIR].find((dir) => existsSync(join(dir, "initdb")) && existsSync(join(dir, "pg_ctl"))) ?? null;
  const debian = "/usr/lib/postgresql";
  if (existsSync(debian)) {
    const versions = readdirSync(debian)
      .filter((v) => /^\d+$/.test(v))
      .sort((a, b) => Number(b) - Number(a));
    candidates.push(...versions.map((v) => join(debian, v, "bin")));
  }
  candidates.push(...(process.env.PATH ?? "").split(":").filter(Boolean));
  return candidates.find((dir) => existsSync(join(dir, "initdb")) && existsSync(join(dir, "pg_ctl"))) ?? null;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

export interface ThrowawayPostgres {
  url: string;
  stop(): Promise<void>;
}

export async function startThrowawayPostgres(): Promise<ThrowawayPostgres> {
  const bin = findPostgresBin();
  if (!bin) throw new Error(POSTGRES_MISSING_HELP);
  const asRoot = process.getuid?.() === 0;
  const dir = mkdtempSync(join(tmpdir(), "cocalc-pg-"));
  const data = join(dir, "data");
  if (asRoot) {
    const { stdout } = await run("id", ["-u", PG_RUN_AS]);
    const { stdout: gid } = await run("id", ["-g", PG_RUN_AS]);
    chownSync(dir, Number(stdout.trim()), Number(gid.trim()));
  }
  const pgCmd = (cmd: string, args: string[]) =>
    asRoot ? run("runuser", ["-u", PG_RUN_AS, "--", join(bin, cmd), ...args], { cwd: dir }) : run(join(bin, cmd), args, { cwd: dir });
  const port = await freePort();
  try {
    await pgCmd("initdb", ["-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
    // fsync off: a throwaway cluster trades durability for test speed.
    const opts = `-p ${port} -h 127.0.0.1 -k ${dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off`;
    await pgCmd("pg_ctl", ["-D", data, "-l", join(dir, "postgres.log"), "-o", opts, "-w", "-t", "60", "start"]);
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    const e = err as Error & { stderr?: string };
    throw new Error(`starting a throwaway PostgreSQL (${bin}) failed: ${e.stderr || e.message}`);
  }
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    async stop() {
      await pgCmd("pg_ctl", ["-D", data, "-m", "immediate", "-w", "stop"]).catch(() => undefined);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A new, empty database on the cluster; returns its URL. */
export async function createDatabase(adminUrl: string, prefix = "t"): Promise<string> {
  const name = `${prefix}_${Math.random().toString(36).slice(2, 10)}`;
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  const u = new URL(adminUrl);
  u.pathname = `/${name}`;
  return u.toString();
}
