import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

const pkg = (p: string) => fileURLToPath(new URL(`../${p}`, import.meta.url));

export default defineConfig({
  resolve: {
    // Test against the workspace's sources, not whatever dist/ was built last.
    alias: {
      "@cocalc/server": pkg("server/cloud/bootstrap/index.ts"),
      // The subpath first: an alias also matches as a prefix.
      "@cocalc/project-host-bootstrap/contract": pkg("project-host-bootstrap/src/contract.ts"),
      "@cocalc/project-host-bootstrap": pkg("project-host-bootstrap/src/index.ts"),
      "@cocalc/util": pkg("util/src/index.ts"),
    },
  },
  test: {
    include: ["test/**/*.test.ts"],
    // The end-to-end suite boots real containers; one file at a time keeps
    // loop devices and ports from colliding.
    fileParallelism: false,
    testTimeout: 600_000,
    hookTimeout: 600_000,
  },
});
