-- agentapp schema. Applied at every start-up (and by `agentapp migrate`) inside one
-- transaction under an advisory lock, so it is written to be idempotent.
-- Requires PostgreSQL 14 or later (gen_random_uuid, CREATE OR REPLACE TRIGGER).

CREATE TABLE IF NOT EXISTS workspaces (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    api_key_hash bytea NOT NULL UNIQUE,           -- sha256 of the API key; the key itself is never stored
    served_at    timestamptz NOT NULL DEFAULT '-infinity', -- when a claim last took one of its runs (turns)
    has_queued   boolean NOT NULL DEFAULT false,  -- may have queued runs: only these are walked by a claim
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
        ALTER TABLE workspaces ADD COLUMN served_at timestamptz NOT NULL DEFAULT '-infinity';
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

-- Claiming: an agent's queued runs, lower priority first, then the earliest due; and a
-- workspace's, in the same order (a claim's turn of one run per workspace).
CREATE INDEX IF NOT EXISTS runs_claim_idx ON runs (agent_id, priority, run_at, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS runs_claim_workspace_idx ON runs (workspace_id, priority, run_at, seq) WHERE status = 'queued';
-- The next run to fall due (an idle worker sleeps until then), and the oldest wait. Its
-- predicate names priority (always >= 0) so that only queries that say so use it: with a
-- long history the planner preferred it to runs_claim_idx for the claim, reading every
-- queued run of the agent and sorting them, claim after claim.
CREATE INDEX IF NOT EXISTS runs_next_due_idx ON runs (run_at) WHERE status = 'queued' AND priority >= 0;
DO $$
BEGIN
    IF to_regclass('runs_due_idx') IS NOT NULL THEN
        DROP INDEX runs_due_idx; -- the earlier form of runs_next_due_idx
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
                                      'runs_running_agent_idx'])
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

-- Runs by workspace and status, kept by the triggers below so that /metrics, stats and the
-- console never count the history: their cost does not grow with it. Each statement adds
-- its changes to one of 16 shards, chosen by its backend, so concurrent inserts and
-- finishes do not queue on one hot row; readers sum the shards. status is a final status,
-- or 'active' for the runs queued or running, so that a claim, which only moves runs from
-- queued to running, changes no counter: a fair claim from 50 workspaces otherwise updated
-- 100 counters. Readers count the running runs themselves (runs_list_idx: as many as the
-- workers' slots, and the entries of runs that ended since the index was last cleaned)
-- and take them from 'active'. (Earlier releases counted 'queued' and
-- 'running' apart; readers add those rows to 'active'.)
CREATE TABLE IF NOT EXISTS run_counts (
    workspace_id uuid NOT NULL,
    status       text NOT NULL,
    shard        smallint NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (workspace_id, status, shard)
);

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
-- A range is read only as far as the workspaces' counters (run_counts, exact in the
-- page's snapshot) say it can hold runs: the queued and running ranges keep the entries
-- of every run that passed through them until the table is vacuumed, and a page of a
-- workspace with none active read them all (2,000,000 finished runs after a 10,000-run
-- drain: 0.47 ms a page, 0.34 ms without; medians of 3).
CREATE OR REPLACE FUNCTION agentapp_runs_page(p_workspaces uuid[], p_statuses text[], p_agent text,
                                              p_before bigint, p_n integer)
RETURNS SETOF runs
LANGUAGE plpgsql STABLE ROWS 50 SET plan_cache_mode = force_generic_plan SET jit = off AS $$
BEGIN
    RETURN QUERY
    WITH counted AS MATERIALIZED (
        SELECT agentapp_counter(c.status) AS counter, sum(c.n) AS n FROM run_counts c
        WHERE c.workspace_id = ANY (p_workspaces) GROUP BY 1
    ), ranges AS MATERIALIZED (
        SELECT u.status, CASE WHEN p_workspaces IS NULL THEN p_n ELSE greatest(0, least(p_n, coalesce(
                   (SELECT k.n FROM counted k WHERE k.counter = agentapp_counter(u.status)), 0)))::integer END AS n
        FROM unnest(p_statuses) AS u (status)
    )
    SELECT r.* FROM (
        SELECT s.status, g.workspace_id, g.id AS agent_id, k.seq
        FROM ranges s CROSS JOIN agents g CROSS JOIN LATERAL (
            SELECT x.seq FROM runs x
            WHERE x.status = s.status AND x.workspace_id = g.workspace_id AND x.agent_id = g.id AND x.seq < p_before
            ORDER BY x.seq DESC LIMIT s.n) k
        WHERE (p_workspaces IS NULL OR g.workspace_id = ANY (p_workspaces)) AND (p_agent = '' OR g.name = p_agent)
        ORDER BY k.seq DESC LIMIT p_n) p
    CROSS JOIN LATERAL (
        SELECT x.* FROM runs x
        WHERE x.status = p.status AND x.workspace_id = p.workspace_id AND x.agent_id = p.agent_id AND x.seq = p.seq
        LIMIT 1) r;
END $$;

-- The same trigger marks the workspaces of runs that became queued (has_queued), after a
-- key-share lock on their rows: a claim unmarks a workspace only under a row lock that this
-- one conflicts with (see agentapp_claim), so a run queued while a claim finds its workspace
-- empty marks it again once that claim commits.
CREATE OR REPLACE FUNCTION agentapp_run_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_shard smallint := pg_backend_pid() % 16;
    v_ws    uuid[] := '{}'; -- workspaces of runs that became queued, found unmarked once locked
BEGIN
    -- The key-share locks are taken by a statement that reads each workspace row as it
    -- stands once locked (a claim's unmark it waited for included); only the workspaces it
    -- found unmarked are marked, by a statement that starts after that (below).
    IF TG_OP = 'INSERT' THEN
        -- The same statement counts.
        WITH l AS (
            SELECT w.id, w.has_queued FROM workspaces w
            WHERE w.id IN (SELECT n.workspace_id FROM new_runs n WHERE n.status = 'queued')
            ORDER BY w.id FOR KEY SHARE
        ), c AS (
            INSERT INTO run_counts AS c (workspace_id, status, shard, n)
            SELECT workspace_id, agentapp_counter(status), v_shard, count(*) FROM new_runs GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (workspace_id, status, shard) DO UPDATE SET n = c.n + excluded.n)
        SELECT coalesce(array_agg(l.id) FILTER (WHERE NOT l.has_queued), '{}') INTO v_ws FROM l;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO run_counts AS c (workspace_id, status, shard, n)
        SELECT workspace_id, agentapp_counter(status), v_shard, -count(*) FROM old_runs GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (workspace_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSE
        SELECT coalesce(array_agg(l.id) FILTER (WHERE NOT l.has_queued), '{}') INTO v_ws FROM (
            SELECT w.id, w.has_queued FROM workspaces w
            WHERE w.id IN (SELECT n.workspace_id FROM new_runs n WHERE n.status = 'queued')
            ORDER BY w.id FOR KEY SHARE) l;
        INSERT INTO run_counts AS c (workspace_id, status, shard, n)
        -- A row whose counter did not change adds 1 and takes 1 from the same count (a run's
        -- workspace never changes): no join of the old rows to the new ones is needed.
        SELECT d.workspace_id, d.status, v_shard, sum(d.n) FROM (
            SELECT o.workspace_id, agentapp_counter(o.status) AS status, -1 AS n FROM old_runs o
            UNION ALL
            SELECT w.workspace_id, agentapp_counter(w.status), 1 FROM new_runs w) d
        GROUP BY 1, 2 HAVING sum(d.n) <> 0 ORDER BY 1, 2
        ON CONFLICT (workspace_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
    END IF;
    IF cardinality(v_ws) > 0 THEN
        UPDATE workspaces w SET has_queued = true WHERE w.id = ANY (v_ws) AND NOT w.has_queued;
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

-- workspaces.has_queued, added to a database from before it, and its index of the marked
-- workspaces (a turn, served_at, changes no indexed column: its update stays HOT). Both
-- only when missing, and after the runs table's locks, in a claim's order (runs, then
-- workspaces): CREATE INDEX IF NOT EXISTS locks the table even when the index exists, and
-- a start-up that locked workspaces first deadlocked with a claim of a running process.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'workspaces'::regclass AND attname = 'has_queued') THEN
        ALTER TABLE workspaces ADD COLUMN has_queued boolean NOT NULL DEFAULT false;
    END IF;
    IF to_regclass('workspaces_has_queued_idx') IS NULL THEN
        CREATE INDEX workspaces_has_queued_idx ON workspaces (id) WHERE has_queued;
    END IF;
END $$;
-- agentapp_queue_tail is the last of a workspace's queued runs in claim order, if it has
-- any: read from the end of its entries in runs_claim_workspace_idx, where the runs still
-- queued are, not through the dead entries of those it ran from the start, as a forward
-- probe (or an EXISTS, which drops the ORDER BY) would. The ORDER BY names every column of
-- that index so that no other serves it. One SELECT in SQL, inlined where it is called.
CREATE OR REPLACE FUNCTION agentapp_queue_tail(p_workspace uuid)
RETURNS TABLE (id uuid)
LANGUAGE sql STABLE AS $$
    SELECT r.id FROM runs r WHERE r.workspace_id = p_workspace AND r.status = 'queued'
    ORDER BY r.workspace_id DESC, r.priority DESC, r.run_at DESC, r.seq DESC
    LIMIT 1
$$;

-- Workspaces with queued runs that are not marked are marked: after the upgrade from a
-- database without has_queued, or when an older binary's trigger (which does not mark)
-- queued runs after it applied its schema to this database. Rows locked now are being
-- marked by the trigger, and skipped.
UPDATE workspaces w SET has_queued = true
FROM (SELECT x.id FROM workspaces x
      WHERE NOT x.has_queued AND (SELECT t.id FROM agentapp_queue_tail(x.id) t) IS NOT NULL
      ORDER BY x.id FOR NO KEY UPDATE SKIP LOCKED) s
WHERE w.id = s.id;

-- agentapp_queue_head is the head of an agent's queue as a claim sees it: up to p_n of its
-- due runs, lower priority first, then the earliest due, leaving out p_skip. One SELECT in
-- SQL, so that the planner inlines it into the claim's statements.
CREATE OR REPLACE FUNCTION agentapp_queue_head(p_agent uuid, p_skip uuid[], p_n integer)
RETURNS TABLE (id uuid, priority smallint, run_at timestamptz, seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.id, r.priority, r.run_at, r.seq FROM runs r
    WHERE r.agent_id = p_agent AND r.status = 'queued' AND r.run_at <= now() AND r.id <> ALL (p_skip)
    ORDER BY r.priority, r.run_at, r.seq
    LIMIT p_n
$$;

-- agentapp_claim is one worker cycle's claim, in one statement and one transaction:
--  1. with p_recover, runs whose lease expired go back to queued (or end failed or canceled);
--  2. up to p_limit due runs are claimed for worker p_worker. Workspaces take turns: the
--     claim spreads over the workspaces that have claimable runs, the least recently served
--     first; within a workspace lower priority first, then the earliest due. Paused agents
--     are skipped. An agent's max_concurrency holds across processes: a capped agent is
--     claimed only under its advisory lock (skipped while another claim holds it), and its
--     running runs are counted by a statement that starts after that lock was taken;
--  3. the served workspaces' turn is recorded;
--  4. when it claimed fewer than p_limit, the marked workspaces (has_queued) it found with
--     nothing queued are unmarked.
-- It returns a row per recovered run (kind = its new status), per claimed run (kind
-- 'claimed'), 'more' when it claimed fewer than p_limit but more runs may be claimable
-- (its rounds ran out), 'capped' when it met capped agents with due runs, and 'next' with the time
-- the next scheduled run falls due when it claimed fewer than p_limit. Fewer than p_limit
-- claimed and no 'more' means nothing more was claimable.
CREATE OR REPLACE FUNCTION agentapp_claim(p_worker text, p_limit integer, p_workspace uuid,
                                          p_lease_ms bigint, p_recover boolean)
RETURNS TABLE (kind text, id uuid, workspace_id uuid, attempt integer, input jsonb, agent_name text,
               agent_kind text, agent_config jsonb, timeout_ms integer, next_due timestamptz)
-- Its statements are planned once per connection, not at every claim: planning cost more
-- than executing a claim of a few runs (300 claims of 18: 1.5 ms each with custom plans,
-- 0.9 ms with generic ones). The generic plans hold with history: the picked runs are
-- fetched by an id array, and a drain with 2,000,000 finished runs in the table was as fast
-- as on an empty one (the bench harness's -bench history).
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_capped  uuid[];         -- capped agents with due runs whose lock this claim holds (shares > 1)
    v_full    uuid[] := '{}'; -- capped agents found at their max_concurrency (shares of 1)
    v_locked  uuid[];         -- capped agents of the runs a round picked, then the full ones
    v_agents  uuid[];         -- the agents of the picked runs
    v_capped_met boolean := false; -- capped agents had due runs: a freed slot may make one claimable
    v_dropped integer;        -- picked runs of agents found full
    v_ids     uuid[] := '{}'; -- claimed so far
    v_ws      uuid[] := '{}'; -- their workspaces
    v_skipped uuid[] := '{}'; -- picked but held by a concurrent claim
    v_new     uuid[];
    v_new_ws  uuid[];
    v_missed  uuid[];
    v_picked  uuid[];
    v_found   integer;
    v_want    integer;
    v_share   integer;
    v_active  integer;        -- workspaces that may have candidates: the marked ones, then those of the last round
    v_round   integer;
    v_more    boolean := false; -- the rounds ended before the claim found all it could
    v_empty   uuid[];         -- marked workspaces found with nothing queued, row-locked
BEGIN
    IF p_recover THEN
        RETURN QUERY
        WITH rec AS (
            UPDATE runs r SET
                status = CASE WHEN r.cancel_requested THEN 'canceled'
                              WHEN r.attempt < r.max_attempts THEN 'queued' ELSE 'failed' END,
                error = CASE WHEN r.cancel_requested THEN 'canceled by request'
                             ELSE 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt END,
                errors = r.errors || jsonb_build_array(jsonb_build_object('attempt', r.attempt,
                    'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                    'message', 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt)),
                finished_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN now() END,
                started_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN r.started_at END,
                worker_id = NULL, lease_expires_at = NULL, updated_at = now() -- run_at kept: its place in line
            WHERE r.id = ANY (ARRAY(SELECT x.id FROM runs x WHERE x.status = 'running' AND x.lease_expires_at < now()
                                    ORDER BY x.lease_expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
            RETURNING r.id, r.status)
        SELECT rec.status, rec.id, NULL::uuid, NULL::integer, NULL::jsonb, NULL::text, NULL::text,
               NULL::jsonb, NULL::integer, NULL::timestamptz FROM rec;
    END IF;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;

    -- Only workspaces marked has_queued are walked, so that those with nothing queued cost
    -- a claim nothing (walking every workspace, a claim of 100 runs from 3 busy workspaces
    -- among 10,000 took 279 ms). A claim that comes up short unmarks the empty ones (below).
    SELECT count(*) INTO v_active FROM workspaces w
    WHERE w.has_queued AND (p_workspace IS NULL OR w.id = p_workspace);

    -- Candidates are read without locking them (a lock is a write, and most candidates are
    -- not picked); only the picked runs are locked, skipping those a concurrent claim holds.
    -- Another round follows when runs were skipped that way, or when a workspace's share
    -- left room that workspaces with more runs can fill. The picked runs are fetched with
    -- id = ANY (an array), not id IN (SELECT ...): in the function's cached generic plan the
    -- planner cannot tell how few were picked and chose to scan the whole table, whose size
    -- grows with history.
    FOR v_round IN 1..3 LOOP
        v_want := p_limit - cardinality(v_ids);
        EXIT WHEN v_want <= 0 OR v_active = 0;
        v_share := ceil(v_want::numeric / v_active)::integer;
        v_dropped := 0;
        IF v_share = 1 THEN
            -- A run from each workspace, the least recently served first, is the same pick
            -- as below, found by walking the workspaces in that order and stopping at v_want:
            -- the claim reads the queues of the workspaces it serves, not of every one.
            -- A workspace's run is the first of its due runs whose agent may take one: not
            -- paused, and uncapped, or capped, not found full, and its lock taken here. The
            -- first branch finds it among the workspace's first 4 due runs, one index probe
            -- (runs_claim_workspace_idx); only when paused or full agents hold all 4 does the
            -- second branch look at each agent's head, a probe per agent, so that no backlog
            -- of such an agent is read through. Both give the same run. So only the capped
            -- agents met at the head of a served workspace are locked, not every capped
            -- agent with due runs.
            SELECT coalesce(array_agg(t.id), '{}'), coalesce(array_agg(t.agent_id), '{}'),
                   coalesce(array_agg(t.agent_id) FILTER (WHERE t.capped), '{}'), count(*)
            INTO v_picked, v_agents, v_locked, v_found FROM (
                SELECT c.id, c.agent_id, c.capped FROM (
                    SELECT w.id FROM workspaces w WHERE w.has_queued AND (p_workspace IS NULL OR w.id = p_workspace)
                    ORDER BY w.served_at, w.id) ws
                CROSS JOIN LATERAL (
                    (SELECT h.id, h.agent_id, e.capped FROM (
                         SELECT r.id, r.agent_id, r.priority, r.run_at, r.seq FROM runs r
                         WHERE r.workspace_id = ws.id AND r.status = 'queued' AND r.run_at <= now()
                           AND r.id <> ALL (v_skipped)
                         ORDER BY r.priority, r.run_at, r.seq
                         LIMIT 4) h
                     CROSS JOIN LATERAL (
                         SELECT a.max_concurrency IS NOT NULL AS capped FROM agents a
                         WHERE a.id = h.agent_id AND NOT a.paused
                           AND (a.max_concurrency IS NULL
                                OR (a.id <> ALL (v_full) AND pg_try_advisory_xact_lock(734629, hashtext(a.id::text))))) e
                     ORDER BY h.priority, h.run_at, h.seq
                     LIMIT 1)
                    UNION ALL
                    (SELECT r.id, a.id, a.max_concurrency IS NOT NULL
                     FROM agents a CROSS JOIN LATERAL agentapp_queue_head(a.id, v_skipped, 1) r
                     WHERE a.workspace_id = ws.id AND NOT a.paused
                       AND (a.max_concurrency IS NULL
                            OR (a.id <> ALL (v_full) AND pg_try_advisory_xact_lock(734629, hashtext(a.id::text))))
                     ORDER BY r.priority, r.run_at, r.seq
                     LIMIT 1)
                    LIMIT 1) c
                LIMIT v_want) t;
            IF v_found < v_want THEN
                v_active := v_found; -- every workspace was walked
            END IF;
            -- A run of a capped agent is kept only while the agent is below its cap, its
            -- running runs counted by a statement that starts after the lock was taken (a
            -- round gives an agent one run at most: one per workspace).
            IF cardinality(v_locked) > 0 THEN
                v_capped_met := true;
                SELECT coalesce(array_agg(a.id), '{}') INTO v_locked
                FROM agents a
                WHERE a.id = ANY (v_locked)
                  AND a.max_concurrency <= (SELECT count(*) FROM runs x WHERE x.status = 'running'
                                            AND x.workspace_id = a.workspace_id AND x.agent_id = a.id);
                IF cardinality(v_locked) > 0 THEN
                    v_full := v_full || v_locked;
                    v_dropped := cardinality(v_locked);
                    v_picked := ARRAY(SELECT p.id FROM unnest(v_picked, v_agents) p (id, agent_id)
                                      WHERE p.agent_id <> ALL (v_locked));
                END IF;
            END IF;
        ELSE
            IF v_capped IS NULL THEN
                -- Advisory locks live in memory: taking one writes nothing, unlike a row
                -- lock. At most p_limit of them, the least recently served first: no claim
                -- needs more. The due-run test is a scalar subquery asked of the agents in
                -- that order until p_limit answered: as EXISTS, the generic plan joined it by
                -- reading every queued run (3.5 ms a claim with 10,000 queued and no capped
                -- agent at all).
                SELECT coalesce(array_agg(c.id), '{}') INTO v_capped FROM (
                    SELECT s.id FROM (
                        SELECT a.id FROM agents a JOIN workspaces w ON w.id = a.workspace_id
                        WHERE a.max_concurrency IS NOT NULL AND NOT a.paused AND w.has_queued
                          AND (p_workspace IS NULL OR a.workspace_id = p_workspace)
                        ORDER BY w.served_at OFFSET 0) s
                    WHERE (SELECT true FROM runs r WHERE r.agent_id = s.id AND r.status = 'queued' AND r.run_at <= now() LIMIT 1)
                    LIMIT p_limit) c
                WHERE pg_try_advisory_xact_lock(734629, hashtext(c.id::text));
                v_capped_met := v_capped_met OR cardinality(v_capped) > 0;
            END IF;
            -- Each workspace's turns are its first v_share candidates. When its first
            -- v_share due runs (runs_claim_workspace_idx, one probe) are all of uncapped,
            -- unpaused agents, they are those candidates (fast). Otherwise its candidates
            -- are each eligible agent's first runs, up to the agent's room (elig, a probe
            -- per agent), numbered in the same order. Either way the same runs.
            WITH fast AS (
                SELECT w.id AS workspace_id, w.served_at, f.ids, f.ok
                FROM workspaces w CROSS JOIN LATERAL (
                    SELECT array_agg(h.id ORDER BY h.priority, h.run_at, h.seq) AS ids,
                           bool_and(a.max_concurrency IS NULL AND NOT a.paused) AS ok
                    FROM (SELECT r.id, r.agent_id, r.priority, r.run_at, r.seq FROM runs r
                          WHERE r.workspace_id = w.id AND r.status = 'queued' AND r.run_at <= now()
                            AND r.id <> ALL (v_skipped)
                          ORDER BY r.priority, r.run_at, r.seq
                          LIMIT v_share) h
                    JOIN agents a ON a.id = h.agent_id) f
                WHERE w.has_queued AND (p_workspace IS NULL OR w.id = p_workspace) AND f.ids IS NOT NULL
            ), elig AS (
                SELECT a.id AS agent_id, a.workspace_id, w.served_at,
                       CASE WHEN a.max_concurrency IS NULL THEN v_share
                            ELSE least(v_share, a.max_concurrency - (SELECT count(*) FROM runs r
                                       WHERE r.status = 'running' AND r.workspace_id = a.workspace_id
                                         AND r.agent_id = a.id))::integer END AS room
                FROM agents a JOIN workspaces w ON w.id = a.workspace_id
                WHERE NOT a.paused AND a.workspace_id IN (SELECT fast.workspace_id FROM fast WHERE NOT fast.ok)
                  AND (a.max_concurrency IS NULL OR a.id = ANY (v_capped))
            ), cand AS (
                SELECT u.id, u.turn, fast.workspace_id, fast.served_at
                FROM fast CROSS JOIN LATERAL unnest(fast.ids) WITH ORDINALITY AS u (id, turn)
                WHERE fast.ok
                UNION ALL
                SELECT t.id, t.turn, t.workspace_id, t.served_at FROM (
                    SELECT c.id, e.workspace_id, e.served_at,
                           row_number() OVER (PARTITION BY e.workspace_id ORDER BY c.priority, c.run_at, c.seq) AS turn
                    FROM elig e CROSS JOIN LATERAL agentapp_queue_head(e.agent_id, v_skipped, e.room) c
                    WHERE e.room > 0) t
            )
            SELECT ARRAY(SELECT cand.id FROM cand WHERE cand.turn <= v_share
                         ORDER BY cand.turn, cand.served_at, cand.workspace_id
                         LIMIT v_want),
                   (SELECT count(DISTINCT cand.workspace_id) FROM cand)
            INTO v_picked, v_active;
        END IF;
        WITH locked AS (
            SELECT r.id FROM runs r WHERE r.id = ANY (v_picked) AND r.status = 'queued'
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE runs r SET status = 'running', attempt = r.attempt + 1, worker_id = p_worker,
                lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
                started_at = now(), updated_at = now()
            WHERE r.id = ANY (ARRAY(SELECT locked.id FROM locked))
            RETURNING r.id, r.workspace_id)
        SELECT coalesce(array_agg(claimed.id), '{}'), coalesce(array_agg(DISTINCT claimed.workspace_id), '{}'),
               ARRAY(SELECT p FROM unnest(v_picked) p WHERE p NOT IN (SELECT claimed.id FROM claimed))
        INTO v_new, v_new_ws, v_missed FROM claimed;
        v_ids := v_ids || v_new;
        v_ws := v_ws || v_new_ws;
        v_skipped := v_skipped || v_missed;
        -- Another round helps only past runs a concurrent claim held, or when the shares
        -- of several workspaces left room.
        EXIT WHEN cardinality(v_missed) = 0 AND v_dropped = 0 AND (cardinality(v_new) = 0 OR v_active <= 1);
        v_more := v_round = 3; -- a fourth round would have followed
    END LOOP;

    IF cardinality(v_ids) > 0 THEN
        -- A turn another claim is recording at this moment is left to it: never wait here.
        UPDATE workspaces w SET served_at = clock_timestamp()
        FROM (SELECT x.id FROM workspaces x WHERE x.id = ANY (v_ws) ORDER BY x.id
              FOR NO KEY UPDATE SKIP LOCKED) s
        WHERE w.id = s.id;
        RETURN QUERY
        SELECT 'claimed'::text, r.id, r.workspace_id, r.attempt, r.input, a.name, a.kind, a.config,
               r.timeout_ms, NULL::timestamptz
        FROM runs r JOIN agents a ON a.id = r.agent_id WHERE r.id = ANY (v_ids);
    END IF;
    IF cardinality(v_ids) < p_limit AND NOT v_more THEN
        -- The claim found all it could: a marked workspace not served for a second may have
        -- nothing queued. (One served since stays marked, so that a workspace whose runs come
        -- one at a time is not unmarked and marked again, two writes, for each.) Those that
        -- look empty are row-locked (FOR UPDATE, skipping rows locked now) and unmarked by a later statement, which sees every run
        -- queued before the lock was taken. A run queued in such a workspace meanwhile holds
        -- a key-share lock on its row (taken by the trigger that marks it), so the row is
        -- skipped here, or that lock waits for this claim and the trigger marks it again.
        SELECT coalesce(array_agg(x.id), '{}') INTO v_empty FROM (
            SELECT w.id FROM workspaces w
            WHERE w.has_queued AND w.served_at < now() - interval '1 second'
              AND w.id <> ALL (v_ws) AND (p_workspace IS NULL OR w.id = p_workspace)
              AND (SELECT t.id FROM agentapp_queue_tail(w.id) t) IS NULL
            ORDER BY w.id FOR UPDATE SKIP LOCKED) x;
        IF cardinality(v_empty) > 0 THEN
            UPDATE workspaces w SET has_queued = false
            WHERE w.id = ANY (v_empty) AND (SELECT t.id FROM agentapp_queue_tail(w.id) t) IS NULL;
        END IF;
    END IF;
    IF v_more THEN
        RETURN QUERY SELECT 'more'::text, NULL::uuid, NULL::uuid, NULL::integer, NULL::jsonb, NULL::text,
                            NULL::text, NULL::jsonb, NULL::integer, NULL::timestamptz;
    END IF;
    IF v_capped_met THEN
        RETURN QUERY SELECT 'capped'::text, NULL::uuid, NULL::uuid, NULL::integer, NULL::jsonb, NULL::text,
                            NULL::text, NULL::jsonb, NULL::integer, NULL::timestamptz;
    END IF;
    IF cardinality(v_ids) < p_limit THEN
        RETURN QUERY SELECT 'next'::text, NULL::uuid, NULL::uuid, NULL::integer, NULL::jsonb, NULL::text,
                            NULL::text, NULL::jsonb, NULL::integer, min(r.run_at)
        FROM runs r WHERE r.status = 'queued' AND r.priority >= 0 AND r.run_at > now()
          AND (p_workspace IS NULL OR r.workspace_id = p_workspace);
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
