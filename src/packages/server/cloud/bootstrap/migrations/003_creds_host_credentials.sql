-- Host credentials (issue 11): the user-data bootstrap token is exchanged once
-- for a host credential; only the sha256 of either is ever stored.
ALTER TABLE bootstrap_tokens ADD COLUMN exchanged_at timestamptz;
ALTER TABLE bootstrap_tokens ADD COLUMN exchanged_from text;

CREATE TABLE bootstrap_credentials (
  credential_hash text PRIMARY KEY CHECK (credential_hash ~ '^[0-9a-f]{64}$'),
  host_id         uuid NOT NULL,
  created_at      timestamptz NOT NULL,
  -- The hub's schedule: from then on the host is told to rotate (and does).
  rotate_after    timestamptz NOT NULL,
  -- Set when a rotation issued a successor: still valid until grace_until or
  -- until the successor is first used, whichever comes first.
  superseded_at   timestamptz,
  grace_until     timestamptz,
  first_used_at   timestamptz,
  last_used_at    timestamptz,
  revoked_at      timestamptz,
  revoked_why     text
);
CREATE INDEX bootstrap_credentials_host ON bootstrap_credentials (host_id, created_at);

-- What the operator sees: every exchange, refused replay, rotation and revocation.
CREATE TABLE bootstrap_credential_log (
  id       bigserial PRIMARY KEY,
  host_id  uuid NOT NULL,
  at       timestamptz NOT NULL,
  kind     text NOT NULL CHECK (kind IN ('exchange', 'replay', 'rotate', 'revoke', 'refused')),
  address  text,
  detail   text NOT NULL DEFAULT ''
);
CREATE INDEX bootstrap_credential_log_host ON bootstrap_credential_log (host_id, at);
