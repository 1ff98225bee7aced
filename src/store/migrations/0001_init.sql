-- claygate store, schema version 1.
--
-- Applied by src/store/sqlite.rs inside one transaction, which also sets
-- PRAGMA application_id (the claygate marker) and PRAGMA user_version (the
-- schema version). Times are Unix milliseconds. Never edit a released
-- migration: add the next file (0002_….sql) instead.

-- Idempotency keys: one row per (operation, key).
-- state in_flight: lease_until set; completed: status/content_type/body set;
-- queued: dlq_id set.
CREATE TABLE idempotency (
    operation    TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('in_flight', 'completed', 'queued')),
    lease_until  INTEGER,
    status       INTEGER,
    content_type TEXT,
    body         BLOB,
    dlq_id       INTEGER,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (operation, key)
) WITHOUT ROWID;

CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);

-- Fallback cache: the latest successful answer per (operation, key).
CREATE TABLE cache (
    operation    TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    status       INTEGER NOT NULL,
    content_type TEXT,
    body         BLOB    NOT NULL,
    fetched_at   INTEGER NOT NULL,
    PRIMARY KEY (operation, key)
) WITHOUT ROWID;

CREATE INDEX cache_by_age ON cache (operation, fetched_at);

-- Dead letters. AUTOINCREMENT: ids are never reused, even after the newest
-- entry is deleted, so an id in a log line or an alert names one entry forever.
CREATE TABLE dlq (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    operation        TEXT    NOT NULL,
    params           TEXT    NOT NULL,
    idempotency_key  TEXT,
    priority         TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'parked')),
    error_code       TEXT    NOT NULL,
    error_message    TEXT    NOT NULL,
    call_attempts    INTEGER NOT NULL,
    redrive_attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at INTEGER NOT NULL,
    last_attempt_at  INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    delivered_status INTEGER,
    expires_at       INTEGER
);

-- The redrive worker's question: pending entries of one operation, by due time.
CREATE INDEX dlq_by_due ON dlq (operation, state, next_attempt_at);
-- Retention sweeps of delivered and parked entries.
CREATE INDEX dlq_by_expiry ON dlq (state, expires_at);
