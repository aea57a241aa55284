-- What each release ran with (SPEC 7). Its hooks run as shell on production, so the record
-- keeps the digest of the service's configuration as the deploy started, and whether its
-- health check proves the digest (`{digest}` in the URL or the expected text; a release that
-- went live without such proof is *unverified*, and status says so); and, per node, the
-- SHA-256 of each shared file as it was at the switch (never the contents: `.env` holds
-- secrets). Both are history: written once, never changed.

CREATE TABLE release_configs (
    release_id    INTEGER PRIMARY KEY REFERENCES releases (id),
    config_digest TEXT NOT NULL CHECK (length(config_digest) = 71 AND config_digest GLOB 'sha256:[0-9a-f]*'),
    verifies      INTEGER NOT NULL CHECK (verifies IN (0, 1)),  -- the health check proves the digest
    recorded_at   TEXT NOT NULL
) STRICT;
CREATE TRIGGER release_configs_are_immutable BEFORE UPDATE ON release_configs
BEGIN
    SELECT RAISE(ABORT, 'release configurations are immutable');
END;
CREATE TRIGGER release_configs_are_never_deleted BEFORE DELETE ON release_configs
BEGIN
    SELECT RAISE(ABORT, 'release configurations are never deleted');
END;

-- One row per (release, node, shared path), from the node's switch to that release.
-- `sha256` is NULL for a directory (storage/, uploads: data, not configuration) and for a
-- path that was missing or could not be read.
CREATE TABLE release_shared_files (
    release_id  INTEGER NOT NULL REFERENCES releases (id),
    node        TEXT NOT NULL,
    path        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('file', 'directory', 'missing', 'unreadable')),
    sha256      TEXT CHECK (sha256 IS NULL OR (length(sha256) = 71 AND sha256 GLOB 'sha256:[0-9a-f]*')),
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (release_id, node, path),
    CHECK ((kind = 'file') = (sha256 IS NOT NULL))
) STRICT;
CREATE TRIGGER release_shared_files_are_immutable BEFORE UPDATE ON release_shared_files
BEGIN
    SELECT RAISE(ABORT, 'release shared files are immutable');
END;
CREATE TRIGGER release_shared_files_are_never_deleted BEFORE DELETE ON release_shared_files
BEGIN
    SELECT RAISE(ABORT, 'release shared files are never deleted');
END;
