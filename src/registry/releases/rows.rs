//! Rows of releases in and out of SQL, and the statements several changes share (a state
//! change with its transition, going live, cancelling what waits for a blocked artifact).

use super::*;

/// Cancels every release of a blocked artifact that waits for approval or is approved and
/// not started, each with its transition (by `by`: the token that blocked it, or the server)
/// and its `release.cancel` event.
pub(in crate::registry) fn cancel_blocked(
    tx: &Transaction<'_>,
    digest: Digest,
    block: &crate::registry::Block,
    (actor, owner): (&str, &str),
) -> Result<Vec<Release>, RegistryError> {
    let ids: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM releases WHERE digest = ?1 AND state IN ('pending_approval', 'approved') ORDER BY id",
        )?;
        stmt.query_map([digest.to_string()], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let why = format!("artifact {digest} was blocked by {}: {}", block.blocked_by, block.reason);
    let mut cancelled = Vec::new();
    for id in ids {
        cancelled.push(change_state(tx, id, State::Cancelled, actor, Some(&why))?);
        let event = NewEvent {
            actor: actor.to_owned(),
            owner: owner.to_owned(),
            action: AuditAction::ReleaseCancel,
            subject: format!("release/{id}"),
            details: serde_json::json!({"reason": why, "blocked": digest}),
        };
        crate::registry::audit::append(tx, &event)?;
    }
    Ok(cancelled)
}

pub(super) fn change_state(
    tx: &Transaction<'_>,
    id: i64,
    to: State,
    actor: &str,
    reason: Option<&str>,
) -> Result<Release, RegistryError> {
    let release = by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
    if !release.state.may_become(to) {
        return Err(RegistryError::WrongState { id, state: release.state });
    }
    let now = utc::Timestamp::now();
    tx.execute("UPDATE releases SET state = ?1, state_changed_at = ?2 WHERE id = ?3", params![to.as_str(), now, id])?;
    record_transition(tx, id, to, &now, actor, reason)?;
    by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))
}

pub(super) fn record_transition(
    tx: &Transaction<'_>,
    id: i64,
    state: State,
    at: &utc::Timestamp,
    actor: &str,
    reason: Option<&str>,
) -> Result<(), RegistryError> {
    tx.execute(
        "INSERT INTO release_transitions (release_id, state, at, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, state.as_str(), at, actor, reason],
    )?;
    Ok(())
}

/// The unique index `one_in_flight` refusing a second release in flight, as the error that
/// names the one in flight.
pub(super) fn in_flight_violation(
    e: rusqlite::Error,
    conn: &rusqlite::Connection,
    service: &str,
    environment: &str,
) -> RegistryError {
    let unique = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE);
    match (unique, in_flight(conn, service, environment)) {
        (true, Ok(Some(busy))) => RegistryError::InFlight(Box::new(busy)),
        _ => RegistryError::Sqlite(e),
    }
}

pub(in crate::registry) fn by_id(conn: &rusqlite::Connection, id: i64) -> Result<Option<Release>, RegistryError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM releases WHERE id = ?1"), [id], from_row).optional()?)
}

pub(super) fn in_flight(
    conn: &rusqlite::Connection,
    service: &str,
    environment: &str,
) -> Result<Option<Release>, RegistryError> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {COLUMNS} FROM releases WHERE service = ?1 AND environment = ?2
                 AND state IN ('approved', 'deploying')"
            ),
            params![service, environment],
            from_row,
        )
        .optional()?)
}

pub(super) fn live(
    conn: &rusqlite::Connection,
    service: &str,
    environment: &str,
) -> Result<Option<Release>, RegistryError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM releases WHERE service = ?1 AND environment = ?2 AND state = 'live'"),
            params![service, environment],
            from_row,
        )
        .optional()?)
}

/// The version label `digest` was uploaded with for `service`, if any.
pub(in crate::registry) fn upload_version(
    conn: &rusqlite::Connection,
    service: &str,
    digest: Digest,
) -> Result<Option<String>, RegistryError> {
    Ok(conn
        .query_row(
            "SELECT version FROM artifact_uploads WHERE service = ?1 AND digest = ?2",
            params![service, digest.to_string()],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?
        .flatten())
}

pub(in crate::registry) fn conversion(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct BadText(String);

/// A deployment's phase, as stored; one this build does not write (stored by a newer
/// `release`, read after a downgrade) is kept by name: the column has no CHECK, so the
/// schema version does not stop a newer build's phase, and a release's story must still
/// show. States and kinds are read strictly: their columns' CHECKs hold them.
pub(super) fn phase_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Phase> {
    Ok(Phase::read(&row.get::<_, String>(i)?))
}

/// A deployment's outcome, as stored; kept by name when this build does not write it (the
/// column's CHECK allows `skipped`, which no build writes yet).
pub(super) fn outcome_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<PhaseOutcome> {
    Ok(PhaseOutcome::read(&row.get::<_, String>(i)?))
}

pub(in crate::registry) fn state_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<State> {
    row.get::<_, String>(i)?.parse().map_err(|e| conversion(i, BadText(e)))
}

pub(in crate::registry) fn digest_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Digest> {
    row.get::<_, String>(i)?.parse().map_err(|e| conversion(i, e))
}

pub(super) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Release> {
    Ok(Release {
        id: row.get(0)?,
        service: row.get(1)?,
        environment: row.get(2)?,
        digest: digest_at(row, 3)?,
        kind: row.get::<_, String>(4)?.parse().map_err(|e| conversion(4, BadText(e)))?,
        state: state_at(row, 5)?,
        requested_by: row.get(6)?,
        requester_owner: row.get(7)?,
        requested_at: row.get(8)?,
        source_environment: row.get(9)?,
        replaces: row.get(10)?,
        expires_at: row.get(11)?,
        state_changed_at: row.get(12)?,
    })
}

/// `deploying → live`, in the caller's transaction: the previously live release becomes
/// `superseded`, and releases of the same service and environment still waiting for approval
/// are cancelled (an approval never lands on a stale request). Each change gets its event.
/// Returns the live release and the ones it cancelled.
pub(super) fn go_live(
    tx: &Transaction<'_>,
    id: i64,
    event: &NewEvent,
) -> Result<(Release, Vec<Release>), RegistryError> {
    let release = by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
    if let Some(previous) = live(tx, &release.service, &release.environment)? {
        let why = format!("release {id} went live");
        change_state(tx, previous.id, State::Superseded, "release", Some(&why))?;
        let details = serde_json::json!({"by": id});
        let event = NewEvent::by_server(AuditAction::ReleaseSuperseded, format!("release/{}", previous.id), details);
        crate::registry::audit::append(tx, &event)?;
    }
    let release = change_state(tx, id, State::Live, "release", None)?;
    crate::registry::audit::append(tx, event)?;
    let pending: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM releases WHERE service = ?1 AND environment = ?2 AND state = 'pending_approval'",
        )?;
        stmt.query_map(params![release.service, release.environment], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut cancelled = Vec::new();
    for stale in pending {
        let why = format!("release {id} went live first");
        cancelled.push(change_state(tx, stale, State::Cancelled, "release", Some(&why))?);
        let details = serde_json::json!({"reason": why});
        crate::registry::audit::append(
            tx,
            &NewEvent::by_server(AuditAction::ReleaseCancel, format!("release/{stale}"), details),
        )?;
    }
    Ok((release, cancelled))
}

/// Release `id`'s four-eyes decision, if one was made.
pub(in crate::registry) fn approval_of(
    conn: &rusqlite::Connection,
    id: i64,
) -> Result<Option<Approval>, RegistryError> {
    Ok(conn
        .query_row(
            "SELECT decision, digest, decided_by, decider_owner, decided_at, reason FROM approvals
             WHERE release_id = ?1",
            [id],
            |r| {
                Ok(Approval {
                    decision: r.get(0)?,
                    digest: digest_at(r, 1)?,
                    decided_by: r.get(2)?,
                    decider_owner: r.get(3)?,
                    decided_at: r.get(4)?,
                    reason: r.get(5)?,
                })
            },
        )
        .optional()?)
}
