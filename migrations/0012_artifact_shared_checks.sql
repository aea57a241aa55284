-- Which shared paths an artifact was checked against and found clean of (issue 11, item 4).
-- An artifact uploaded before its service was configured (or before a shared path was
-- added) was never checked against the service's shared paths: a release of it was caught
-- only on the nodes, at prepare (exit 7). A release now needs a check that covers the
-- service's shared paths: the upload's (recorded here), or one made at request time by
-- reading the artifact from the store (recorded here too, so it is read once).
-- `shared` is a JSON array of the paths, sorted. Immutable, never deleted.

CREATE TABLE artifact_shared_checks (
    id         INTEGER PRIMARY KEY,
    digest     TEXT NOT NULL REFERENCES artifacts (digest),
    shared     TEXT NOT NULL,
    checked_at TEXT NOT NULL,
    UNIQUE (digest, shared)
) STRICT;
CREATE TRIGGER artifact_shared_checks_are_immutable BEFORE UPDATE ON artifact_shared_checks
BEGIN
    SELECT RAISE(ABORT, 'artifact shared-path checks are immutable');
END;
CREATE TRIGGER artifact_shared_checks_are_never_deleted BEFORE DELETE ON artifact_shared_checks
BEGIN
    SELECT RAISE(ABORT, 'artifact shared-path checks are never deleted');
END;
