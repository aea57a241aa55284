-- A release asked with --force past migrations its artifact lacks (issue 12, item 10): the
-- files it went past, so that show and the release page say so, not only the audit log.
-- Written with the release; immutable, never deleted.

CREATE TABLE release_forced_migrations (
    release_id INTEGER PRIMARY KEY REFERENCES releases (id),
    migrations TEXT NOT NULL -- JSON array of file names under database/migrations/
) STRICT;
CREATE TRIGGER release_forced_migrations_are_immutable BEFORE UPDATE ON release_forced_migrations
BEGIN
    SELECT RAISE(ABORT, 'forced migrations of a release are immutable');
END;
CREATE TRIGGER release_forced_migrations_are_never_deleted BEFORE DELETE ON release_forced_migrations
BEGIN
    SELECT RAISE(ABORT, 'forced migrations of a release are never deleted');
END;
