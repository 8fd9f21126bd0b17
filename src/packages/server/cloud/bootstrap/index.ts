/**
 * @cocalc/server's bootstrap provisioning: the hub side of project-host
 * bootstrap. Hand-picked: what the hub mounts and calls, and what the
 * testbed and the demo use; everything else (the store's SQL, the stream,
 * the page) is internal.
 */
export { type CreateAppOptions, createApp, DEFAULT_PREFIX, type HubApp } from "./app.js";
export {
  authorizeHost,
  CREDENTIAL_RE,
  type CredentialGrant,
  type CredentialPolicy,
  DEFAULT_ROTATE_AFTER_MS,
  DEFAULT_ROTATION_GRACE_MS,
  exchangeOrRotate,
  type HostAuthVerdict,
  type HostCredentialRecord,
  hostCredentialRecord,
  revokeHostCredentials,
} from "./credentials.js";
export { type Db, openDb, openPglite, pgDb, pgDbFromUrl, pgliteDb, type Queryable } from "./db.js";
export {
  type FleetHost,
  type FleetStep,
  type FleetView,
  fleetView,
} from "./fleet.js";
export {
  type BootstrapMetadata,
  type BootstrapStatusAdapter,
  type BootstrapStatusContext,
  type BootstrapStatusValue,
  bootstrapMetadata,
  getHostRecordState,
  HostRecordReporter,
  jsonbMetadataAdapter,
} from "./host-records.js";
export {
  assembleHostConfig,
  type HostRecord,
  type HostRecordInput,
  HostRecordSchema,
  hostBaseUrl,
  type ProvisionDeps,
  type ProvisionedHost,
  ProvisionRefusedError,
  provisionHost,
  type SiteSettings,
  type SiteSettingsInput,
  SiteSettingsSchema,
} from "./hosts.js";
export { HttpError } from "./http-errors.js";
export { type RunningHub, type StartHubOptions, startHub } from "./hub.js";
export {
  hostLifecycle,
  type LifecycleDeps,
  type LifecycleEvent,
  type LifecycleResult,
  onHostDeleted,
  onHostDeprovisioned,
  onHostStopped,
  type RevokeHostCredentials,
  revokeHostCredentialsCallPoint,
} from "./lifecycle.js";
export { ManifestError, ManifestFetcher, type ManifestFetcherOptions, type ResolvedArtifact } from "./manifests.js";
export { migrate } from "./migrate.js";
export { type BootstrapRouter, type BootstrapRouterDeps, createBootstrapRouter, isLoopback } from "./routes.js";
export { DEFAULT_STALE_AFTER_S, type HostStatus, hostStatus, type RunState, type StepState, type StepStatus } from "./status.js";
export { DEFAULT_TOKEN_TTL_MS, issueToken, revokeTokens } from "./tokens.js";
