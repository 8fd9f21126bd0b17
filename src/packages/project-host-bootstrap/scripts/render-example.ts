/**
 * Print the stub or the config for the example host:
 *
 *   pnpm --filter @cocalc/project-host-bootstrap exec tsx scripts/render-example.ts stub
 *   pnpm --filter @cocalc/project-host-bootstrap exec tsx scripts/render-example.ts config
 *
 * Used by `pnpm lint:shell` (shellcheck over the rendered stub) and by the
 * README's main-job command until the demo exists.
 */
import { buildBootstrapConfig } from "../src/builders.js";
import { renderStub, stubOptionsFor } from "../src/stub.js";
import { EXAMPLE_BASE_URL, EXAMPLE_TOKEN, exampleHostFacts } from "./example-host.js";

function main(argv: string[]): number {
  const what = argv[0];
  const config = buildBootstrapConfig(exampleHostFacts());
  if (what === "config") {
    process.stdout.write(`${JSON.stringify(config, null, 2)}\n`);
    return 0;
  }
  if (what === "stub") {
    process.stdout.write(renderStub(stubOptionsFor(config, { baseUrl: EXAMPLE_BASE_URL, token: EXAMPLE_TOKEN })));
    return 0;
  }
  process.stderr.write("usage: render-example.ts stub|config\n");
  return 2;
}

process.exitCode = main(process.argv.slice(2));
