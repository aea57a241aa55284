-- Taking artifacts out of use (SPEC 3): an admin may block an artifact (never deployable
-- again) or purge the bytes of one that was never live. Both are records; the artifact's
-- row stays. Append-only like the rest of history.

CREATE TABLE artifact_blocks (
    digest     TEXT PRIMARY KEY REFERENCES artifacts (digest),
    reason     TEXT NOT NULL CHECK (length(reason) > 0),
    blocked_by TEXT NOT NULL,
    owner      TEXT NOT NULL,
    blocked_at TEXT NOT NULL
) STRICT;
CREATE TRIGGER artifact_blocks_are_immutable BEFORE UPDATE ON artifact_blocks
BEGIN
    SELECT RAISE(ABORT, 'artifact blocks are immutable');
END;
CREATE TRIGGER artifact_blocks_are_never_deleted BEFORE DELETE ON artifact_blocks
BEGIN
    SELECT RAISE(ABORT, 'artifact blocks are never deleted');
END;

-- Each purge of an artifact's bytes. An artifact that was ever live can never be purged:
-- the trigger checks the releases themselves.
CREATE TABLE artifact_purges (
    id        INTEGER PRIMARY KEY,
    digest    TEXT NOT NULL REFERENCES artifacts (digest),
    purged_by TEXT NOT NULL,
    owner     TEXT NOT NULL,
    purged_at TEXT NOT NULL
) STRICT;
CREATE INDEX artifact_purges_by_digest ON artifact_purges (digest, id);
CREATE TRIGGER artifact_purges_only_never_live BEFORE INSERT ON artifact_purges
WHEN EXISTS (SELECT 1 FROM releases WHERE digest = NEW.digest AND state IN ('live', 'superseded'))
BEGIN
    SELECT RAISE(ABORT, 'an artifact that was ever live is kept for good');
END;
CREATE TRIGGER artifact_purges_are_immutable BEFORE UPDATE ON artifact_purges
BEGIN
    SELECT RAISE(ABORT, 'artifact purges are immutable');
END;
CREATE TRIGGER artifact_purges_are_never_deleted BEFORE DELETE ON artifact_purges
BEGIN
    SELECT RAISE(ABORT, 'artifact purges are never deleted');
END;
