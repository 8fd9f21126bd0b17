/** @cocalc/server's bootstrap provisioning: the hub side of project-host bootstrap. */
export * from "./app.js";
export * from "./db.js";
export * from "./hosts.js";
export * from "./hub.js";
export * from "./manifests.js";
export * from "./migrate.js";
export * from "./routes.js";
export * from "./status.js";
export * from "./store.js";
export * from "./tokens.js";
export { HttpError } from "./http-errors.js";
