-- Payloads moved out of job arguments by the SQL payload store (SQLite).
-- Same table as the Ruby gem's migration, so both can share it.
CREATE TABLE IF NOT EXISTS patient_http_payloads (
    key TEXT NOT NULL PRIMARY KEY,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS index_patient_http_payloads_on_created_at
    ON patient_http_payloads (created_at);
