-- Artifacts and tokens: the first tables of the registry.
--
-- Immutability is enforced here, by triggers, not only by the code above: rows of
-- `artifacts` and `artifact_uploads` can never be updated or deleted, and a token row
-- can only be revoked (once). Even a bug in our own code cannot rewrite history.

-- The bytes: one row per digest, written after the bytes are verified and published
-- under `artifacts/sha256/<hex>` in the object store. This row is the commit point of
-- an upload.
CREATE TABLE artifacts (
    digest        TEXT PRIMARY KEY
                  CHECK (length(digest) = 71 AND digest GLOB 'sha256:[0-9a-f]*'),
    size          INTEGER NOT NULL CHECK (size >= 0),   -- bytes as stored (tar+zstd)
    unpacked_size INTEGER NOT NULL CHECK (unpacked_size >= 0), -- bytes of the tar stream
    file_count    INTEGER NOT NULL CHECK (file_count >= 0),    -- entries of any type
    migrations    TEXT NOT NULL,       -- JSON array: file names under database/migrations/
    stored_at     TEXT NOT NULL        -- RFC 3339, UTC
) STRICT;

-- Who uploaded a digest for which service, with the labels CI gave. The same bytes may
-- serve several services; a repeated upload for the same service changes nothing.
CREATE TABLE artifact_uploads (
    id             INTEGER PRIMARY KEY,
    service        TEXT NOT NULL CHECK (service GLOB '[a-z0-9]*' AND service NOT GLOB '*[^a-z0-9-]*'),
    digest         TEXT NOT NULL REFERENCES artifacts (digest),
    version        TEXT,
    git_sha        TEXT,
    build_url      TEXT,
    uploaded_by    TEXT NOT NULL,      -- token name
    uploader_owner TEXT NOT NULL,      -- the token's owner
    uploaded_at    TEXT NOT NULL,
    UNIQUE (service, digest)
) STRICT;

CREATE INDEX artifact_uploads_by_service ON artifact_uploads (service, id DESC);
CREATE INDEX artifact_uploads_by_digest ON artifact_uploads (digest);

CREATE TRIGGER artifacts_are_immutable BEFORE UPDATE ON artifacts
BEGIN
    SELECT RAISE(ABORT, 'artifacts are immutable');
END;
CREATE TRIGGER artifacts_are_never_deleted BEFORE DELETE ON artifacts
BEGIN
    SELECT RAISE(ABORT, 'artifacts are never deleted');
END;
CREATE TRIGGER artifact_uploads_are_immutable BEFORE UPDATE ON artifact_uploads
BEGIN
    SELECT RAISE(ABORT, 'artifact uploads are immutable');
END;
CREATE TRIGGER artifact_uploads_are_never_deleted BEFORE DELETE ON artifact_uploads
BEGIN
    SELECT RAISE(ABORT, 'artifact uploads are never deleted');
END;

-- API tokens. The secret is stored only as its SHA-256; `id` is the public part of the
-- token string (`rls_<id>_<secret>`), used to find the row before a constant-time
-- comparison of the hashes. Names are never reused: no row is ever deleted.
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    owner         TEXT NOT NULL,
    roles         TEXT NOT NULL,       -- comma-separated: ci,deployer,approver,auditor,admin
    services      TEXT,                -- comma-separated; NULL = every service
    environments  TEXT,                -- comma-separated; NULL = every environment
    secret_sha256 BLOB NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    TEXT NOT NULL,
    expires_at    TEXT,
    revoked_at    TEXT
) STRICT;

CREATE TRIGGER tokens_only_revoke_once BEFORE UPDATE ON tokens
WHEN OLD.revoked_at IS NOT NULL
  OR NEW.revoked_at IS NULL
  OR NEW.id IS NOT OLD.id OR NEW.name IS NOT OLD.name OR NEW.owner IS NOT OLD.owner
  OR NEW.roles IS NOT OLD.roles OR NEW.services IS NOT OLD.services
  OR NEW.environments IS NOT OLD.environments OR NEW.secret_sha256 IS NOT OLD.secret_sha256
  OR NEW.created_at IS NOT OLD.created_at OR NEW.expires_at IS NOT OLD.expires_at
BEGIN
    SELECT RAISE(ABORT, 'a token can only be revoked, once');
END;
CREATE TRIGGER tokens_are_never_deleted BEFORE DELETE ON tokens
BEGIN
    SELECT RAISE(ABORT, 'tokens are never deleted (names are never reused)');
END;
