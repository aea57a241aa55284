-- Nodes left out of one release (`--exclude-node`): a node that is down for good never
-- blocks a deploy or a rollback, and the record says which nodes did not take the release.

CREATE TABLE release_exclusions (
    release_id INTEGER NOT NULL REFERENCES releases (id),
    node       TEXT NOT NULL,
    PRIMARY KEY (release_id, node)
) STRICT;
CREATE TRIGGER release_exclusions_are_immutable BEFORE UPDATE ON release_exclusions
BEGIN
    SELECT RAISE(ABORT, 'release exclusions are immutable');
END;
CREATE TRIGGER release_exclusions_are_never_deleted BEFORE DELETE ON release_exclusions
BEGIN
    SELECT RAISE(ABORT, 'release exclusions are never deleted');
END;
