-- Outgoing webhooks: an outbox read from the audit log. Every change of a release's state is
-- already an audit event, appended in the transaction that makes the change; a worker per
-- webhook reads the `release.*` events after its cursor and POSTs them, in order. Nothing on
-- a deploy's path writes here or waits for a receiver.

-- How far each webhook (by its configured name) has got: every audit event up to `after_seq`
-- is done for it (accepted, given up, or not one it wants). Created at the head of the log
-- when a webhook is first configured, so it starts with what happens from then on; kept
-- when the webhook leaves the configuration, so the same name added back catches up.
CREATE TABLE webhook_cursors (
    webhook    TEXT PRIMARY KEY,
    after_seq  INTEGER NOT NULL CHECK (after_seq >= 0),
    updated_at TEXT NOT NULL
) STRICT;
CREATE TRIGGER webhook_cursors_move_forward BEFORE UPDATE ON webhook_cursors
WHEN NEW.webhook IS NOT OLD.webhook OR NEW.after_seq < OLD.after_seq
BEGIN
    SELECT RAISE(ABORT, 'a webhook cursor only moves forward');
END;
CREATE TRIGGER webhook_cursors_are_never_deleted BEFORE DELETE ON webhook_cursors
BEGIN
    SELECT RAISE(ABORT, 'webhook cursors are never deleted');
END;

-- Every attempt to deliver one event to one webhook. `delivery` is the X-Release-Delivery
-- header, the same for every attempt of that (webhook, event), so a receiver can deduplicate.
-- `outcome`: `accepted` (a 2xx answer), `retrying` (another attempt follows at
-- `next_attempt_at`) or `gave_up` (the last attempt failed). The attempt that ends a delivery
-- (accepted or gave_up) moves the webhook's cursor in the same transaction. History:
-- append-only.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY,
    webhook         TEXT NOT NULL,
    event_seq       INTEGER NOT NULL REFERENCES audit_events (seq),
    release_id      INTEGER NOT NULL REFERENCES releases (id),
    event           TEXT NOT NULL,                 -- e.g. release.live
    delivery        TEXT NOT NULL,
    attempt         INTEGER NOT NULL CHECK (attempt >= 1),
    at              TEXT NOT NULL,                 -- when the attempt began
    duration_ms     INTEGER NOT NULL CHECK (duration_ms >= 0),
    status_code     INTEGER,                       -- NULL: no answer (refused, timed out…)
    error           TEXT,                          -- why it was not accepted
    outcome         TEXT NOT NULL CHECK (outcome IN ('accepted', 'retrying', 'gave_up')),
    next_attempt_at TEXT,
    CHECK ((outcome = 'retrying') = (next_attempt_at IS NOT NULL)),
    CHECK ((outcome = 'accepted') = (error IS NULL)),
    UNIQUE (webhook, event_seq, attempt)
) STRICT;
CREATE INDEX webhook_deliveries_by_release ON webhook_deliveries (release_id, event_seq);
CREATE TRIGGER webhook_deliveries_are_immutable BEFORE UPDATE ON webhook_deliveries
BEGIN
    SELECT RAISE(ABORT, 'webhook deliveries are immutable');
END;
CREATE TRIGGER webhook_deliveries_are_never_deleted BEFORE DELETE ON webhook_deliveries
BEGIN
    SELECT RAISE(ABORT, 'webhook deliveries are never deleted');
END;
