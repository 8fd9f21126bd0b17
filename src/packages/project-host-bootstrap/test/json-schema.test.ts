import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { JSON_SCHEMA_PATH, renderJsonSchema } from "../scripts/json-schema.js";

type JsonSchema = { [key: string]: unknown };

/** Every property, at any depth (through anyOf, items, records and $defs), with its path. */
function* properties(node: unknown, path: string): Generator<[string, JsonSchema]> {
  if (node === null || typeof node !== "object") return;
  const s = node as JsonSchema;
  for (const [name, child] of Object.entries((s.properties as Record<string, JsonSchema> | undefined) ?? {})) {
    yield [`${path}.${name}`, child];
    yield* properties(child, `${path}.${name}`);
  }
  for (const key of ["anyOf", "oneOf", "allOf"]) for (const child of (s[key] as unknown[] | undefined) ?? []) yield* properties(child, path);
  if (s.items) yield* properties(s.items, `${path}[]`);
  if (typeof s.additionalProperties === "object") yield* properties(s.additionalProperties, `${path}.*`);
  for (const [name, child] of Object.entries((s.$defs as Record<string, unknown> | undefined) ?? {})) yield* properties(child, `#/$defs/${name}`);
}

describe("schema/bootstrap-config.schema.json", () => {
  it("is fresh (regenerated in memory, compared byte for byte)", () => {
    const committed = readFileSync(JSON_SCHEMA_PATH, "utf8");
    expect(
      committed === renderJsonSchema(),
      "schema/bootstrap-config.schema.json is stale: run `pnpm --filter @cocalc/project-host-bootstrap gen:schema` and commit it",
    ).toBe(true);
  });

  it("is pretty JSON with a trailing newline and describes the input side", () => {
    const text = renderJsonSchema();
    expect(text.endsWith("}\n")).toBe(true);
    const schema = JSON.parse(text) as JsonSchema;
    expect(schema.$schema).toBe("https://json-schema.org/draft/2020-12/schema");
    // Input side: fields with defaults (parallel, env, secrets, tunnel) are optional.
    expect(schema.required).not.toContain("parallel");
    expect(schema.required).toEqual(expect.arrayContaining(["schema_version", "host", "bootstrap_user", "artifacts"]));
    expect(schema.additionalProperties).toBe(false);
  });

  it("has a description on every field", () => {
    const schema = JSON.parse(renderJsonSchema()) as JsonSchema;
    const all = [...properties(schema, "$")];
    expect(all.length).toBeGreaterThan(50);
    const missing = all.filter(([, s]) => typeof s.description !== "string" || s.description.trim() === "").map(([p]) => p);
    expect(missing, "fields without .describe() in src/config.ts").toEqual([]);
    expect(typeof schema.description).toBe("string");
  });
});
