-- The token pool as the seed design has it: PostgreSQL only, one transaction per
-- activation. Tokens are taken with SELECT ... FOR UPDATE SKIP LOCKED, one active
-- lease per user is a unique constraint, an eviction writes its history row.
-- Applied into a schema of its own (the search_path is set by the caller).
CREATE TABLE tokens (
    id        uuid PRIMARY KEY,
    available boolean NOT NULL DEFAULT true,
    freed     bigint NOT NULL          -- FIFO order of availability
);
CREATE INDEX tokens_free ON tokens (freed) WHERE available;
CREATE SEQUENCE freed_seq;

CREATE TABLE leases (
    token_id     uuid PRIMARY KEY REFERENCES tokens,
    user_id      text NOT NULL UNIQUE,
    id           uuid NOT NULL,
    activated_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX leases_oldest ON leases (activated_at);

CREATE TABLE history (
    id         uuid PRIMARY KEY,
    token_id   uuid NOT NULL,
    user_id    text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz NOT NULL,
    reason     text NOT NULL
);
CREATE INDEX history_token ON history (token_id, ended_at DESC);

-- The user's lease: the one held, else the longest-free token, else the oldest
-- lease's token (that lease ends 'evicted'). Concurrent activations of one user
-- are serialised by a transaction-scoped advisory lock on the user.
CREATE FUNCTION activate(p_user text, p_ttl interval) RETURNS SETOF leases
LANGUAGE plpgsql AS $$
DECLARE
    l leases;
    t uuid;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(p_user));
    RETURN QUERY SELECT * FROM leases WHERE user_id = p_user;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Every free token or every old lease may be locked by concurrent activations for a
    -- moment: look again (each statement takes a new snapshot) before giving up.
    FOR attempt IN 1..100 LOOP
        SELECT id INTO t FROM tokens WHERE available ORDER BY freed LIMIT 1
            FOR UPDATE SKIP LOCKED;
        IF t IS NOT NULL THEN
            UPDATE tokens SET available = false WHERE id = t;
            EXIT;
        END IF;
        DELETE FROM leases WHERE token_id = (
            SELECT token_id FROM leases ORDER BY activated_at LIMIT 1 FOR UPDATE SKIP LOCKED
        ) RETURNING * INTO l;
        IF l.token_id IS NOT NULL THEN
            INSERT INTO history
                VALUES (l.id, l.token_id, l.user_id, l.activated_at, now(), 'evicted');
            t := l.token_id;
            EXIT;
        END IF;
    END LOOP;
    IF t IS NULL THEN
        RAISE EXCEPTION 'the pool has no tokens';
    END IF;
    RETURN QUERY INSERT INTO leases
        VALUES (t, p_user, gen_random_uuid(), now(), now() + p_ttl) RETURNING *;
END $$;
