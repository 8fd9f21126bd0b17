/**
 * The hub's host lifecycle call points. Stopping, deleting or deprovisioning
 * a host revokes every credential it holds with the hub, at once, so nothing
 * on a stopped or gone VM (its user-data, a copy of its files) can speak for
 * it any more; deleting and deprovisioning also drop the secrets stored for
 * it (the conat password, the tunnel token). The hub's own lifecycle code
 * calls these where it stops, deletes and deprovisions a host; the admin
 * routes (app.ts) call them for the demo and the tests.
 *
 * The revocation itself is one function, `RevokeHostCredentials`; the default,
 * `revokeHostCredentialsCallPoint`, revokes the host credentials and the
 * bootstrap tokens (credentials.ts).
 */

import { revokeHostCredentialsIn } from "./credentials.js";
import type { Db, Queryable } from "./db.js";
import { deleteHostSecrets, getHost } from "./store.js";

/** Revoke every credential of the host (bootstrap tokens, host credentials); how many were revoked. */
export type RevokeHostCredentials = (db: Queryable, hostId: string, now: Date) => Promise<number>;

/**
 * Where the host's credentials are revoked: every host credential and every
 * bootstrap token of the host, in the caller's transaction, and the revocation
 * written to the host's credential log.
 */
export const revokeHostCredentialsCallPoint: RevokeHostCredentials = async (db, hostId, now) => {
  const { credentials, tokens } = await revokeHostCredentialsIn(db, hostId, now, "revoked by the hub's host lifecycle");
  return credentials + tokens;
};

export type LifecycleEvent = "stop" | "delete" | "deprovision";

export interface LifecycleDeps {
  db: Db;
  /** Defaults to revokeHostCredentialsCallPoint. */
  revoke?: RevokeHostCredentials;
  now?: () => Date;
}

export interface LifecycleResult {
  hostId: string;
  event: LifecycleEvent;
  /** Credentials revoked now (0: there were none left, e.g. a second stop). */
  revoked: number;
  /** Stored secrets dropped (delete and deprovision only). */
  secretsDeleted: number;
}

async function onLifecycle(deps: LifecycleDeps, hostId: string, event: LifecycleEvent): Promise<LifecycleResult> {
  const revoke = deps.revoke ?? revokeHostCredentialsCallPoint;
  const now = deps.now?.() ?? new Date();
  return deps.db.transaction(async (tx) => {
    const revoked = await revoke(tx, hostId, now);
    const secretsDeleted = event === "stop" ? 0 : await deleteHostSecrets(tx, hostId);
    return { hostId, event, revoked, secretsDeleted };
  });
}

/** The host is stopped: nothing on it may fetch its config or secrets, or report, until it is provisioned again. */
export function onHostStopped(deps: LifecycleDeps, hostId: string): Promise<LifecycleResult> {
  return onLifecycle(deps, hostId, "stop");
}

/** The host is deleted: its credentials revoked and its stored secrets dropped (its run history is kept). */
export function onHostDeleted(deps: LifecycleDeps, hostId: string): Promise<LifecycleResult> {
  return onLifecycle(deps, hostId, "delete");
}

/**
 * The host is deprovisioned (`bootstrap.py deprovision` ran on it, or is about
 * to): credentials revoked, stored secrets dropped. A fresh bootstrap needs a
 * new provisioning (new token, secrets stored again).
 */
export function onHostDeprovisioned(deps: LifecycleDeps, hostId: string): Promise<LifecycleResult> {
  return onLifecycle(deps, hostId, "deprovision");
}

/** The call point for an event, refusing an unknown host (null). */
export async function hostLifecycle(deps: LifecycleDeps, hostId: string, event: LifecycleEvent): Promise<LifecycleResult | null> {
  if ((await getHost(deps.db, hostId)) === null) return null;
  return onLifecycle(deps, hostId, event);
}
