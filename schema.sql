-- agentapp schema. Applied at every start-up (and by `agentapp migrate`) inside one
-- transaction under an advisory lock, so it is written to be idempotent.
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
    UNIQUE (workspace_id, name),
    CONSTRAINT agents_workspace_id_id_key UNIQUE (workspace_id, id) -- runs' key to their agent
);

CREATE TABLE IF NOT EXISTS runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(), -- the API sets time-ordered ids (newRunID)
    seq              bigserial NOT NULL,          -- insertion order: claim order and list cursor
    workspace_id     uuid NOT NULL,
    agent_id         uuid NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
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
    -- One key to the agent, in its workspace, instead of one to each: a key is checked
    -- for every row inserted, and these two checks were a quarter of a batch's time in
    -- PostgreSQL. Deleting a workspace deletes its agents, and so their runs.
    CONSTRAINT runs_agent_fkey FOREIGN KEY (workspace_id, agent_id)
        REFERENCES agents (workspace_id, id) ON DELETE CASCADE
);

-- Upgrades of a database made by an earlier release, each done only when needed, so that
-- a start-up that finds nothing to do takes no table lock.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'runs'::regclass AND attname = 'run_after') THEN
        ALTER TABLE runs RENAME COLUMN run_after TO run_at;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'runs'::regclass AND attname = 'priority') THEN
        ALTER TABLE runs
            ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
            ADD COLUMN timeout_ms integer CHECK (timeout_ms BETWEEN 1 AND 86400000),
            DROP CONSTRAINT IF EXISTS runs_max_attempts_check, -- 1 … 25: a retry may add attempts
            ADD CONSTRAINT runs_max_attempts_min CHECK (max_attempts >= 1);
        ALTER TABLE agents
            ADD COLUMN max_concurrency integer CHECK (max_concurrency BETWEEN 1 AND 1000),
            ADD COLUMN paused boolean NOT NULL DEFAULT false;
        DROP INDEX IF EXISTS runs_queued_idx; -- claiming by seq alone
    END IF;
END $$;
-- The runs' two keys of earlier releases become one (see runs_agent_fkey): checked once
-- over the whole table, with writers held off meanwhile.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'runs_agent_fkey' AND conrelid = 'runs'::regclass) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'agents_workspace_id_id_key' AND conrelid = 'agents'::regclass) THEN
            ALTER TABLE agents ADD CONSTRAINT agents_workspace_id_id_key UNIQUE (workspace_id, id);
        END IF;
        ALTER TABLE runs
            ADD CONSTRAINT runs_agent_fkey FOREIGN KEY (workspace_id, agent_id)
                REFERENCES agents (workspace_id, id) ON DELETE CASCADE,
            DROP CONSTRAINT IF EXISTS runs_workspace_id_fkey,
            DROP CONSTRAINT IF EXISTS runs_agent_id_fkey;
    END IF;
END $$;
-- An older binary started on an upgraded database creates its claim index again.
DROP INDEX IF EXISTS runs_queued_idx;

-- Claiming: an agent's queued runs, lower priority first, then the earliest due: its line.
-- A claim reads each agent's line from where its last claim stopped (queue.go). The
-- predicate is written so that only queries that say it the same way use this index, and
-- those queries no other: under a pinned horizon, once runs was analysed, the generic plan
-- of the claim read an agent's queued runs from runs_list_idx and sorted them, through an
-- entry for every run queued since (22,500 buffers a claim 80 s into the pin). It replaces
-- runs_claim_idx (status = 'queued').
CREATE INDEX IF NOT EXISTS runs_line_idx ON runs (agent_id, priority, run_at, seq) WHERE (status = 'queued') IS TRUE;
-- The next run to fall due (an idle worker sleeps until then), and the oldest wait. Its
-- predicate is written so that only queries that say it the same way use this index, and
-- those queries no other: with a long history the planner preferred an index of this kind
-- to the claim's index for the claim, reading every queued run of the agent and sorting them,
-- claim after claim; and under a pinned horizon it answered the next due time from the
-- queued range of runs_list_idx, which holds an entry for every run queued since (1,400
-- buffers a claim). It replaces runs_next_due_idx (status = 'queued' AND priority >= 0).
CREATE INDEX IF NOT EXISTS runs_due_queued_idx ON runs (run_at) WHERE (status = 'queued') IS TRUE AND priority >= 0;
DO $$
BEGIN
    IF to_regclass('runs_due_idx') IS NOT NULL THEN
        DROP INDEX runs_due_idx; -- an earlier form
    END IF;
    IF to_regclass('runs_next_due_idx') IS NOT NULL THEN
        DROP INDEX runs_next_due_idx; -- the last release's form
    END IF;
    IF to_regclass('runs_claim_idx') IS NOT NULL THEN
        DROP INDEX runs_claim_idx; -- the last release's form of runs_line_idx
    END IF;
END $$;
-- Retention: final runs by age.
CREATE INDEX IF NOT EXISTS runs_finished_idx ON runs (finished_at) WHERE status IN ('succeeded', 'failed', 'canceled');
-- An agent's running runs, counted against its max_concurrency, are a range of
-- runs_list_idx (status, workspace, agent). The index of earlier releases that held only
-- them, runs_running_agent_idx, took an entry at every claim, among the entries of runs
-- that ended since it was last cleaned; without it (dropped below) a 20,000-run drain
-- wrote 585–600 bytes of WAL per run instead of 675–679, and BenchmarkFairClaim at
-- 100,000 runs drained 15,040–15,874 runs/s over 100 workspaces instead of 12,455–12,579.
-- Running runs by lease, an earlier release's index, is dropped: the recovery of expired
-- leases reads the running runs (as many as the workers' slots) without it, and without it
-- a lease renewal changes no indexed column, so PostgreSQL can write it in place (HOT)
-- instead of adding an entry to every index of runs; each claim adds one fewer, too (a
-- drain of 10,000 runs went from 9,817 to 10,493 runs/s, medians of 3).
DO $$
BEGIN
    IF to_regclass('runs_running_lease_idx') IS NOT NULL THEN
        DROP INDEX runs_running_lease_idx;
    END IF;
END $$;
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency_idx ON runs (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Listing a workspace's runs, newest first, by status and agent: one index range for each
-- status and agent, merged (agentapp_runs_page). Status leads so that the runs in one
-- status across workspaces ("are any queued or running?") are found without reading the
-- history. It replaces three indexes of earlier releases, by workspace, by status and by
-- agent: a run's status changes are not HOT (status is indexed), so every one of them added
-- an entry to each; a drain wrote 882 bytes of WAL per run with them, 681 without.
CREATE INDEX IF NOT EXISTS runs_list_idx ON runs (status, workspace_id, agent_id, seq);
DO $$
DECLARE
    v_name text;
BEGIN
    FOR v_name IN SELECT unnest(ARRAY['runs_workspace_seq_idx', 'runs_status_workspace_seq_idx',
                                      'runs_workspace_agent_seq_idx', 'runs_workspace_status_seq_idx',
                                      'runs_running_agent_idx', 'runs_claim_workspace_idx'])
    LOOP
        IF to_regclass(v_name) IS NOT NULL THEN
            EXECUTE format('DROP INDEX %I', v_name);
        END IF;
    END LOOP;
END $$;

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
-- per connection: planned at every call, planning took 0.20 ms of a statement's 0.52 ms
-- in PostgreSQL (8 clients, about 4 creates a statement); planned once, the creates went
-- 3,205 against 2,763/s (medians of 3, alternating).
CREATE OR REPLACE FUNCTION agentapp_create_runs(p_ids uuid[], p_workspaces uuid[], p_agents text[], p_inputs jsonb[],
                                                p_max_attempts integer[], p_keys text[], p_hashes bytea[],
                                                p_priorities smallint[], p_run_ats text[], p_delays_ms bigint[],
                                                p_timeouts_ms integer[])
RETURNS SETOF runs
LANGUAGE plpgsql ROWS 4 SET plan_cache_mode = force_generic_plan SET jit = off AS $$
BEGIN
    RETURN QUERY
    INSERT INTO runs AS r (id, workspace_id, agent_id, input, max_attempts, idempotency_key, request_hash,
                           priority, run_at, timeout_ms)
    SELECT w.id, w.workspace_id, a.id, w.input, w.max_attempts, NULLIF(w.key, ''), NULLIF(w.hash, ''::bytea),
           w.priority, agentapp_run_at(w.run_at, w.delay_ms), NULLIF(w.timeout_ms, 0)
    FROM unnest(p_ids, p_workspaces, p_agents, p_inputs, p_max_attempts, p_keys, p_hashes, p_priorities,
                p_run_ats, p_delays_ms, p_timeouts_ms)
         WITH ORDINALITY AS w (id, workspace_id, agent, input, max_attempts, key, hash, priority, run_at, delay_ms,
                               timeout_ms, ord)
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
-- transaction's, could see the changes gone and the counts not yet added). status is a final status,
-- or 'active' for the runs queued or running, so that a claim, which only moves runs from
-- queued to running, changes no count; readers count the running runs themselves and take
-- them from 'active'. (Earlier releases counted 'queued' and 'running' apart, and kept
-- run_counts in 16 shards updated by every statement; readers add those rows to 'active'.)
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

-- A database from before the counters: count once, with writers held off meanwhile.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'runs_counts_insert' AND tgrelid = 'runs'::regclass) THEN
        LOCK TABLE runs IN SHARE MODE;
        DELETE FROM run_counts;
        INSERT INTO run_counts (workspace_id, status, shard, n)
        SELECT workspace_id, agentapp_counter(status), 0, count(*) FROM runs GROUP BY 1, 2;
        CREATE TRIGGER runs_counts_insert AFTER INSERT ON runs REFERENCING NEW TABLE AS new_runs
            FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();
        CREATE TRIGGER runs_counts_update AFTER UPDATE ON runs
            REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
            FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();
        CREATE TRIGGER runs_counts_delete AFTER DELETE ON runs REFERENCING OLD TABLE AS old_runs
            FOR EACH STATEMENT EXECUTE FUNCTION agentapp_run_counts();
    END IF;
END $$;

-- The claim's bookkeeping of earlier releases, which rewrote a workspace's row at every
-- claim (turns, marks): the claim is now plain statements in queue.go, and what it needs
-- to remember between claims it keeps in memory.
DROP FUNCTION IF EXISTS agentapp_claim(text, integer, uuid, bigint, boolean);
DROP FUNCTION IF EXISTS agentapp_queue_head(uuid, uuid[], integer);
DROP FUNCTION IF EXISTS agentapp_queue_tail(uuid);
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'workspaces'::regclass
               AND attname IN ('has_queued', 'served_at') AND NOT attisdropped) THEN
        ALTER TABLE workspaces DROP COLUMN IF EXISTS has_queued, DROP COLUMN IF EXISTS served_at;
    END IF;
END $$;

-- Notifications that let every agentapp process react at once:
--   agentapp_runs    runs became claimable (wakes idle workers). For new runs the API sends
--                    it after their insert commits, coalesced (at most one in flight per
--                    process): a NOTIFY inside the inserting transaction would serialise
--                    every insert's commit in PostgreSQL.
--   agentapp_status  payload "workspace id:run id:new status" entries separated by spaces:
--                    runs changed status (streams; a final one answers ?wait_ms)
--   agentapp_cancel  payload run ids separated by spaces: cancel them where they execute
-- An UPDATE sends them once per statement, 90 runs to a notification (a payload holds
-- 8000 bytes), not once per row: a claim or an outcome write of 100 runs sends 2, not
-- 200 (a notification per row cost a drain about a fifth of its speed, measured).
--
-- agentapp_status is sent only while a process is listed in status_listeners: one that has a
-- request waiting on a run (?wait_ms) or a stream open, or had one within the last minute.
-- Nobody else needs it, and it costs: PostgreSQL commits notifying transactions one after
-- another, each holding its notification lock through its WAL flush, and queues every
-- payload (a drain of 10,000 runs: 20,000 entries of about 84 bytes; with them it drained
-- 8,588 runs/s, without 9,848). A process lists itself before it reads, in
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
            SELECT w.workspace_id, w.id, o.status AS was, w.status,
                   w.status = 'running' AND w.cancel_requested AND NOT o.cancel_requested AS cancel
            FROM old_runs o JOIN new_runs w ON w.id = o.id
            WHERE w.status <> o.status OR (w.cancel_requested AND NOT o.cancel_requested))
        SELECT 'agentapp_status', string_agg(c.entry, ' ') FROM (
            SELECT d.workspace_id::text || ':' || d.id::text || ':' || d.status AS entry,
                   (row_number() OVER () - 1) / 90 AS chunk
            FROM d WHERE v_status AND d.status <> d.was) c
        GROUP BY c.chunk
        UNION ALL
        -- Claimable now or later (retried, requeued, recovered): idle workers learn when.
        SELECT 'agentapp_runs', '' WHERE EXISTS (SELECT 1 FROM d WHERE d.status = 'queued' AND d.was <> 'queued')
        UNION ALL
        SELECT 'agentapp_cancel', string_agg(c.id, ' ') FROM (
            SELECT d.id::text AS id, (row_number() OVER () - 1) / 200 AS chunk FROM d WHERE d.cancel) c
        GROUP BY c.chunk
    LOOP
        PERFORM pg_notify(v_channel, v_payload);
    END LOOP;
    RETURN NULL;
END $$;

-- The row triggers of earlier releases, a notification per changed row, are dropped
-- (checked first: a DROP locks the table even when there is nothing to drop).
DO $$
DECLARE
    v_name text;
BEGIN
    FOR v_name IN SELECT tgname FROM pg_trigger WHERE tgrelid = 'runs'::regclass
                  AND tgname IN ('runs_notify_insert', 'runs_notify_update', 'runs_notify_status_update')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON runs', v_name);
    END LOOP;
    DROP FUNCTION IF EXISTS agentapp_runs_notify_update();
    DROP FUNCTION IF EXISTS agentapp_runs_notify_status();
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

-- Done only when needed, so that a start-up that finds nothing to do takes no table lock.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'runs'::regclass AND attname = 'events_count') THEN
        -- The run's last event seq, taken under the run's row lock: seq without gaps or races.
        ALTER TABLE runs ADD COLUMN events_count integer NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cluster_secrets WHERE name = 'events') THEN
        -- gen_random_uuid draws from the server's strong random source: 244 random bits.
        INSERT INTO cluster_secrets (name, secret) VALUES ('events', gen_random_uuid()::text || gen_random_uuid()::text);
    END IF;
END $$;

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
    paused       boolean NOT NULL DEFAULT false,  -- true: it makes no runs
    next_at      timestamptz,                     -- null: it never falls due again
    last_at      timestamptz,                     -- the last due time that made a run
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name),
    FOREIGN KEY (workspace_id, agent_id) REFERENCES agents (workspace_id, id) ON DELETE CASCADE
);
-- The due schedules, earliest first: what the firing loop reads and sleeps on.
CREATE INDEX IF NOT EXISTS schedules_due_idx ON schedules (next_at) WHERE NOT paused;

-- UPGRADE (to become a numbered migration): the runs' link to the schedule that made them
-- (schedule_id) and the due time each was made for (scheduled_for). Self-contained: it only
-- adds to runs. schedule_id has no foreign key: deleting a schedule leaves its runs as they
-- are (a key's ON DELETE SET NULL would rewrite every one of them in the delete's
-- transaction, and its check costs each fired run a lookup); the API shows the schedule's
-- name while the schedule exists, null after.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'runs'::regclass AND attname = 'schedule_id') THEN
        ALTER TABLE runs ADD COLUMN schedule_id uuid, ADD COLUMN scheduled_for timestamptz;
        -- One run per due time, across every process: the firing insert does nothing on
        -- conflict. Also a schedule's runs in the order they were made (?schedule=).
        CREATE UNIQUE INDEX runs_schedule_due_idx ON runs (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL;
    END IF;
END $$;
