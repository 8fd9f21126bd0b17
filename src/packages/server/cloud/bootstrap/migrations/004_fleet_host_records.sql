-- What the hub's host records (upstream's hosts.metadata.bootstrap) were last told,
-- per host: the status the adapter accepted, when the host's events were last
-- checked against it, and the retry state of a delivery the adapter refused.
-- A host whose runs received events after checked_at (or whose delivery is due
-- again) is re-derived by the hub's sweep, so a refused or interrupted delivery
-- is retried and never lost (host-records.ts).
CREATE TABLE bootstrap_host_records (
  host_id         uuid PRIMARY KEY,
  status          jsonb,
  fingerprint     text,
  delivered_at    timestamptz,
  checked_at      timestamptz,
  attempts        integer NOT NULL DEFAULT 0,
  last_error      text,
  next_attempt_at timestamptz
);

-- The fleet view's time window: runs by start time, across hosts.
CREATE INDEX bootstrap_runs_started ON bootstrap_runs (started_ts);
