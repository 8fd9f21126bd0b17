/**
 * The JSON Schema of the bootstrap config, generated from the zod schema
 * (input side: defaults are optional, as a hand-written config may omit them).
 */
import { fileURLToPath } from "node:url";
import { z } from "zod/v4";
import { BootstrapConfigSchema } from "../src/config.js";

export const JSON_SCHEMA_PATH = fileURLToPath(new URL("../schema/bootstrap-config.schema.json", import.meta.url));
export const JSON_SCHEMA_ID = "https://cocalc.com/schemas/project-host-bootstrap/bootstrap-config.schema.json";

/**
 * Pretty, stable text of the JSON Schema, with a trailing newline. Each
 * "description" goes last in its object: zod 4 and zod 3.25's `zod/v4`
 * generate the same schema with that key in different places.
 */
export function renderJsonSchema(): string {
  const schema = z.toJSONSchema(BootstrapConfigSchema, {
    io: "input",
    target: "draft-2020-12",
    // zod leaves out the default of a field whose schema checks in a
    // preprocess step (the config's bounded arrays): put it back.
    override: ({ zodSchema, jsonSchema }) => {
      const def = zodSchema._zod.def as { type: string; defaultValue?: unknown };
      if (def.type === "default" && jsonSchema.default === undefined) jsonSchema.default = JSON.parse(JSON.stringify(def.defaultValue)) as unknown;
    },
  });
  return `${JSON.stringify(descriptionsLast({ $id: JSON_SCHEMA_ID, ...schema }), null, 2)}\n`;
}

function descriptionsLast(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(descriptionsLast);
  if (node === null || typeof node !== "object") return node;
  const out: Record<string, unknown> = {};
  const entries = Object.entries(node as Record<string, unknown>);
  for (const [k, v] of entries) if (k !== "description") out[k] = descriptionsLast(v);
  for (const [k, v] of entries) if (k === "description") out[k] = v;
  return out;
}
