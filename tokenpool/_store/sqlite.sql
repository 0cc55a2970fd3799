-- tokenpool's embedded SQLite schema (version 2): the same model as postgres.sql
-- (schema.sql). Times are integers, microseconds since the Unix epoch; token and
-- lease ids are UUID text. The history and the assignments name a token by its
-- integer number (tokens.no): an index of 36-character keys costs SQLite twice the
-- time per insert of an index of integers (measured: 68k against 137k rows/s).

CREATE TABLE IF NOT EXISTS pools (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    size            INTEGER NOT NULL,
    ttl_seconds     REAL NOT NULL,
    when_full       TEXT NOT NULL DEFAULT 'evict' CHECK (when_full IN ('evict', 'reject', 'wait')),
    min_hold_seconds REAL NOT NULL DEFAULT 0,
    max_lifetime_seconds REAL,
    owner_epoch     INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,
    revision        INTEGER NOT NULL DEFAULT 0,
    clock_us        INTEGER NOT NULL DEFAULT 0,
    activations     INTEGER NOT NULL DEFAULT 0,
    evictions       INTEGER NOT NULL DEFAULT 0,
    expirations     INTEGER NOT NULL DEFAULT 0,
    releases        INTEGER NOT NULL DEFAULT 0,
    clears          INTEGER NOT NULL DEFAULT 0,
    renewals        INTEGER NOT NULL DEFAULT 0,
    refusals        INTEGER NOT NULL DEFAULT 0,
    created_us      INTEGER NOT NULL,
    owned_us        INTEGER,
    written_us      INTEGER,
    dropped_us      INTEGER
);

CREATE TABLE IF NOT EXISTS users (
    id              TEXT PRIMARY KEY CHECK (id <> '' AND length(CAST(id AS BLOB)) <= 128),
    name            TEXT,
    email           TEXT
);

CREATE TABLE IF NOT EXISTS tokens (
    no              INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    pool_id         INTEGER NOT NULL REFERENCES pools (id),
    created_us      INTEGER NOT NULL,
    retired_us      INTEGER
);
CREATE INDEX IF NOT EXISTS tokens_by_pool ON tokens (pool_id, created_us, id) WHERE retired_us IS NULL;

-- One row per token, its lease columns NULL while available (see postgres.sql).
CREATE TABLE IF NOT EXISTS token_assignments (
    token_no        INTEGER PRIMARY KEY REFERENCES tokens (no),
    pool_id         INTEGER NOT NULL REFERENCES pools (id),
    lease_id        TEXT,
    user_id         TEXT,
    fence           INTEGER,
    assigned_us     INTEGER,
    expires_us      INTEGER CHECK (expires_us > assigned_us),
    CHECK ((lease_id IS NULL) = (user_id IS NULL))
);

CREATE TABLE IF NOT EXISTS token_usage_history (
    pool_id             INTEGER NOT NULL,
    revision            INTEGER NOT NULL,
    lease_id            TEXT NOT NULL,
    token_no            INTEGER NOT NULL,
    fence               INTEGER NOT NULL,
    started_us          INTEGER NOT NULL,
    ended_us            INTEGER NOT NULL CHECK (ended_us >= started_us),
    expiration_reason   TEXT NOT NULL
        CHECK (expiration_reason IN ('expired', 'evicted', 'released', 'cleared')),
    user_id             TEXT NOT NULL,
    PRIMARY KEY (pool_id, revision)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_token ON token_usage_history (token_no, revision);
CREATE INDEX IF NOT EXISTS history_by_user ON token_usage_history (pool_id, user_id, revision);
-- The usage analytics read a pool's leases ended in a time range (_store/analytics.py).
CREATE INDEX IF NOT EXISTS history_by_end ON token_usage_history (pool_id, ended_us);

-- Summary tables of the usage analytics (see postgres.sql): rolled up by the server's
-- analytics connection, never by the write path.
CREATE TABLE IF NOT EXISTS usage_rollup (
    pool_id     INTEGER PRIMARY KEY,
    revision    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_hours (
    pool_id     INTEGER NOT NULL,
    hour        INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    bucket      INTEGER NOT NULL,
    leases      INTEGER NOT NULL,
    hold_sum    REAL NOT NULL,
    hold_max    REAL NOT NULL,
    PRIMARY KEY (pool_id, hour, reason, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_users (
    pool_id     INTEGER NOT NULL,
    day         INTEGER NOT NULL,
    user_id     TEXT NOT NULL,
    leases      INTEGER NOT NULL,
    hold_sum    REAL NOT NULL,
    hold_max    REAL NOT NULL,
    expired     INTEGER NOT NULL,
    evicted     INTEGER NOT NULL,
    released    INTEGER NOT NULL,
    cleared     INTEGER NOT NULL,
    PRIMARY KEY (pool_id, day, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_tokens (
    pool_id     INTEGER NOT NULL,
    day         INTEGER NOT NULL,
    token_no    INTEGER NOT NULL,
    leases      INTEGER NOT NULL,
    hold_sum    REAL NOT NULL,
    hold_max    REAL NOT NULL,
    expired     INTEGER NOT NULL,
    evicted     INTEGER NOT NULL,
    released    INTEGER NOT NULL,
    cleared     INTEGER NOT NULL,
    PRIMARY KEY (pool_id, day, token_no)
) WITHOUT ROWID;

-- The same shape as PostgreSQL's tables, token ids as text: for people and reports.
CREATE VIEW IF NOT EXISTS lease_assignments AS
    SELECT t.id AS token_id, a.pool_id, a.lease_id, a.user_id, a.fence, a.assigned_us,
           a.expires_us
    FROM token_assignments a JOIN tokens t ON t.no = a.token_no;
CREATE VIEW IF NOT EXISTS usage_history AS
    SELECT h.pool_id, h.revision, h.lease_id, t.id AS token_id, h.fence, h.started_us,
           h.ended_us, h.expiration_reason, h.user_id
    FROM token_usage_history h JOIN tokens t ON t.no = h.token_no;

CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY);
INSERT OR IGNORE INTO schema_version VALUES (2);
