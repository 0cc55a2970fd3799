-- tokenpool's embedded SQLite schema: the same model as postgres.sql (schema.sql).
-- Timestamps are ISO-8601 UTC text with microseconds, which sorts in time order.

CREATE TABLE IF NOT EXISTS pools (
    name            TEXT PRIMARY KEY,
    ttl_seconds     REAL NOT NULL,
    owner_epoch     INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    owned_at        TEXT,
    written_at      TEXT
);

CREATE TABLE IF NOT EXISTS users (
    id              TEXT PRIMARY KEY CHECK (id <> '' AND length(CAST(id AS BLOB)) <= 128),
    name            TEXT,
    email           TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

CREATE TABLE IF NOT EXISTS tokens (
    id              TEXT PRIMARY KEY,
    pool            TEXT NOT NULL REFERENCES pools (name),
    available       INTEGER NOT NULL DEFAULT 1 CHECK (available IN (0, 1)),
    created_at      TEXT NOT NULL,
    retired_at      TEXT
);
CREATE INDEX IF NOT EXISTS tokens_by_pool ON tokens (pool, created_at, id) WHERE retired_at IS NULL;

CREATE TABLE IF NOT EXISTS token_assignments (
    id              TEXT PRIMARY KEY,
    token_id        TEXT NOT NULL UNIQUE REFERENCES tokens (id),
    pool            TEXT NOT NULL REFERENCES pools (name),
    user_id         TEXT NOT NULL REFERENCES users (id),
    fence           INTEGER NOT NULL,
    assigned_at     TEXT NOT NULL,
    expires_at      TEXT NOT NULL CHECK (expires_at > assigned_at),
    UNIQUE (pool, user_id)
);

CREATE TABLE IF NOT EXISTS token_usage_history (
    id                  TEXT PRIMARY KEY,
    token_id            TEXT NOT NULL REFERENCES tokens (id),
    pool                TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    started_at          TEXT NOT NULL,
    ended_at            TEXT NOT NULL CHECK (ended_at >= started_at),
    expiration_reason   TEXT NOT NULL
        CHECK (expiration_reason IN ('expired', 'evicted', 'released', 'cleared'))
);
CREATE INDEX IF NOT EXISTS history_by_token ON token_usage_history (token_id, ended_at DESC, started_at DESC);
CREATE INDEX IF NOT EXISTS history_by_user ON token_usage_history (user_id, ended_at DESC);
