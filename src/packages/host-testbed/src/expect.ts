/**
 * The `expect` of the end-state checks that the end-to-end suite and
 * `bootstrap-local` share: vitest's own when running under vitest, and
 * otherwise the same matchers assembled from the same parts (chai plus
 * @vitest/expect's plugins), because vitest's `expect` refuses to load
 * outside its runner.
 */
import type { ExpectStatic } from "vitest";

async function standaloneExpect(): Promise<ExpectStatic> {
  const chai = await import("chai");
  const { JestAsymmetricMatchers, JestChaiExpect, JestExtend } = await import("@vitest/expect");
  chai.use(JestExtend);
  chai.use(JestChaiExpect);
  chai.use(JestAsymmetricMatchers);
  return chai.expect as unknown as ExpectStatic;
}

// vitest's own test workers carry this global (its `expect` needs it); a
// process merely started by a test inherits VITEST=true but not the global.
const inVitestWorker = "__vitest_worker__" in globalThis;

export const expect: ExpectStatic = inVitestWorker ? (await import("vitest")).expect : await standaloneExpect();
