-- `--adopt` (SPEC 7): a release asked to adopt the application it finds at `current` on its
-- nodes (a plain directory, deployed another way). The row is written with the request; the
-- legacy tree's digest and the nodes that held it once the deploy has captured it. The tree
-- is packaged on the node (shared paths left out) and kept as an artifact of the service, so
-- that even the first deploy can be rolled back, to exactly that tree.

CREATE TABLE release_adoptions (
    release_id INTEGER PRIMARY KEY REFERENCES releases (id),
    digest     TEXT REFERENCES artifacts (digest),   -- NULL until captured
    nodes      TEXT,                                 -- JSON array of node names
    adopted_at TEXT,
    CHECK ((digest IS NULL) = (nodes IS NULL) AND (digest IS NULL) = (adopted_at IS NULL))
) STRICT;
CREATE INDEX release_adoptions_by_digest ON release_adoptions (digest) WHERE digest IS NOT NULL;
-- Captured once, then history.
CREATE TRIGGER release_adoptions_are_recorded_once BEFORE UPDATE ON release_adoptions
WHEN OLD.digest IS NOT NULL OR NEW.release_id IS NOT OLD.release_id
BEGIN
    SELECT RAISE(ABORT, 'an adoption is recorded once');
END;
CREATE TRIGGER release_adoptions_are_never_deleted BEFORE DELETE ON release_adoptions
BEGIN
    SELECT RAISE(ABORT, 'release adoptions are never deleted');
END;
