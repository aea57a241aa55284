-- The web pages (SPEC 6): sessions of people who signed in with a token, and indexes for the
-- audit log's filters, so that a filtered page reads only the rows it shows (the log grows
-- to millions of events).

-- A session is a random 256-bit id in an HttpOnly cookie; only its SHA-256 is stored. It
-- lives until `expires_at` or until signed out (`ended_at`), and never longer than the token
-- it was opened with (checked at each request: a revoked or expired token ends it).
CREATE TABLE web_sessions (
    id_sha256  BLOB PRIMARY KEY CHECK (length(id_sha256) = 32),
    token_id   TEXT NOT NULL REFERENCES tokens (id),
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    ended_at   TEXT
) STRICT;
CREATE INDEX web_sessions_by_expiry ON web_sessions (expires_at);

CREATE INDEX audit_events_by_actor ON audit_events (actor, seq);
CREATE INDEX audit_events_by_action ON audit_events (action, seq);
CREATE INDEX audit_events_by_service ON audit_events (json_extract(details, '$.service'), seq);
