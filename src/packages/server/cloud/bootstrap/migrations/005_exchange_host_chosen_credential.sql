-- An idempotent exchange: the host chooses its credential and sends only its
-- sha256 with the bootstrap token. The token remembers which credential it was
-- exchanged for, so the same host asking again (its answer was lost) gets the
-- same acknowledgement ("retry"), while the token with any other credential is
-- refused as a replay. NULL: exchanged by an older stub for a hub-made credential.
ALTER TABLE bootstrap_tokens ADD COLUMN exchanged_for text CHECK (exchanged_for ~ '^[0-9a-f]{64}$');

ALTER TABLE bootstrap_credential_log DROP CONSTRAINT bootstrap_credential_log_kind_check;
ALTER TABLE bootstrap_credential_log ADD CONSTRAINT bootstrap_credential_log_kind_check
  CHECK (kind IN ('exchange', 'retry', 'replay', 'rotate', 'revoke', 'refused'));
