-- tokenpool's cluster tables (PostgreSQL), beside the pools' tables in the store URL's
-- schema. Applied by every node on start (idempotent). Every time in them is the
-- database's clock (now()): no node's clock decides when a lease ended.
--
-- A node's lease covers every slot it owns (as a Chubby session covers its locks):
-- renewing is one row, whatever the number of slots. A slot is taken over only in a
-- transaction that holds its owner's row locked and sees that owner's lease expired.

CREATE TABLE IF NOT EXISTS cluster_nodes (
    id              text PRIMARY KEY CHECK (id <> '' AND octet_length(id) <= 64),
    address         text NOT NULL,                  -- host:port clients are sent to (MOVED)
    state           text NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'draining', 'left')),
    incarnation     bigint NOT NULL DEFAULT 1,      -- bumped each time the node (re)joins
    joined_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),  -- its last renewal
    expires_at      timestamptz NOT NULL            -- its lease: heartbeat_at + validity
);

CREATE TABLE IF NOT EXISTS cluster_slots (
    slot            integer PRIMARY KEY CHECK (slot >= 0 AND slot < 16384),
    owner           text REFERENCES cluster_nodes (id),  -- NULL: nobody owns it
    epoch           bigint NOT NULL DEFAULT 0,      -- bumped on every takeover
    taken_at        timestamptz
);
CREATE INDEX IF NOT EXISTS cluster_slots_by_owner ON cluster_slots (owner, slot);

-- Bumped by every change of ownership or membership: a node rereads the slot map
-- only when it moved.
CREATE TABLE IF NOT EXISTS cluster_version (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    version         bigint NOT NULL DEFAULT 0
);
INSERT INTO cluster_version VALUES (true, 0) ON CONFLICT DO NOTHING;

-- The secret the nodes authenticate to each other with (AUTH tokenpool-node <secret>,
-- to send VIA: an HTTP request for a pool another node serves), made once by the first
-- node to join. Whoever can read these tables can already run a node.
CREATE TABLE IF NOT EXISTS cluster_secret (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    secret          text NOT NULL CHECK (length(secret) >= 32)
);

INSERT INTO cluster_slots (slot)
    SELECT generate_series(0, 16383) WHERE NOT EXISTS (SELECT 1 FROM cluster_slots);
