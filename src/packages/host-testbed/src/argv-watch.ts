/**
 * Watches every process's argv on this machine (the hosts' processes
 * included: their PID namespaces are children of ours) for a secret, while
 * a bootstrap runs. Sampling can miss a process that lives less than the
 * interval, so the interval is short; the log and file checks cover the rest.
 */
import { readdirSync, readFileSync } from "node:fs";

export interface ArgvWatch {
  /** Command lines that contained the secret (with the secret masked). */
  stop(): { samples: number; hits: string[] };
}

export function watchArgv(secret: string, intervalMs = 25): ArgvWatch {
  const hits = new Set<string>();
  let samples = 0;
  const scan = () => {
    samples++;
    for (const entry of readdirSync("/proc")) {
      if (!/^\d+$/.test(entry)) continue;
      let cmdline: string;
      try {
        cmdline = readFileSync(`/proc/${entry}/cmdline`, "latin1");
      } catch {
        continue; // exited meanwhile
      }
      if (cmdline.includes(secret)) hits.add(cmdline.split("\0").join(" ").split(secret).join("<TOKEN>"));
    }
  };
  const timer = setInterval(scan, intervalMs);
  scan();
  return {
    stop() {
      clearInterval(timer);
      scan();
      return { samples, hits: [...hits] };
    },
  };
}
