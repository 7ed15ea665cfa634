-- The daemon's queue on PostgreSQL, shared by several nodes: tasks and their
-- deliveries (an outbox: a finished task's row and its delivery row are
-- written in one transaction). The same rows as the SQLite schema; JSON as
-- text, times in milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS patient_tasks (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    callback TEXT NOT NULL,
    callback_args TEXT NOT NULL,
    raise_error_responses BOOLEAN NOT NULL,
    deliver TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    priority BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    not_before BIGINT NOT NULL,
    deadline BIGINT,
    finished_at BIGINT,
    next_attempt BIGINT NOT NULL DEFAULT 1,
    request_sent BOOLEAN NOT NULL DEFAULT FALSE,
    attempts TEXT NOT NULL DEFAULT '[]',
    outcome TEXT,
    lease_owner TEXT,
    lease_until BIGINT
);

CREATE INDEX IF NOT EXISTS patient_tasks_due
    ON patient_tasks (priority, not_before)
    WHERE state IN ('scheduled', 'queued');

CREATE INDEX IF NOT EXISTS patient_tasks_created
    ON patient_tasks (created_at DESC, id DESC);

CREATE INDEX IF NOT EXISTS patient_tasks_running
    ON patient_tasks (lease_until)
    WHERE state = 'running';

CREATE INDEX IF NOT EXISTS patient_tasks_finished
    ON patient_tasks (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS patient_deliveries (
    task_id TEXT PRIMARY KEY NOT NULL REFERENCES patient_tasks (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT,
    last_error TEXT,
    message_id TEXT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT
);

CREATE INDEX IF NOT EXISTS patient_deliveries_due
    ON patient_deliveries (next_at)
    WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS patient_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
