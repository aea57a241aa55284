-- Each artifact's per-file index (issue 15): path, mode, size, offset and SHA-256 of every
-- regular file, computed at ingest from the verified bytes and stored in the object store
-- under `indexes/sha256/<index_sha256>` (zstd-compressed JSON naming its artifact). Written
-- in the transaction that records the upload; an artifact uploaded before this migration
-- gets its row when its bytes are uploaded again. `files` counts the regular files listed,
-- `size` the stored bytes. One per artifact. Immutable, never deleted (a purge deletes the
-- object, as it deletes the artifact's bytes; the row stays, like the artifact's).

CREATE TABLE artifact_indexes (
    digest       TEXT PRIMARY KEY REFERENCES artifacts (digest),
    index_sha256 TEXT NOT NULL,
    files        INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    indexed_at   TEXT NOT NULL
) STRICT;
CREATE TRIGGER artifact_indexes_are_immutable BEFORE UPDATE ON artifact_indexes
BEGIN
    SELECT RAISE(ABORT, 'artifact indexes are immutable');
END;
CREATE TRIGGER artifact_indexes_are_never_deleted BEFORE DELETE ON artifact_indexes
BEGIN
    SELECT RAISE(ABORT, 'artifact indexes are never deleted');
END;
