-- One row per run, kept up to date by every insert of events (same statement):
-- listing a host's runs and deriving a run's status read this row and a few
-- events found by index, never all of a run's events, however many there are.
-- started_ts and last_event_ts are the host's event times, except that a time
-- more than 300 s ahead of when the hub received the event counts as that
-- receive time (store.ts: MAX_CLOCK_AHEAD_S, effectiveTs).
CREATE TABLE bootstrap_runs (
  host_id          uuid NOT NULL,
  run_id           text NOT NULL,
  events           integer NOT NULL,
  max_seq          integer NOT NULL,
  started_ts       double precision NOT NULL,
  last_event_ts    double precision NOT NULL,
  last_received_at timestamptz NOT NULL,
  PRIMARY KEY (host_id, run_id)
);
CREATE INDEX bootstrap_runs_latest ON bootstrap_runs (host_id, started_ts DESC, run_id);

-- The latest event of a type, and a step's first and last events, by index.
CREATE INDEX bootstrap_events_by_type ON bootstrap_events (host_id, run_id, type, seq);

INSERT INTO bootstrap_runs (host_id, run_id, events, max_seq, started_ts, last_event_ts, last_received_at)
SELECT host_id, run_id, count(*), max(seq),
       min(CASE WHEN ts > extract(epoch FROM received_at)::double precision + 300 THEN extract(epoch FROM received_at)::double precision ELSE ts END),
       max(CASE WHEN ts > extract(epoch FROM received_at)::double precision + 300 THEN extract(epoch FROM received_at)::double precision ELSE ts END),
       max(received_at)
  FROM bootstrap_events GROUP BY host_id, run_id;
