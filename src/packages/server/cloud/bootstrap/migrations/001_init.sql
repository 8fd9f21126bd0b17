-- Hosts being bootstrapped: the hub's host record and the config assembled from it.
CREATE TABLE bootstrap_hosts (
  host_id     uuid PRIMARY KEY,
  record      jsonb NOT NULL,
  config      jsonb NOT NULL,
  created_at  timestamptz NOT NULL,
  updated_at  timestamptz NOT NULL
);

-- Bootstrap tokens: only the sha256 of the token is stored (hex), never the token.
CREATE TABLE bootstrap_tokens (
  token_hash  text PRIMARY KEY CHECK (token_hash ~ '^[0-9a-f]{64}$'),
  host_id     uuid NOT NULL,
  created_at  timestamptz NOT NULL,
  expires_at  timestamptz NOT NULL,
  revoked_at  timestamptz
);
CREATE INDEX bootstrap_tokens_host ON bootstrap_tokens (host_id);

-- Secrets a host may fetch with its token (e.g. the conat password).
CREATE TABLE bootstrap_secrets (
  host_id     uuid NOT NULL,
  name        text NOT NULL,
  value       text NOT NULL,
  PRIMARY KEY (host_id, name)
);

-- Progress events; the primary key makes replayed batches idempotent.
CREATE TABLE bootstrap_events (
  host_id     uuid NOT NULL,
  run_id      text NOT NULL,
  seq         integer NOT NULL,
  type        text NOT NULL,
  ts          double precision NOT NULL,
  body        jsonb NOT NULL,
  received_at timestamptz NOT NULL,
  PRIMARY KEY (host_id, run_id, seq)
);
