-- agentapp schema: what a database of this release holds. Applied at every start-up (and
-- by `agentapp migrate`) inside one transaction under an advisory lock, so it is written to
-- be idempotent. A database of an earlier release is first reshaped by the numbered
-- migrations in migrate.go (recorded in schema_migrations).
-- Requires PostgreSQL 14 or later (gen_random_uuid, CREATE OR REPLACE TRIGGER).

CREATE TABLE IF NOT EXISTS workspaces (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    api_key_hash bytea NOT NULL UNIQUE,           -- sha256 of the API key; the key itself is never stored
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS agents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('echo', 'webhook')),
    config       jsonb NOT NULL DEFAULT '{}',
    max_concurrency integer CHECK (max_concurrency BETWEEN 1 AND 1000), -- null: no cap
    paused       boolean NOT NULL DEFAULT false,  -- true: its runs stay queued
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- A webhook agent's key for signing its requests (whsec_ + base64), shown once by the
    -- API. The default gives one to an agent an older binary creates (gen_random_uuid draws
    -- from the server's strong random source: 244 random bits).
    signing_secret text DEFAULT 'whsec_' || encode(decode(
        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64'),
    previous_signing_secret text,                 -- the key before the last rotation, which signs too
    secret_rotated_at timestamptz,                -- … for 24 hours after this
    -- A failed attempt's backoff: a delay drawn from 0 … min(retry_max_ms, retry_base_ms ×
    -- 2^(attempt−1)) ms (full jitter).
    retry_base_ms integer NOT NULL DEFAULT 500,
    retry_max_ms  integer NOT NULL DEFAULT 30000,
    throttled_until timestamptz,                  -- a webhook's Retry-After: no attempt starts before this
    -- Runs that share a concurrency_key: at most key_concurrency of them run at once, and
    -- what a new run does while its key has one (queue, cancel_running, reject).
    key_concurrency integer NOT NULL DEFAULT 1 CHECK (key_concurrency BETWEEN 1 AND 1000),
    on_key_conflict text NOT NULL DEFAULT 'queue' CHECK (on_key_conflict IN ('queue', 'cancel_running', 'reject')),
    -- The attempts that start in any rate_period_ms cost at most rate_limit units (null: no limit).
    rate_limit     integer,
    rate_period_ms integer,
    CONSTRAINT agents_rate_check CHECK ((rate_limit IS NULL) = (rate_period_ms IS NULL)
                                        AND rate_limit BETWEEN 1 AND 1000000
                                        AND rate_period_ms BETWEEN 1000 AND 86400000),
    CONSTRAINT agents_retry_check CHECK (retry_base_ms BETWEEN 1 AND 3600000
                                         AND retry_max_ms BETWEEN retry_base_ms AND 86400000),
    UNIQUE (workspace_id, name),
    CONSTRAINT agents_workspace_id_id_key UNIQUE (workspace_id, id) -- runs' key to their agent
);

CREATE TABLE IF NOT EXISTS runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(), -- the API sets time-ordered ids (newRunID)
    seq              bigserial NOT NULL,          -- insertion order: claim order and list cursor
    workspace_id     uuid NOT NULL,
    agent_id         uuid NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'waiting', 'succeeded', 'failed', 'canceled')),
    input            jsonb NOT NULL DEFAULT 'null',
    output           jsonb,
    error            text,
    errors           jsonb NOT NULL DEFAULT '[]', -- every failed attempt: {"attempt","at","message"}
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3 CONSTRAINT runs_max_attempts_min CHECK (max_attempts >= 1),
    priority         smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9), -- lower first
    run_at           timestamptz NOT NULL DEFAULT now(), -- not claimed before this (schedule, retry backoff)
    timeout_ms       integer CHECK (timeout_ms BETWEEN 1 AND 86400000), -- an attempt's time limit; null: none
    worker_id        text,                        -- the process executing the current attempt
    lease_expires_at timestamptz,                 -- while running: recovered by any worker after this
    cancel_requested boolean NOT NULL DEFAULT false,
    idempotency_key  text,
    request_hash     bytea,                       -- sha256 of the create request, for idempotent repeats
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    events_count     integer NOT NULL DEFAULT 0,  -- its last event's seq, taken under the run's row lock
    trace_id         text,                        -- its create request's W3C trace id (32 hex digits); null:
    trace_flags      text,                        -- made before signed deliveries, its id stands for it
    -- The schedule that made it and the due time it was made for. No key: deleting a
    -- schedule leaves its runs as they are (ON DELETE SET NULL would rewrite every one in
    -- the delete's transaction, and the check would cost each fired run a lookup); the API
    -- shows the schedule's name while it exists, null after.
    schedule_id      uuid,
    scheduled_for    timestamptz,
    pushbacks        integer NOT NULL DEFAULT 0,  -- answers with Retry-After that did not spend an attempt
    concurrency_key  text CHECK (length(concurrency_key) BETWEEN 1 AND 200), -- its agent's key_concurrency holds per key
    cost             integer NOT NULL DEFAULT 1 CHECK (cost BETWEEN 1 AND 1000000), -- units of its agent's rate_limit
    cancel_error     text,                        -- with cancel_requested: the error the run ends with (null: canceled by request)
    -- Runs that wait (SPEC "Runs that wait"). step is the step the run executes next (1, 2,
    -- …; attempt counts within it); state is what the agent's last step returned, handed to
    -- the next; waiting_for is the wait of a waiting run (its 202's "wait"), wake_at when a
    -- sleep or a signal's timeout is met, resume what met the wait, handed to the next step.
    step             integer NOT NULL DEFAULT 1,
    state            jsonb,
    waiting_for      jsonb,
    wake_at          timestamptz,
    -- A child run's parent, and the parent's step whose wait made it (its children are the
    -- ones of that step: an earlier wait's children are not waited for again). A parent is
    -- deleted only with its whole tree (prune), so the cascade only ever takes final runs.
    parent_id        uuid REFERENCES runs (id) ON DELETE CASCADE,
    parent_step      integer,
    resume           jsonb,
    -- One key to the agent, in its workspace, instead of one to each: a key is checked
    -- for every row inserted, and these two checks were a quarter of a batch's time in
    -- PostgreSQL. Deleting a workspace deletes its agents, and so their runs.
    CONSTRAINT runs_agent_fkey FOREIGN KEY (workspace_id, agent_id)
        REFERENCES agents (workspace_id, id) ON DELETE CASCADE
);

-- An agent's line: its queued runs, lower priority first, then the earliest due. A claim
-- reads each line from where its last claim stopped (queue.go). The predicate is written
-- so that only queries that say it the same way use this index, and those queries no
-- other: under a pinned horizon, once runs was analysed, the planner otherwise read a
-- line from runs_list_idx and sorted it, through an entry for every run queued since.
CREATE INDEX IF NOT EXISTS runs_line_idx ON runs (agent_id, priority, run_at, seq) WHERE (status = 'queued') IS TRUE;
-- The next run to fall due (an idle worker sleeps until then), and the oldest wait. Its
-- predicate, too, is said only by the queries meant to use it: otherwise the planner
-- chose it for the claim with a long history, and answered the next due time from
-- runs_list_idx under a pinned horizon.
CREATE INDEX IF NOT EXISTS runs_due_queued_idx ON runs (run_at) WHERE (status = 'queued') IS TRUE AND priority >= 0;
-- Retention: final runs by age.
CREATE INDEX IF NOT EXISTS runs_finished_idx ON runs (finished_at) WHERE status IN ('succeeded', 'failed', 'canceled');
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency_idx ON runs (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Listing a workspace's runs, newest first, by status and agent: one index range for each
-- status and agent, merged (agentapp_runs_page). Status leads so that the runs in one
-- status across workspaces ("are any queued or running?") are found without reading the
-- history. It also answers an agent's running runs, counted against its max_concurrency.
-- runs has no other index: a run's status changes are not HOT (status is indexed), so
-- each index adds an entry at every claim and outcome, and a lease renewal, which changes
-- no indexed column, can be written in place.
CREATE INDEX IF NOT EXISTS runs_list_idx ON runs (status, workspace_id, agent_id, seq);
-- The waits that fall due (a sleep, a signal's timeout), earliest first: entries only while
-- a run waits, so that the claim, which reads the next one, never reads the waiting runs
-- that have no timer, however many there are.
CREATE INDEX IF NOT EXISTS runs_wake_idx ON runs (wake_at) WHERE status = 'waiting' AND wake_at IS NOT NULL;
-- A run's children (fan-in, ?parent=, the cancel's cascade, the parent key's own check on
-- delete): entries only for child runs.
CREATE INDEX IF NOT EXISTS runs_parent_idx ON runs (parent_id, seq) WHERE parent_id IS NOT NULL;

-- A key's runs of an agent by status: those running (held against key_concurrency) and
-- those queued in line order, each a range, for the claim's test of a keyed run (queue.go)
-- and a create's conflict. Only keyed runs that are not final have an entry.
CREATE INDEX IF NOT EXISTS runs_key_idx ON runs (agent_id, concurrency_key, status, priority, run_at, seq)
    WHERE concurrency_key IS NOT NULL AND status IN ('queued', 'running', 'waiting');

-- The attempts of rate-limited agents that started (one row per agent and claim, with the
-- cost of the runs it started), for the sum over the agent's window: inserted by the claim
-- under the agent's lock, deleted once older than the window by the heartbeat. Never
-- updated, so a pinned horizon grows no chain of versions here.
CREATE TABLE IF NOT EXISTS rate_starts (
    agent_id uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    at       timestamptz NOT NULL,
    cost     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_starts_idx ON rate_starts (agent_id, at);

-- The throttled agents, for the next time one may start an attempt again (an idle worker
-- sleeps until then): an agent keeps its last throttled_until once it has passed.
CREATE INDEX IF NOT EXISTS agents_throttled_idx ON agents (throttled_until) WHERE throttled_until IS NOT NULL;

-- agentapp_run_at is a new run's due time: p_delay_ms after the database's now(), or
-- p_run_at (timestamptz text, '' for none) if later, so that a delay does not depend on
-- the client's clock and a run_at in the past is now.
CREATE OR REPLACE FUNCTION agentapp_run_at(p_run_at text, p_delay_ms bigint) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT greatest(now() + p_delay_ms * interval '1 millisecond', NULLIF(p_run_at, '')::timestamptz)
$$;

-- agentapp_create_runs inserts single-run creates, gathered (gather.go): those that name
-- an agent of their workspace and whose idempotency key is unused, in their order. The
-- agent is looked up by its unique name in a subquery kept apart (LIMIT 1), so that every
-- row takes the index whatever the plan makes of the arrays' length. Its plan is made once
-- per connection: planned at every call, planning was a large part of a create's time.
CREATE OR REPLACE FUNCTION agentapp_create_runs(p_ids uuid[], p_workspaces uuid[], p_agents text[], p_inputs jsonb[],
                                                p_max_attempts integer[], p_keys text[], p_hashes bytea[],
                                                p_priorities smallint[], p_run_ats text[], p_delays_ms bigint[],
                                                p_timeouts_ms integer[], p_trace_ids text[], p_trace_flags text[])
RETURNS SETOF runs
LANGUAGE plpgsql ROWS 4 SET plan_cache_mode = force_generic_plan SET jit = off AS $$
BEGIN
    RETURN QUERY
    INSERT INTO runs AS r (id, workspace_id, agent_id, input, max_attempts, idempotency_key, request_hash,
                           priority, run_at, timeout_ms, trace_id, trace_flags)
    SELECT w.id, w.workspace_id, a.id, w.input, w.max_attempts, NULLIF(w.key, ''), NULLIF(w.hash, ''::bytea),
           w.priority, agentapp_run_at(w.run_at, w.delay_ms), NULLIF(w.timeout_ms, 0), w.trace_id, w.trace_flags
    FROM unnest(p_ids, p_workspaces, p_agents, p_inputs, p_max_attempts, p_keys, p_hashes, p_priorities,
                p_run_ats, p_delays_ms, p_timeouts_ms, p_trace_ids, p_trace_flags)
         WITH ORDINALITY AS w (id, workspace_id, agent, input, max_attempts, key, hash, priority, run_at, delay_ms,
                               timeout_ms, trace_id, trace_flags, ord)
    CROSS JOIN LATERAL (SELECT g.id FROM agents g WHERE g.workspace_id = w.workspace_id AND g.name = w.agent LIMIT 1) a
    ORDER BY w.ord
    ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING r.*;
END $$;

-- Runs by workspace and status, kept so that /metrics, stats and the console never count
-- the history: their cost does not grow with it. Every statement that adds, ends or deletes
-- runs appends its changes to run_count_changes (a trigger below), which nothing updates
-- or deletes row by row: rows rewritten at every outcome grow chains of versions that
-- nobody can vacuum while a session holds the horizon. Every heartbeat (registry.go) one
-- process adds the changes to run_counts and empties run_count_changes with TRUNCATE,
-- which leaves no dead version. Readers sum both (run_totals), each in a statement of its
-- own: TRUNCATE is not MVCC-safe, and only a statement that names the table locks it
-- before it takes its snapshot (a function's statements, or a repeatable-read
-- transaction's, could see the changes gone and the counts not yet added). status is a
-- final status, or 'active' for the runs queued or running, so that a claim, which only
-- moves runs from queued to running, changes no count; readers count the running runs
-- themselves and take them from 'active'. shard is always 0 (earlier releases kept 16).
CREATE TABLE IF NOT EXISTS run_counts (
    workspace_id uuid NOT NULL,
    status       text NOT NULL,
    shard        smallint NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (workspace_id, status, shard)
);
CREATE TABLE IF NOT EXISTS run_count_changes (
    workspace_id uuid NOT NULL,
    status       text NOT NULL,
    n            bigint NOT NULL
);
CREATE OR REPLACE VIEW run_totals AS
    SELECT workspace_id, status, n FROM run_counts
    UNION ALL
    SELECT workspace_id, status, n FROM run_count_changes;

-- agentapp_counter is the run_counts counter a run in status p_status counts in.
CREATE OR REPLACE FUNCTION agentapp_counter(p_status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_status IN ('queued', 'running') THEN 'active' ELSE p_status END
$$;

-- agentapp_runs_page is a page of the runs of the given workspaces (null: every one) in
-- the given statuses, only those of agents named p_agent unless it is '', newest first,
-- older than seq p_before: the newest p_n of up to p_n from each status and agent, found
-- in runs_list_idx alone (a range each, whose entries hold all a page needs to pick its
-- rows), then read one by one. Its cost grows with the workspaces' agents, never with
-- their history. Its plan is made once per connection (planned at every call, planning
-- took about half of a page's time) and holds for any page: the rows are read back
-- through a subquery that cannot be turned into a join, which that plan would have made
-- a hash join over every run of the workspace.
CREATE OR REPLACE FUNCTION agentapp_runs_page(p_workspaces uuid[], p_statuses text[], p_agent text,
                                              p_before bigint, p_n integer)
RETURNS SETOF runs
LANGUAGE plpgsql STABLE ROWS 50 SET plan_cache_mode = force_generic_plan SET jit = off AS $$
BEGIN
    RETURN QUERY
    SELECT r.* FROM (
        SELECT s.status, g.workspace_id, g.id AS agent_id, k.seq
        FROM unnest(p_statuses) AS s (status) CROSS JOIN agents g CROSS JOIN LATERAL (
            SELECT x.seq FROM runs x
            WHERE x.status = s.status AND x.workspace_id = g.workspace_id AND x.agent_id = g.id AND x.seq < p_before
            ORDER BY x.seq DESC LIMIT p_n) k
        WHERE (p_workspaces IS NULL OR g.workspace_id = ANY (p_workspaces)) AND (p_agent = '' OR g.name = p_agent)
        ORDER BY k.seq DESC LIMIT p_n) p
    CROSS JOIN LATERAL (
        SELECT x.* FROM runs x
        WHERE x.status = p.status AND x.workspace_id = p.workspace_id AND x.agent_id = p.agent_id AND x.seq = p.seq
        LIMIT 1) r;
END $$;

CREATE OR REPLACE FUNCTION agentapp_run_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO run_count_changes (workspace_id, status, n)
        SELECT workspace_id, agentapp_counter(status), count(*) FROM new_runs GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO run_count_changes (workspace_id, status, n)
        SELECT workspace_id, agentapp_counter(status), -count(*) FROM old_runs GROUP BY 1, 2;
    ELSE
        -- A row whose count did not change adds 1 and takes 1 from the same count (a run's
        -- workspace never changes): no join of the old rows to the new ones is needed.
        INSERT INTO run_count_changes (workspace_id, status, n)
        SELECT d.workspace_id, d.status, sum(d.n) FROM (
            SELECT o.workspace_id, agentapp_counter(o.status) AS status, -1 AS n FROM old_runs o
            UNION ALL
            SELECT w.workspace_id, agentapp_counter(w.status), 1 FROM new_runs w) d
        GROUP BY 1, 2 HAVING sum(d.n) <> 0;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_counts_insert AFTER INSERT ON runs REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();
CREATE OR REPLACE TRIGGER runs_counts_update AFTER UPDATE ON runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();
CREATE OR REPLACE TRIGGER runs_counts_delete AFTER DELETE ON runs REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();

-- agentapp_fan_in resumes a parent waiting for its children (SPEC "Runs that wait") once the
-- last of them is final, whichever statement ended it (an outcome, a recovered lease, a
-- cancel): a trigger, so that no path that ends a run can forget it. The parent's row is
-- locked first: of two transactions that end the last two children together, the second
-- waits for the first to commit, and its next statement (a new snapshot) sees that child
-- final, so the parent is resumed once, by whichever comes last. The resume lists the
-- wait's children in the order they were asked for (their seq).
CREATE OR REPLACE FUNCTION agentapp_fan_in() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM runs p WHERE p.id = NEW.parent_id AND p.status = 'waiting' AND p.step = NEW.parent_step
        AND p.waiting_for ? 'runs' FOR UPDATE;
    IF NOT FOUND OR EXISTS (SELECT 1 FROM runs c WHERE c.parent_id = NEW.parent_id AND c.parent_step = NEW.parent_step
                             AND c.status NOT IN ('succeeded', 'failed', 'canceled')) THEN
        RETURN NULL;
    END IF;
    UPDATE runs p SET status = 'queued', waiting_for = NULL, wake_at = NULL, run_at = now(), updated_at = now(),
        resume = jsonb_build_object('runs', (
            SELECT jsonb_agg(jsonb_build_object('id', c.id, 'agent', a.name, 'status', c.status, 'output', c.output,
                                                'error', c.error) ORDER BY c.seq)
            FROM runs c JOIN agents a ON a.id = c.agent_id
            WHERE c.parent_id = p.id AND c.parent_step = p.step))
    WHERE p.id = NEW.parent_id AND p.status = 'waiting';
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_fan_in AFTER UPDATE OF status ON runs FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND NEW.status IN ('succeeded', 'failed', 'canceled')
          AND OLD.status NOT IN ('succeeded', 'failed', 'canceled'))
    EXECUTE FUNCTION agentapp_fan_in();

-- Notifications that let every agentapp process react at once:
--   agentapp_runs    runs became claimable (wakes idle workers), payload the sender's worker
--                    id ("-" here) and, per workspace, where in line: "id/priority/run_at in
--                    Unix microseconds". For new runs the API sends it after their insert
--                    commits, coalesced (at most one in flight per process): a NOTIFY inside
--                    the inserting transaction would serialise every insert's commit.
--   agentapp_status  payload "workspace id:run id:new status" entries separated by spaces:
--                    runs changed status (streams; a final one answers ?wait_ms)
--   agentapp_cancel  payload run ids separated by spaces: cancel them where they execute
-- An UPDATE sends them once per statement, 90 runs to a notification (a payload holds
-- 8000 bytes), not once per row: a claim or an outcome write of 100 runs sends 2, not
-- 200 (a notification per row cost a drain much of its speed).
--
-- agentapp_status is sent only while a process is listed in status_listeners: one that has a
-- request waiting on a run (?wait_ms) or a stream open, or had one within the last minute.
-- Nobody else needs it, and it costs: PostgreSQL commits notifying transactions one after
-- another, each holding its notification lock through its WAL flush, and queues every
-- payload (a drain of n runs: 2n entries). A process lists itself before it reads, in
-- a transaction that waits for the writes of runs in progress (LOCK … IN SHARE MODE), so a
-- change that was not notified has committed before that read.
CREATE TABLE IF NOT EXISTS status_listeners (
    id           text PRIMARY KEY, -- the process's worker id
    refreshed_at timestamptz NOT NULL DEFAULT now() -- every 10 s; removed a minute after the last
);

CREATE OR REPLACE FUNCTION agentapp_runs_notify_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text;
    v_payload text;
    v_status  boolean := EXISTS (SELECT 1 FROM status_listeners);
BEGIN
    IF NOT v_status AND NOT EXISTS (SELECT 1 FROM new_runs w WHERE w.status = 'queued' OR w.cancel_requested) THEN
        RETURN NULL; -- no status wanted, nothing claimable, no cancel: the common claim and outcome write
    END IF;
    -- One join of the old rows to the new ones serves all three channels.
    FOR v_channel, v_payload IN
        WITH d AS (
            SELECT w.workspace_id, w.id, o.status AS was, w.status, w.priority, w.run_at,
                   w.status = 'running' AND w.cancel_requested AND NOT o.cancel_requested AS cancel
            FROM old_runs o JOIN new_runs w ON w.id = o.id
            WHERE w.status <> o.status OR (w.cancel_requested AND NOT o.cancel_requested))
        SELECT 'agentapp_status', string_agg(c.entry, ' ') FROM (
            SELECT d.workspace_id::text || ':' || d.id::text || ':' || d.status AS entry,
                   (row_number() OVER () - 1) / 90 AS chunk
            FROM d WHERE v_status AND d.status <> d.was) c
        GROUP BY c.chunk
        UNION ALL
        -- Claimable now or later (retried, requeued, recovered): workers learn where in line,
        -- the earliest place in each workspace (worker.runsAnnounced reads it).
        SELECT 'agentapp_runs', '- ' || string_agg(c.entry, ' ') FROM (
            SELECT e.entry, (row_number() OVER () - 1) / 120 AS chunk FROM (
                SELECT DISTINCT ON (d.workspace_id) d.workspace_id::text || '/' || d.priority || '/'
                       || trunc(extract(epoch FROM d.run_at) * 1000000)::bigint AS entry
                FROM d WHERE d.status = 'queued' AND d.was <> 'queued'
                ORDER BY d.workspace_id, d.priority, d.run_at) e) c
        GROUP BY c.chunk
        UNION ALL
        SELECT 'agentapp_cancel', string_agg(c.id, ' ') FROM (
            SELECT d.id::text AS id, (row_number() OVER () - 1) / 200 AS chunk FROM d WHERE d.cancel) c
        GROUP BY c.chunk
    LOOP
        PERFORM pg_notify(v_channel, v_payload);
    END LOOP;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_notify_changes AFTER UPDATE ON runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_runs_notify_changes();

-- The live agentapp processes, one row each: inserted when a process starts serving or
-- working, heartbeated (heartbeat_at, executing) at most every 10 s, deleted when it stops
-- cleanly, and removed by any other process a minute after its last heartbeat otherwise.
CREATE TABLE IF NOT EXISTS workers (
    id           text PRIMARY KEY,                -- the worker id in runs.worker_id: host/pid/random
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,                   -- the binary's version (module version or VCS revision)
    mode         text NOT NULL CHECK (mode IN ('serve', 'serve+worker', 'worker')),
    concurrency  integer NOT NULL,                -- RUN_WORKER_CONCURRENCY
    executing    integer NOT NULL DEFAULT 0,      -- runs executing at the last heartbeat
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Progress events: what an agent reports while its attempt runs (POST /v1/runs/{id}/events),
-- numbered seq 1, 2, … per run. Deleted with their run.
CREATE TABLE IF NOT EXISTS run_events (
    run_id  uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    attempt integer NOT NULL,                     -- the attempt that posted it
    at      timestamptz NOT NULL DEFAULT now(),
    type    text NOT NULL,
    data    jsonb NOT NULL DEFAULT 'null',
    PRIMARY KEY (run_id, seq)
);

-- cluster_secrets holds keys every process shares; 'events' signs the events tokens
-- handed to agents, so any process verifies a token another issued. Never shown.
CREATE TABLE IF NOT EXISTS cluster_secrets (
    name   text PRIMARY KEY,
    secret text NOT NULL
);

-- gen_random_uuid draws from the server's strong random source: 244 random bits.
INSERT INTO cluster_secrets (name, secret)
VALUES ('events', gen_random_uuid()::text || gen_random_uuid()::text)
ON CONFLICT (name) DO NOTHING;

-- Notifications for the streams (events.go):
--   agentapp_events  payload run id ":" seq: an agent posted an event
CREATE OR REPLACE FUNCTION agentapp_run_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentapp_events', NEW.run_id::text || ':' || NEW.seq);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER run_events_notify AFTER INSERT ON run_events
    FOR EACH ROW EXECUTE FUNCTION agentapp_run_events_notify();

-- Console sessions (/ui/), in the database so that every process accepts them. Only the
-- sha256 of the cookie's value is stored. key_hash is the sha256 of the token that signed
-- in: a workspace session ends when the workspace's key is rotated, an admin session when
-- ADMIN_TOKEN changes. workspace_id null: an admin session.
CREATE TABLE IF NOT EXISTS sessions (
    id_hash      bytea PRIMARY KEY,
    workspace_id uuid REFERENCES workspaces (id) ON DELETE CASCADE,
    key_hash     bytea NOT NULL,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expires_idx ON sessions (expires_at);

-- Schedules (schedules.go): each due time of a schedule makes exactly one run. next_at is
-- the next due time (computed in Go from cron and timezone), last_at the last one fired.
-- The processes that run the worker fire the due schedules they can lock (FOR UPDATE SKIP
-- LOCKED), and the runs' unique (schedule_id, scheduled_for) refuses a second run for a
-- due time whatever happens.
CREATE TABLE IF NOT EXISTS schedules (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL,
    name         text NOT NULL,
    cron         text NOT NULL,                   -- five fields, a macro or "@every D" (cron.go)
    timezone     text NOT NULL DEFAULT 'UTC',     -- an IANA name
    agent_id     uuid NOT NULL,
    input        jsonb NOT NULL DEFAULT 'null',
    priority     smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    timeout_ms   integer CHECK (timeout_ms BETWEEN 1 AND 86400000),
    max_attempts integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 25),
    concurrency_key text CHECK (length(concurrency_key) BETWEEN 1 AND 200), -- its runs' key (they queue behind it)
    cost         integer NOT NULL DEFAULT 1 CHECK (cost BETWEEN 1 AND 1000000), -- its runs' cost
    paused       boolean NOT NULL DEFAULT false,  -- true: it makes no runs
    next_at      timestamptz,                     -- null: it never falls due again
    last_at      timestamptz,                     -- the last due time that made a run
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name),
    FOREIGN KEY (workspace_id, agent_id) REFERENCES agents (workspace_id, id) ON DELETE CASCADE
);
-- The due schedules, earliest first: what the firing loop reads and sleeps on.
CREATE INDEX IF NOT EXISTS schedules_due_idx ON schedules (next_at) WHERE NOT paused;
-- agentapp_schedules (no payload): schedules were made or changed, so the next due time
-- may be sooner: the firing loops (schedules.go) read it again.
CREATE OR REPLACE FUNCTION agentapp_schedules_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentapp_schedules', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER schedules_notify AFTER INSERT OR UPDATE ON schedules
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_schedules_notify();
-- One run per due time of a schedule, across every process: the firing insert does
-- nothing on conflict. Also a schedule's runs in the order they were made (?schedule=).
CREATE UNIQUE INDEX IF NOT EXISTS runs_schedule_due_idx ON runs (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL;
