-- claygate store, schema version 2: claim tokens and parked keys.
--
-- Idempotency records gain `claim_token` (the random token of the in-flight
-- claim: only its holder may complete, release or dead-letter the key) and
-- the state `parked` (the key's dead letter was parked: a duplicate is told
-- so instead of "queued"). SQLite cannot change a CHECK constraint in
-- place, so the table is rebuilt; records written by version 1 keep
-- everything (an in-flight one has no token: it was a crashed process's
-- claim, taken over once its lease lapses), except that dead-lettered keys
-- are then brought in line with their entries (at the end).

CREATE TABLE idempotency_v2 (
    operation    TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    state        TEXT    NOT NULL
                 CHECK (state IN ('in_flight', 'completed', 'queued', 'parked')),
    claim_token  TEXT,
    lease_until  INTEGER,
    status       INTEGER,
    content_type TEXT,
    body         BLOB,
    dlq_id       INTEGER,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (operation, key)
) WITHOUT ROWID;

INSERT INTO idempotency_v2 (operation, key, fingerprint, state, claim_token, lease_until,
                            status, content_type, body, dlq_id, created_at, expires_at)
SELECT operation, key, fingerprint, state, NULL, lease_until,
       status, content_type, body, dlq_id, created_at, expires_at
FROM idempotency;

DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);

-- Version 1 left a dead-lettered key `queued` whatever became of its entry,
-- expiring with the key's ttl. Bring each to what version 2 keeps: the key
-- of a pending entry does not expire (a duplicate must not run the work
-- beside the redrive); the key of a parked entry is parked, for as long as
-- the entry is kept; a key whose entry is gone (deleted) is freed, so a
-- retry runs the work instead of hearing 202 for work that will never run.
-- The key of a delivered entry stays `queued` until its ttl, as version 1
-- had it (version 1 kept no answer to replay; the entry says delivered).
UPDATE idempotency SET expires_at = 9223372036854775807
WHERE state = 'queued' AND EXISTS (
    SELECT 1 FROM dlq WHERE dlq.id = idempotency.dlq_id
        AND dlq.operation = idempotency.operation
        AND dlq.idempotency_key = idempotency.key AND dlq.state = 'pending');

UPDATE idempotency SET state = 'parked', expires_at = 9223372036854775807
WHERE state = 'queued' AND EXISTS (
    SELECT 1 FROM dlq WHERE dlq.id = idempotency.dlq_id
        AND dlq.operation = idempotency.operation
        AND dlq.idempotency_key = idempotency.key AND dlq.state = 'parked');

DELETE FROM idempotency
WHERE state = 'queued' AND NOT EXISTS (
    SELECT 1 FROM dlq WHERE dlq.id = idempotency.dlq_id
        AND dlq.operation = idempotency.operation
        AND dlq.idempotency_key = idempotency.key);
