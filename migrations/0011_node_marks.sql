-- Nodes a deploy could not put back (issue 11, item 4). A failed deploy that leaves a node on
-- the wrong release, or could not reach it while resolving an interrupted deploy, marks the
-- node `stranded`; a later deploy that goes live on it, or a `status --nodes` that finds it
-- serving the live release again, marks it `repaired`. A node is stranded while its newest
-- mark says so. Marks are history: never changed, never deleted.

CREATE TABLE node_marks (
    id          INTEGER PRIMARY KEY,
    service     TEXT NOT NULL,
    environment TEXT NOT NULL,
    node        TEXT NOT NULL,
    mark        TEXT NOT NULL CHECK (mark IN ('stranded', 'repaired')),
    -- The release that failed (stranded) or went live on it (repaired); NULL for a repair
    -- that `status --nodes` found.
    release_id  INTEGER REFERENCES releases (id),
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
) STRICT;
CREATE INDEX node_marks_by_node ON node_marks (service, environment, node, id);
CREATE INDEX node_marks_by_release ON node_marks (release_id) WHERE release_id IS NOT NULL;
CREATE TRIGGER node_marks_are_immutable BEFORE UPDATE ON node_marks
BEGIN
    SELECT RAISE(ABORT, 'node marks are immutable');
END;
CREATE TRIGGER node_marks_are_never_deleted BEFORE DELETE ON node_marks
BEGIN
    SELECT RAISE(ABORT, 'node marks are never deleted');
END;
