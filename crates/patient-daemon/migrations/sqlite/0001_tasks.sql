-- The daemon's queue: tasks and their deliveries (an outbox: a finished
-- task's row and its delivery row are written in one transaction).
CREATE TABLE IF NOT EXISTS patient_tasks (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    callback TEXT NOT NULL,
    callback_args TEXT NOT NULL,
    raise_error_responses INTEGER NOT NULL,
    deliver TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    priority INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    deadline INTEGER,
    finished_at INTEGER,
    next_attempt INTEGER NOT NULL DEFAULT 1,
    request_sent INTEGER NOT NULL DEFAULT 0,
    attempts TEXT NOT NULL DEFAULT '[]',
    outcome TEXT,
    lease_owner TEXT,
    lease_until INTEGER
);

CREATE INDEX IF NOT EXISTS patient_tasks_due
    ON patient_tasks (priority, not_before)
    WHERE state IN ('scheduled', 'queued');

CREATE INDEX IF NOT EXISTS patient_tasks_created
    ON patient_tasks (created_at DESC, id DESC);

CREATE INDEX IF NOT EXISTS patient_tasks_running
    ON patient_tasks (lease_owner)
    WHERE state = 'running';

CREATE INDEX IF NOT EXISTS patient_tasks_finished
    ON patient_tasks (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS patient_deliveries (
    task_id TEXT PRIMARY KEY NOT NULL REFERENCES patient_tasks (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER,
    last_error TEXT,
    message_id TEXT NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER
);

CREATE INDEX IF NOT EXISTS patient_deliveries_due
    ON patient_deliveries (next_at)
    WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS patient_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
