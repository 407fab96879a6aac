-- Samverkan relay on PostgreSQL, schema 1: everything the embedded SQLite
-- relay keeps (store/src/lib.rs), plus what several instances share.
-- Applied once, in one transaction, by `PostgresStorage::open` (see
-- relay/src/storage/postgres.rs); never edit a migration that has shipped:
-- add the next file instead.

-- Each document: a compacted snapshot (a full Automerge save) plus the
-- increments in `changes`, each blob with its SHA-256; heads and parties for
-- summaries and access control without loading it; its size for the limits.
CREATE TABLE documents (
    doc_id          TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    title           TEXT NOT NULL,
    heads           TEXT[] NOT NULL,
    parties         TEXT[] NOT NULL,
    snapshot        BYTEA NOT NULL,
    snapshot_sha256 BYTEA NOT NULL,
    generation      BIGINT NOT NULL DEFAULT 0,
    change_bytes    BIGINT NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE changes (
    seq    BIGSERIAL PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents (doc_id),
    data   BYTEA NOT NULL,
    sha256 BYTEA NOT NULL
);
CREATE INDEX changes_by_doc ON changes (doc_id, seq);

-- The authors' signatures of changes.
CREATE TABLE change_signatures (
    hash      BYTEA PRIMARY KEY,
    signature BYTEA NOT NULL
);

-- The relay's receipts of approval records (the first of each kept).
CREATE TABLE approval_receipts (
    doc_id          TEXT NOT NULL,
    record          TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    relay_signature TEXT NOT NULL,
    PRIMARY KEY (doc_id, record)
);

-- The sync state the relay shares with each node, per document.
CREATE TABLE sync_states (
    peer   TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    state  BYTEA NOT NULL,
    PRIMARY KEY (peer, doc_id)
);

-- Small values: the enrollment directory with its pending join codes.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Monitoring: each node's last-seen record.
CREATE TABLE node_records (
    peer   TEXT PRIMARY KEY,
    record TEXT NOT NULL
);

-- Counters other instances poll cheaply: 'meta' grows with every metadata commit.
CREATE TABLE relay_counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO relay_counters (name, value) VALUES ('meta', 0);

-- The relay instances serving from this database, with a heartbeat, and the
-- node connections each holds (for the per-key connection limit across instances).
CREATE TABLE relay_instances (
    instance     TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE relay_connections (
    instance  TEXT NOT NULL,
    conn      BIGINT NOT NULL,
    peer      TEXT NOT NULL,
    opened_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (instance, conn)
);
CREATE INDEX relay_connections_by_peer ON relay_connections (peer, opened_at);
