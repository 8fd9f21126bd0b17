export { ThrowawayHost, type ExecOptions, type HostUpOptions, type HostTimings } from "./host.js";
export { defaultRootfsSpec, ensureRootfsTarball, BASE_PACKAGES, type RootfsSpec } from "./rootfs.js";
export { whyNotSupported, isRoot } from "./machine.js";
export { run, type RunResult } from "./proc.js";
export {
  buildBundle,
  buildNodeMirror,
  publishSite,
  testBundleSpecs,
  BUNDLES,
  DEFAULT_NODE,
  type BundleName,
  type BundleSpec,
  type BuiltBundle,
  type BuiltNode,
  type NodeMirrorSpec,
  type PublishedSite,
} from "./artifacts.js";
export { startArtifactServer, TokenBucket, type ArtifactServer, type ArtifactServerOptions } from "./artifact-server.js";
export {
  Testbed,
  freePort,
  testHostRecord,
  testSecrets,
  STUB_PATH,
  TEST_APT_PACKAGES,
  TESTBED_OS,
  type BootstrapRun,
  type HubVariant,
  type ProvisionedTestHost,
  type TestbedOptions,
} from "./testbed.js";
export { watchArgv } from "./argv-watch.js";
