/**
 * `@cocalc/project-host-bootstrap/contract`: the shared primitives of the
 * contract between the hub, the stub and bootstrap.py — the regular
 * expressions every side checks names and values with (bootstrap.py holds the
 * same patterns; the conformance vectors keep them in step), and the text rule
 * for events. Import these from here, not from the package root.
 */
export {
  DEB_PACKAGE_RE,
  DNS_NAME_RE,
  ENV_NAME_RE,
  HOST_NAME_RE,
  HOST_PORT_RE,
  IP_RE,
  IPV4_RE,
  NODE_VERSION_RE,
  OS_ID_RE,
  OS_VERSION_RE,
  REGION_RE,
  SECRET_NAME_RE,
  SHA256_RE,
  SYSTEMD_UNIT_RE,
  USER_RE,
  UUID_RE,
  VERSION_RE,
} from "./config.js";
export { isStorableText, RUN_ID_RE, STEP_NAME_RE, STORABLE_TEXT_MESSAGE } from "./events.js";
export { BOOTSTRAP_TOKEN_RE } from "./stub.js";
