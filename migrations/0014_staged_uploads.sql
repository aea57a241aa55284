-- Uploads under way: one row from the moment an upload's staging key is begun until the
-- upload ends (recorded, refused or aborted). `digest` is set just before its verified bytes
-- are published under `artifacts/sha256/<hex>`. A row found at start belongs to a server that
-- died mid-upload: the start removes its staging key (and, on S3, its multipart upload) and,
-- unless the registry names those bytes, what it published; then the row (issue 11).
-- Not history: rows are deleted.
CREATE TABLE staged_uploads (
    id         TEXT PRIMARY KEY,     -- the staging key's uuid: uploads/<id>
    started_at TEXT NOT NULL,
    digest     TEXT                  -- the artifact key being published, once verified
) STRICT;
