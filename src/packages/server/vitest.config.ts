import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));

export default defineConfig({
  resolve: {
    // Test against the workspace packages' sources: no build of them needed.
    alias: {
      // The subpath first: an alias also matches as a prefix.
      "@cocalc/project-host-bootstrap/contract": here("../project-host-bootstrap/src/contract.ts"),
      "@cocalc/project-host-bootstrap": here("../project-host-bootstrap/src/index.ts"),
      "@cocalc/util": here("../util/src/index.ts"),
    },
  },
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/build-page-global-setup.ts", "test/postgres-global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Two cores: PGlite instances and Chromium are heavy; two files at a time.
    maxWorkers: 2,
    minWorkers: 1,
  },
});
