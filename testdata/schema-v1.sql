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
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

CREATE TABLE IF NOT EXISTS runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq              bigserial NOT NULL,          -- insertion order: claim order and list cursor
    workspace_id     uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    agent_id         uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    input            jsonb NOT NULL DEFAULT 'null',
    output           jsonb,
    error            text,
    errors           jsonb NOT NULL DEFAULT '[]', -- every failed attempt: {"attempt","at","message"}
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 25),
    run_after        timestamptz NOT NULL DEFAULT now(), -- retry backoff: not claimed before this
    worker_id        text,                        -- the process executing the current attempt
    lease_expires_at timestamptz,                 -- while running: recovered by any worker after this
    cancel_requested boolean NOT NULL DEFAULT false,
    idempotency_key  text,
    request_hash     bytea,                       -- sha256 of the create request, for idempotent repeats
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Claiming: oldest queued first.
CREATE INDEX IF NOT EXISTS runs_queued_idx ON runs (seq) WHERE status = 'queued';
-- Recovery: running runs by lease expiry.
CREATE INDEX IF NOT EXISTS runs_running_lease_idx ON runs (lease_expires_at) WHERE status = 'running';
-- Listing a workspace's runs, newest first, optionally by status.
CREATE INDEX IF NOT EXISTS runs_workspace_seq_idx ON runs (workspace_id, seq);
CREATE INDEX IF NOT EXISTS runs_workspace_status_seq_idx ON runs (workspace_id, status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency_idx ON runs (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Notifications that let every agentapp process react at once:
--   agentapp_runs    a run became claimable (wakes idle workers)
--   agentapp_cancel  payload run id: cancel it where it executes
--   agentapp_final   payload run id: the run reached a final status (answers ?wait_ms)
CREATE OR REPLACE FUNCTION agentapp_runs_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentapp_runs', '');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION agentapp_runs_notify_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('succeeded', 'failed', 'canceled') THEN
        PERFORM pg_notify('agentapp_final', NEW.id::text);
    ELSIF NEW.status = 'queued' AND NEW.run_after <= now() THEN
        PERFORM pg_notify('agentapp_runs', '');
    ELSIF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('agentapp_cancel', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_notify_insert AFTER INSERT ON runs
    FOR EACH STATEMENT EXECUTE FUNCTION agentapp_runs_notify_insert();

CREATE OR REPLACE TRIGGER runs_notify_update AFTER UPDATE OF status, cancel_requested ON runs
    FOR EACH ROW WHEN ((OLD.status IS DISTINCT FROM NEW.status AND NEW.status <> 'running')
                       OR (NEW.cancel_requested AND NOT OLD.cancel_requested))
    EXECUTE FUNCTION agentapp_runs_notify_update();
