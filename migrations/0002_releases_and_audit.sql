-- Releases, approvals, per-node deployments, deploy leases and the audit log.
--
-- History is append-only here too: releases may change only their `state` (and its time),
-- and only along SPEC 3's state machine; every change of state is also a row of
-- `release_transitions`. Approvals, transitions and audit events are never updated or
-- deleted. Triggers enforce it, so not even a bug in our own code can rewrite history.

-- What the configuration declared, as the registry saw it (configuration is the source).
-- A service or environment no longer in the configuration stays, marked inactive (history
-- refers to it).
CREATE TABLE services (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('laravel', 'node', 'generic')),
    active      INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    recorded_at TEXT NOT NULL
) STRICT;

CREATE TABLE environments (
    name              TEXT PRIMARY KEY,
    position          INTEGER NOT NULL,      -- lifecycle order
    promote_from      TEXT,
    requires_approval INTEGER NOT NULL CHECK (requires_approval IN (0, 1)),
    active            INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    recorded_at       TEXT NOT NULL
) STRICT;

-- One request "artifact D goes live for service S in environment E".
CREATE TABLE releases (
    id                 INTEGER PRIMARY KEY,
    service            TEXT NOT NULL,
    environment        TEXT NOT NULL,
    digest             TEXT NOT NULL REFERENCES artifacts (digest),
    kind               TEXT NOT NULL CHECK (kind IN ('deploy', 'promote', 'rollback')),
    state              TEXT NOT NULL CHECK (state IN ('pending_approval', 'approved', 'deploying', 'live',
                                                      'rejected', 'failed', 'cancelled', 'expired', 'superseded')),
    requested_by       TEXT NOT NULL,        -- token name
    requester_owner    TEXT NOT NULL,
    requested_at       TEXT NOT NULL,
    source_environment TEXT,                 -- promote: where it was live
    replaces           INTEGER REFERENCES releases (id),  -- the release live when this one was asked for
    expires_at         TEXT,                 -- pending_approval only: when it expires
    state_changed_at   TEXT NOT NULL
) STRICT;

-- History by service and environment, by service, by environment (newest first); rollback
-- targets and "was it live there" by digest; what waits for approval, per cell and by expiry.
CREATE INDEX releases_by_service_environment ON releases (service, environment, id DESC);
CREATE INDEX releases_by_service ON releases (service, id DESC);
CREATE INDEX releases_by_environment ON releases (environment, id DESC);
CREATE INDEX releases_by_digest ON releases (digest, environment);
CREATE INDEX releases_pending ON releases (service, environment, expires_at) WHERE state = 'pending_approval';
-- At most one release in flight and at most one live per (service, environment): the
-- database itself refuses a second.
CREATE UNIQUE INDEX one_in_flight ON releases (service, environment) WHERE state IN ('approved', 'deploying');
CREATE UNIQUE INDEX one_live ON releases (service, environment) WHERE state = 'live';

CREATE TRIGGER releases_state_machine BEFORE UPDATE ON releases
WHEN NEW.id IS NOT OLD.id OR NEW.service IS NOT OLD.service OR NEW.environment IS NOT OLD.environment
  OR NEW.digest IS NOT OLD.digest OR NEW.kind IS NOT OLD.kind OR NEW.requested_by IS NOT OLD.requested_by
  OR NEW.requester_owner IS NOT OLD.requester_owner OR NEW.requested_at IS NOT OLD.requested_at
  OR NEW.source_environment IS NOT OLD.source_environment OR NEW.replaces IS NOT OLD.replaces
  OR NEW.expires_at IS NOT OLD.expires_at
  OR NOT (
       (OLD.state = 'pending_approval' AND NEW.state IN ('approved', 'rejected', 'cancelled', 'expired'))
    OR (OLD.state = 'approved' AND NEW.state IN ('deploying', 'failed'))
    OR (OLD.state = 'deploying' AND NEW.state IN ('live', 'failed'))
    OR (OLD.state = 'live' AND NEW.state = 'superseded')
  )
BEGIN
    SELECT RAISE(ABORT, 'a release changes only its state, and only along the state machine');
END;
CREATE TRIGGER releases_are_never_deleted BEFORE DELETE ON releases
BEGIN
    SELECT RAISE(ABORT, 'releases are never deleted');
END;

-- Every change of a release's state: who, when, why.
CREATE TABLE release_transitions (
    id         INTEGER PRIMARY KEY,
    release_id INTEGER NOT NULL REFERENCES releases (id),
    state      TEXT NOT NULL,
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,                -- token name, or "release" for the server itself
    reason     TEXT
) STRICT;
CREATE INDEX release_transitions_by_release ON release_transitions (release_id, id);
CREATE TRIGGER release_transitions_are_immutable BEFORE UPDATE ON release_transitions
BEGIN
    SELECT RAISE(ABORT, 'release transitions are immutable');
END;
CREATE TRIGGER release_transitions_are_never_deleted BEFORE DELETE ON release_transitions
BEGIN
    SELECT RAISE(ABORT, 'release transitions are never deleted');
END;

-- The four-eyes decision on a release that required approval; binds the exact digest.
CREATE TABLE approvals (
    release_id    INTEGER PRIMARY KEY REFERENCES releases (id),
    digest        TEXT NOT NULL,
    decision      TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
    decided_by    TEXT NOT NULL,
    decider_owner TEXT NOT NULL,
    decided_at    TEXT NOT NULL,
    reason        TEXT
) STRICT;
CREATE TRIGGER approvals_bind_the_digest BEFORE INSERT ON approvals
WHEN NEW.digest IS NOT (SELECT digest FROM releases WHERE id = NEW.release_id)
BEGIN
    SELECT RAISE(ABORT, 'an approval binds the digest of its release');
END;
CREATE TRIGGER approvals_need_four_eyes BEFORE INSERT ON approvals
WHEN NEW.decision = 'approved'
 AND NEW.decider_owner = (SELECT requester_owner FROM releases WHERE id = NEW.release_id)
BEGIN
    SELECT RAISE(ABORT, 'four eyes: the owner who requested a release may not approve it');
END;
CREATE TRIGGER approvals_are_immutable BEFORE UPDATE ON approvals
BEGIN
    SELECT RAISE(ABORT, 'approvals are immutable');
END;
CREATE TRIGGER approvals_are_never_deleted BEFORE DELETE ON approvals
BEGIN
    SELECT RAISE(ABORT, 'approvals are never deleted');
END;

-- One node's part of one release, phase by phase (filled by the node deployer).
CREATE TABLE deployments (
    id          INTEGER PRIMARY KEY,
    release_id  INTEGER NOT NULL REFERENCES releases (id),
    node        TEXT NOT NULL,
    phase       TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('ok', 'failed', 'skipped')),
    output_tail TEXT
) STRICT;
CREATE INDEX deployments_by_release ON deployments (release_id, id);
CREATE TRIGGER deployments_are_immutable BEFORE UPDATE ON deployments
BEGIN
    SELECT RAISE(ABORT, 'deployments are immutable');
END;
CREATE TRIGGER deployments_are_never_deleted BEFORE DELETE ON deployments
BEGIN
    SELECT RAISE(ABORT, 'deployments are never deleted');
END;

-- The in-flight marker of a running deploy: a lease, renewed while the deploy runs. A server
-- that finds an expired lease finishes or puts back the release; nobody deletes a lock file.
CREATE TABLE deploy_leases (
    service     TEXT NOT NULL,
    environment TEXT NOT NULL,
    release_id  INTEGER NOT NULL REFERENCES releases (id),
    owner       TEXT NOT NULL,               -- the server instance holding it
    expires_at  TEXT NOT NULL,
    PRIMARY KEY (service, environment)
) STRICT;

-- The audit log: every state change and every refused request, as a hash chain. `hash` is
-- SHA-256(prev_hash || JSON [seq, at, actor, owner, action, subject, details]); event 1's
-- prev_hash is 32 zero bytes. `release audit verify` recomputes it end to end.
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY,
    at        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    owner     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,                 -- JSON object
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE INDEX audit_events_by_time ON audit_events (at);
CREATE TRIGGER audit_events_are_immutable BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are immutable');
END;
CREATE TRIGGER audit_events_are_never_deleted BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are never deleted');
END;
