-- tokenpool's PostgreSQL schema. Applied by the program on every start (idempotent),
-- inside the schema named by the store URL's ?schema= (default: tokenpool).
-- The database enforces the pool's invariants itself: one active assignment per
-- token and per user of a pool, foreign keys to tokens, history kept forever.

CREATE TABLE IF NOT EXISTS pools (
    name            text PRIMARY KEY,
    ttl_seconds     double precision NOT NULL,
    owner_epoch     bigint NOT NULL DEFAULT 0,   -- bumped each time a process takes ownership
    owner           text,                        -- who took it last (host:pid)
    created_at      timestamptz NOT NULL DEFAULT now(),
    owned_at        timestamptz,
    written_at      timestamptz
);

CREATE TABLE IF NOT EXISTS users (
    id              text PRIMARY KEY CHECK (id <> '' AND octet_length(id) <= 128),
    name            text,
    email           text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tokens (
    id              uuid PRIMARY KEY,
    pool            text NOT NULL REFERENCES pools (name),
    available       boolean NOT NULL DEFAULT true,  -- kept in step with token_assignments
    created_at      timestamptz NOT NULL,
    retired_at      timestamptz                     -- set when the pool shrank; rows are never deleted
);
CREATE INDEX IF NOT EXISTS tokens_by_pool ON tokens (pool, created_at, id) WHERE retired_at IS NULL;

CREATE TABLE IF NOT EXISTS token_assignments (   -- the active leases
    id              uuid PRIMARY KEY,               -- the lease id
    token_id        uuid NOT NULL UNIQUE REFERENCES tokens (id),
    pool            text NOT NULL REFERENCES pools (name),
    user_id         text NOT NULL REFERENCES users (id),
    fence           bigint NOT NULL,
    assigned_at     timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL CHECK (expires_at > assigned_at),
    UNIQUE (pool, user_id)
);

DO $$ BEGIN
    CREATE TYPE expiration_reason AS ENUM ('expired', 'evicted', 'released', 'cleared');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS token_usage_history (
    id                  uuid PRIMARY KEY,           -- the lease id: retried batches never duplicate a row
    token_id            uuid NOT NULL REFERENCES tokens (id),
    pool                text NOT NULL,
    user_id             text NOT NULL,              -- no foreign key: history outlives its users
    started_at          timestamptz NOT NULL,
    ended_at            timestamptz NOT NULL CHECK (ended_at >= started_at),
    expiration_reason   expiration_reason NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_token ON token_usage_history (token_id, ended_at DESC, started_at DESC);
CREATE INDEX IF NOT EXISTS history_by_user ON token_usage_history (user_id, ended_at DESC);
