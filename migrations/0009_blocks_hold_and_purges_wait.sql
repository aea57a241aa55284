-- A blocked artifact never goes live, and a purge never takes bytes a release or an adoption
-- still needs (issue 10, items 3 and 8). Until now both were checked only by the code, and
-- only at some moments: a release pending when its artifact was blocked could still be
-- approved and go live; a purge decided on a list read earlier could take the bytes of a
-- release requested since, or the adopted legacy tree (the only way back to before the
-- first deploy). Here the database holds both.

-- Bytes purged and uploaded again: each purge is undone at most once, by the upload that
-- brought its bytes back. An artifact's bytes are purged now when it has a purge without
-- a restore.
CREATE TABLE artifact_restores (
    purge_id    INTEGER PRIMARY KEY REFERENCES artifact_purges (id),
    restored_by TEXT NOT NULL,
    restored_at TEXT NOT NULL
) STRICT;
CREATE TRIGGER artifact_restores_are_immutable BEFORE UPDATE ON artifact_restores
BEGIN
    SELECT RAISE(ABORT, 'artifact restores are immutable');
END;
CREATE TRIGGER artifact_restores_are_never_deleted BEFORE DELETE ON artifact_restores
BEGIN
    SELECT RAISE(ABORT, 'artifact restores are never deleted');
END;

-- A release of a blocked artifact is never recorded, whatever its first state: a pending
-- one would outlive the cancellation the block made.
CREATE TRIGGER releases_of_blocked_artifacts_are_refused BEFORE INSERT ON releases
WHEN EXISTS (SELECT 1 FROM artifact_blocks WHERE digest = NEW.digest)
BEGIN
    SELECT RAISE(ABORT, 'the artifact is blocked: it never goes live');
END;
-- Nor one of an artifact whose bytes are purged (until they are uploaded again).
CREATE TRIGGER releases_of_purged_artifacts_are_refused BEFORE INSERT ON releases
WHEN EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = NEW.digest
             AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))
BEGIN
    SELECT RAISE(ABORT, 'the bytes of the artifact were purged');
END;
-- A release of a blocked artifact is never approved and never starts. One already deploying
-- when the block came may still end `live` (its nodes switched before the block: the block
-- does not undo that; a rollback does) or `failed`.
CREATE TRIGGER blocked_artifacts_never_start BEFORE UPDATE OF state ON releases
WHEN NEW.state IN ('approved', 'deploying') AND NEW.state IS NOT OLD.state
 AND EXISTS (SELECT 1 FROM artifact_blocks WHERE digest = NEW.digest)
BEGIN
    SELECT RAISE(ABORT, 'the artifact is blocked: a release of it is never approved nor started');
END;

-- The state machine of 0002, with one more way: `approved → cancelled`, only for a blocked
-- artifact (the block cancels what was approved and has not started).
DROP TRIGGER releases_state_machine;
CREATE TRIGGER releases_state_machine BEFORE UPDATE ON releases
WHEN NEW.id IS NOT OLD.id OR NEW.service IS NOT OLD.service OR NEW.environment IS NOT OLD.environment
  OR NEW.digest IS NOT OLD.digest OR NEW.kind IS NOT OLD.kind OR NEW.requested_by IS NOT OLD.requested_by
  OR NEW.requester_owner IS NOT OLD.requester_owner OR NEW.requested_at IS NOT OLD.requested_at
  OR NEW.source_environment IS NOT OLD.source_environment OR NEW.replaces IS NOT OLD.replaces
  OR NEW.expires_at IS NOT OLD.expires_at
  OR NOT (
       (OLD.state = 'pending_approval' AND NEW.state IN ('approved', 'rejected', 'cancelled', 'expired'))
    OR (OLD.state = 'approved' AND NEW.state IN ('deploying', 'failed'))
    OR (OLD.state = 'approved' AND NEW.state = 'cancelled'
        AND EXISTS (SELECT 1 FROM artifact_blocks WHERE digest = OLD.digest))
    OR (OLD.state = 'deploying' AND NEW.state IN ('live', 'failed'))
    OR (OLD.state = 'live' AND NEW.state = 'superseded')
  )
BEGIN
    SELECT RAISE(ABORT, 'a release changes only its state, and only along the state machine');
END;

-- A purge never takes bytes that a release waiting, approved or deploying names (0003 kept
-- only ever-live ones), nor an adopted legacy tree's, nor bytes already purged.
CREATE TRIGGER artifact_purges_only_unused BEFORE INSERT ON artifact_purges
WHEN EXISTS (SELECT 1 FROM releases WHERE digest = NEW.digest
             AND state IN ('pending_approval', 'approved', 'deploying'))
BEGIN
    SELECT RAISE(ABORT, 'a release waiting for, or on its way to, an artifact keeps its bytes');
END;
CREATE TRIGGER artifact_purges_never_adopted BEFORE INSERT ON artifact_purges
WHEN EXISTS (SELECT 1 FROM release_adoptions WHERE digest = NEW.digest)
BEGIN
    SELECT RAISE(ABORT, 'an adopted legacy tree is the way back to before the first deploy: kept for good');
END;
CREATE TRIGGER artifact_purges_once_until_restored BEFORE INSERT ON artifact_purges
WHEN EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = NEW.digest
             AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))
BEGIN
    SELECT RAISE(ABORT, 'the bytes of the artifact are purged already');
END;
-- And an adoption never records bytes that are purged (it stored them just before; a purge
-- in between fails the adopting deploy before anything switches).
CREATE TRIGGER release_adoptions_never_purged BEFORE UPDATE ON release_adoptions
WHEN NEW.digest IS NOT NULL
 AND EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = NEW.digest
             AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))
BEGIN
    SELECT RAISE(ABORT, 'the bytes of the adopted tree were purged');
END;
