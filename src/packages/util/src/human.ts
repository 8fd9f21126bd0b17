/**
 * Human-readable durations and sizes for logs, progress pages and error
 * messages. Both are for people, not for parsing.
 */

function checkFinite(name: string, value: number): void {
  if (!Number.isFinite(value)) throw new RangeError(`${name}: not a finite number: ${value}`);
}

const pad2 = (n: number): string => String(n).padStart(2, "0");

/**
 * `0.25` -> "250ms", `5` -> "5.0s", `65` -> "1m 05s", `3725` -> "1h 02m 05s",
 * `90061` -> "1d 01h 01m". Under a minute keeps one decimal (step timings
 * are often a few seconds); above a day the seconds are noise and dropped.
 */
export function humanDuration(seconds: number): string {
  checkFinite("humanDuration", seconds);
  if (seconds < 0) return `-${humanDuration(-seconds)}`;
  if (seconds < 1) return `${Math.round(seconds * 1000)}ms`;
  if (seconds < 60) {
    const tenths = Math.round(seconds * 10) / 10;
    if (tenths < 60) return `${tenths.toFixed(1)}s`;
  }
  const total = Math.round(seconds);
  const d = Math.floor(total / 86400);
  const h = Math.floor((total % 86400) / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (d > 0) return `${d}d ${pad2(h)}h ${pad2(m)}m`;
  if (h > 0) return `${h}h ${pad2(m)}m ${pad2(s)}s`;
  return `${m}m ${pad2(s)}s`;
}

const BINARY_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] as const;

/**
 * Binary (1024-based) sizes: `512` -> "512 B", `1536` -> "1.5 KiB",
 * `1610612736` -> "1.5 GiB". One decimal below 10 units, none above, so the
 * width stays small on the progress page.
 */
export function humanBytes(bytes: number): string {
  checkFinite("humanBytes", bytes);
  if (bytes < 0) return `-${humanBytes(-bytes)}`;
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < BINARY_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${Math.round(value)} B`;
  // Rounding may reach 1024 (e.g. 1023.96 KiB): move up a unit instead.
  if (Math.round(value) >= 1024 && unit < BINARY_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const text = value < 10 ? value.toFixed(1) : String(Math.round(value));
  return `${text} ${BINARY_UNITS[unit]}`;
}
