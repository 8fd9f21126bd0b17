export { ThrowawayHost, type ExecOptions, type HostUpOptions, type HostTimings } from "./host.js";
export { defaultRootfsSpec, ensureRootfsTarball, type RootfsSpec } from "./rootfs.js";
export { whyNotSupported, isRoot } from "./machine.js";
export { run, type RunResult } from "./proc.js";
