import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    // Tests run against @cocalc/util's source, like tsconfig.json's `paths`
    // (see src/packages/util/README.md); node at runtime uses its dist.
    alias: { "@cocalc/util": fileURLToPath(new URL("../util/src/index.ts", import.meta.url)) },
  },
  test: {
    include: ["test/**/*.test.ts"],
    // Stub runs and `pnpm pack` start real processes; the machine has 2 cores.
    testTimeout: 60_000,
    hookTimeout: 120_000,
  },
});
