/**
 * The JSON Schema of the bootstrap config, generated from the zod schema
 * (input side: defaults are optional, as a hand-written config may omit them).
 */
import { fileURLToPath } from "node:url";
import { z } from "zod/v4";
import { BootstrapConfigSchema } from "../src/config.js";

export const JSON_SCHEMA_PATH = fileURLToPath(new URL("../schema/bootstrap-config.schema.json", import.meta.url));
export const JSON_SCHEMA_ID = "https://cocalc.com/schemas/project-host-bootstrap/bootstrap-config.schema.json";

/** Pretty, stable text of the JSON Schema, with a trailing newline. */
export function renderJsonSchema(): string {
  const schema = z.toJSONSchema(BootstrapConfigSchema, { io: "input", target: "draft-2020-12" });
  return `${JSON.stringify({ $id: JSON_SCHEMA_ID, ...schema }, null, 2)}\n`;
}
