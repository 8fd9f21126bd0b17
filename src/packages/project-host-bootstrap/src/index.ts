/**
 * @cocalc/project-host-bootstrap: what the hub and the other packages use.
 * Hand-picked: anything not listed here is internal. The regular expressions
 * of the contract are under `@cocalc/project-host-bootstrap/contract`.
 */
export { BOOTSTRAP_PY_PATH, bootstrapPyBytes, bootstrapPySha256 } from "./asset.js";
export {
  BootstrapConfigError,
  type BootstrapPaths,
  bootstrapPaths,
  buildBootstrapConfig,
  defaultAptPackages,
  type HostFacts,
  parseBootstrapConfig,
} from "./builders.js";
export {
  AbsPath,
  ARCHES,
  ARTIFACT_NAMES,
  type Arch,
  type ArtifactName,
  type BootstrapConfig,
  type BootstrapConfigInput,
  BootstrapConfigSchema,
  CONFIG_FILE_NAME,
  type ConfigIssue,
  checkConfig,
  HttpUrl,
  METADATA_ADDRESS,
  OsSchema,
  TOKEN_FILE_NAME,
} from "./config.js";
export {
  type BootstrapEvent,
  type BootstrapEventInput,
  BootstrapEventSchema,
  type EventBatch,
  EventBatchSchema,
  MAX_BATCH_BYTES,
  MAX_EVENTS_PER_BATCH,
  STEP_OUTCOMES,
  type StepOutcome,
} from "./events.js";
export { renderStub, STUB_SH_PATH, type StubOptions, stubOptionsFor } from "./stub.js";
export { criticalPath, type RunTimings, runTimings, type StepDuration, type StepTiming } from "./timings.js";
export {
  CLOUD_CONFIG_STUB_PATH,
  cloudConfigFor,
  renderUserData,
  USER_DATA_PLACEMENTS,
  UserDataError,
  type UserDataPlacement,
} from "./userdata.js";
