export { watchArgv } from "./argv-watch.js";
export { type ArtifactServer, type ArtifactServerOptions, startArtifactServer, TokenBucket } from "./artifact-server.js";
export {
  BUNDLES,
  type BuiltBundle,
  type BuiltNode,
  type BundleName,
  type BundleSpec,
  buildBundle,
  buildNodeMirror,
  DEFAULT_NODE,
  type NodeMirrorSpec,
  type PublishedSite,
  publishSite,
  testBundleSpecs,
} from "./artifacts.js";
export { type ExecOptions, type HostTimings, type HostUpOptions, ThrowawayHost } from "./host.js";
export { isRoot, whyNotSupported } from "./machine.js";
export { type RunResult, run } from "./proc.js";
export { BASE_PACKAGES, defaultRootfsSpec, ensureRootfsTarball, type RootfsSpec } from "./rootfs.js";
export {
  type BootstrapRun,
  freePort,
  type HubVariant,
  type ProvisionedTestHost,
  STUB_PATH,
  TEST_APT_PACKAGES,
  TESTBED_OS,
  Testbed,
  type TestbedOptions,
  testHostRecord,
  testSecrets,
} from "./testbed.js";
