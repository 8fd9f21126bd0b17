/**
 * Write schema/bootstrap-config.schema.json from the zod schema:
 *
 *   pnpm --filter @cocalc/project-host-bootstrap gen:schema
 *
 * The file is committed; test/json-schema.test.ts fails when it is stale.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { JSON_SCHEMA_PATH, renderJsonSchema } from "./json-schema.js";

mkdirSync(dirname(JSON_SCHEMA_PATH), { recursive: true });
writeFileSync(JSON_SCHEMA_PATH, renderJsonSchema());
process.stdout.write(`wrote ${JSON_SCHEMA_PATH}\n`);
