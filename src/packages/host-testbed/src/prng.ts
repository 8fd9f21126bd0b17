import { createHash } from "node:crypto";

/**
 * xorshift32 seeded from a string: fast and deterministic, so generated
 * artifacts (test bundles, the benchmark's workload) are the same bytes on
 * every machine. Statistical quality is irrelevant here.
 */
export class Prng {
  private s: number;
  constructor(seed: string) {
    this.s = createHash("sha256").update(seed).digest().readUInt32LE(0) || 1;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.next() % xs.length]!;
  }
  /** Uniform in [0, 1). */
  float(): number {
    return this.next() / 4294967296;
  }
  /** Index in [0, n) with a Zipf-like skew: low indices are much more common. */
  skewed(n: number): number {
    const u = this.float();
    return Math.min(n - 1, Math.floor(n * u * u * u));
  }
  /** Log-uniform integer in [lo, hi]. */
  logUniform(lo: number, hi: number): number {
    return Math.round(Math.exp(Math.log(lo) + this.float() * (Math.log(hi) - Math.log(lo))));
  }
}
