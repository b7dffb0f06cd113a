package main

// Upgrades (SPEC "Upgrades"). schema.sql is the schema as it is now: tables, indexes,
// functions and triggers, each created if missing, applied at every start. A database made
// by an earlier release also needs the changes schema.sql cannot say (a renamed column, a
// new column on an existing table, a key replaced, a count taken again): those are the
// numbered migrations below, each applied once and recorded in schema_migrations. A new
// database gets schema.sql alone and records every migration as applied: schema.sql is
// what they lead to.

import (
	"context"
	_ "embed"
	"fmt"
)

//go:embed schema.sql
var schemaSQL string

// migration is one numbered upgrade; their versions are 1, 2, … in order. before runs ahead of schema.sql, reshaping existing
// tables so that schema.sql applies to them; after runs once schema.sql has made what is
// new. Both are written to do nothing where the database already has their change: the
// databases of releases before schema_migrations existed are told apart by their shape.
type migration struct {
	version       int
	name          string
	before, after string
}

var migrations = []migration{
	{
		version: 1,
		name:    "priorities, time limits, caps and pause",
		before: `
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
    END IF;
END $$`,
	},
	{
		version: 2,
		name:    "progress events; one key from runs to their agent",
		before: `
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'runs'::regclass AND attname = 'events_count') THEN
        ALTER TABLE runs ADD COLUMN events_count integer NOT NULL DEFAULT 0;
    END IF;
    -- Checked once over the whole table, with writers held off meanwhile.
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
END $$`,
	},
	{
		version: 3,
		name:    "the claim in queue.go; counts from insert-only changes",
		// The counts are taken again from the runs: a release before the counters had
		// none, the last one kept them in shards. schema.sql's triggers on runs hold
		// writers off from their creation to the commit, so none is missed or counted twice.
		after: `
TRUNCATE run_counts, run_count_changes;
INSERT INTO run_counts (workspace_id, status, shard, n)
SELECT workspace_id, agentapp_counter(status), 0, count(*) FROM runs GROUP BY 1, 2;
ALTER TABLE workspaces DROP COLUMN IF EXISTS has_queued, DROP COLUMN IF EXISTS served_at`,
	},
	{
		version: 4,
		name:    "signed deliveries and trace context",
		// The signing secret's default is volatile, so every existing agent gets its own.
		before: `
ALTER TABLE agents
    ADD COLUMN signing_secret text DEFAULT 'whsec_' || encode(decode(
        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64'),
    ADD COLUMN previous_signing_secret text,
    ADD COLUMN secret_rotated_at timestamptz;
ALTER TABLE runs ADD COLUMN trace_id text, ADD COLUMN trace_flags text`,
	},
	{
		version: 5,
		name:    "schedules",
		before:  `ALTER TABLE runs ADD COLUMN schedule_id uuid, ADD COLUMN scheduled_for timestamptz`,
	},
	{
		version: 6,
		name:    "retry backoff per agent; pushback",
		before: `
ALTER TABLE agents
    ADD COLUMN retry_base_ms integer NOT NULL DEFAULT 500,
    ADD COLUMN retry_max_ms integer NOT NULL DEFAULT 30000,
    ADD COLUMN throttled_until timestamptz,
    ADD CONSTRAINT agents_retry_check CHECK (retry_base_ms BETWEEN 1 AND 3600000
                                             AND retry_max_ms BETWEEN retry_base_ms AND 86400000);
ALTER TABLE runs ADD COLUMN pushbacks integer NOT NULL DEFAULT 0`,
	},
	{
		version: 7,
		name:    "concurrency keys and rate limits",
		before: `
ALTER TABLE agents
    ADD COLUMN key_concurrency integer NOT NULL DEFAULT 1 CHECK (key_concurrency BETWEEN 1 AND 1000),
    ADD COLUMN on_key_conflict text NOT NULL DEFAULT 'queue'
        CHECK (on_key_conflict IN ('queue', 'cancel_running', 'reject')),
    ADD COLUMN rate_limit integer,
    ADD COLUMN rate_period_ms integer,
    ADD CONSTRAINT agents_rate_check CHECK ((rate_limit IS NULL) = (rate_period_ms IS NULL)
                                            AND rate_limit BETWEEN 1 AND 1000000
                                            AND rate_period_ms BETWEEN 1000 AND 86400000);
ALTER TABLE runs
    ADD COLUMN concurrency_key text CHECK (length(concurrency_key) BETWEEN 1 AND 200),
    ADD COLUMN cost integer NOT NULL DEFAULT 1 CHECK (cost BETWEEN 1 AND 1000000),
    ADD COLUMN cancel_error text`,
		// After schema.sql: a database older than schedules gets the table from it, with these.
		after: `
ALTER TABLE schedules
    ADD COLUMN IF NOT EXISTS concurrency_key text CHECK (length(concurrency_key) BETWEEN 1 AND 200),
    ADD COLUMN IF NOT EXISTS cost integer NOT NULL DEFAULT 1 CHECK (cost BETWEEN 1 AND 1000000)`,
	},
	{
		version: 8,
		name:    "runs that wait: steps, signals, child runs",
		// The columns' defaults are constants: no row is rewritten. The status check is
		// replaced, with its name, to allow waiting (one scan of runs, under the lock).
		before: `
ALTER TABLE runs
    DROP CONSTRAINT runs_status_check,
    ADD CONSTRAINT runs_status_check CHECK (status IN ('queued', 'running', 'waiting', 'succeeded', 'failed', 'canceled')),
    ADD COLUMN step integer NOT NULL DEFAULT 1,
    ADD COLUMN state jsonb,
    ADD COLUMN waiting_for jsonb,
    ADD COLUMN wake_at timestamptz,
    ADD COLUMN parent_id uuid REFERENCES runs (id) ON DELETE CASCADE,
    ADD COLUMN parent_step integer,
    ADD COLUMN resume jsonb`,
	},
}

// retiredSQL drops what earlier releases made and this one does not use. It runs at every
// start, not once: an older binary started against this database makes its objects again
// (SPEC allows it to start), and one of them, its trigger on runs, would fail the next
// write that puts a run back in line. Each is looked up first, because a DROP locks its
// table even when there is nothing to drop.
const retiredSQL = `
DO $$
DECLARE
    v_name text;
BEGIN
    FOR v_name IN SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace
                  AND c.relname IN ('runs_queued_idx', 'runs_due_idx', 'runs_next_due_idx', 'runs_claim_idx',
                                    'runs_running_lease_idx', 'runs_running_agent_idx', 'runs_claim_workspace_idx',
                                    'runs_workspace_seq_idx', 'runs_status_workspace_seq_idx',
                                    'runs_workspace_agent_seq_idx', 'runs_workspace_status_seq_idx')
    LOOP
        EXECUTE format('DROP INDEX %I', v_name);
    END LOOP;
    FOR v_name IN SELECT tgname FROM pg_trigger WHERE tgrelid = 'runs'::regclass
                  AND tgname IN ('runs_notify_insert', 'runs_notify_update', 'runs_notify_status_update')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON runs', v_name);
    END LOOP;
END $$;
DROP FUNCTION IF EXISTS agentapp_runs_notify_insert();
DROP FUNCTION IF EXISTS agentapp_runs_notify_update();
DROP FUNCTION IF EXISTS agentapp_runs_notify_status();
DROP FUNCTION IF EXISTS agentapp_claim(text, integer, uuid, bigint, boolean);
DROP FUNCTION IF EXISTS agentapp_queue_head(uuid, uuid[], integer);
DROP FUNCTION IF EXISTS agentapp_queue_tail(uuid);
DROP FUNCTION IF EXISTS agentapp_create_runs(uuid[], uuid[], text[], jsonb[], integer[], text[], bytea[], smallint[],
                                             text[], bigint[], integer[])`

// applySchema brings the database to this release's schema in one transaction under an
// advisory lock, so that processes starting together do not race: the pending migrations'
// first halves, schema.sql, the retired objects dropped, the migrations' second halves.
// A database that a newer release has migrated is refused: this binary does not know
// what that release changed.
func (s *store) applySchema(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7346298105)`); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`); err != nil {
		return fmt.Errorf("apply schema: %w", err)
	}
	var fresh bool
	var newest int
	err = tx.QueryRowContext(ctx, `SELECT to_regclass('runs') IS NULL, coalesce(max(version), 0) FROM schema_migrations`).
		Scan(&fresh, &newest)
	if err != nil {
		return fmt.Errorf("apply schema: %w", err)
	}
	known := migrations[len(migrations)-1].version
	if newest > known {
		return fmt.Errorf("the database was migrated by a newer agentapp (migration %d; this binary knows up to %d): run that release or a later one", newest, known)
	}
	// The migrations after newest: versions may have gaps (a branch's migration numbered
	// after another's that it does not carry), so they are picked by version, not index.
	var pending []migration
	for _, m := range migrations {
		if m.version > newest {
			pending = append(pending, m)
		}
	}
	step := func(what, query string) error {
		if _, err := tx.ExecContext(ctx, query); err != nil {
			return fmt.Errorf("apply schema: %s: %w", what, err)
		}
		return nil
	}
	for _, m := range pending {
		if !fresh && m.before != "" {
			if err := step(fmt.Sprintf("migration %d (%s)", m.version, m.name), m.before); err != nil {
				return err
			}
		}
	}
	if err := step("schema.sql", schemaSQL); err != nil {
		return err
	}
	if err := step("retired objects", retiredSQL); err != nil {
		return err
	}
	for _, m := range pending {
		if !fresh && m.after != "" {
			if err := step(fmt.Sprintf("migration %d (%s)", m.version, m.name), m.after); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name) VALUES ($1, $2)`, m.version, m.name); err != nil {
			return fmt.Errorf("apply schema: record migration %d: %w", m.version, err)
		}
	}
	return tx.Commit()
}
