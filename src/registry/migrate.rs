//! The schema: `migrations/*.sql`, embedded, applied in order at open, each in a transaction.

use rusqlite::Connection;

use super::RegistryError;

/// Every migration, in order. Append only (see `migrations/README.md`).
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_artifacts_and_tokens", include_str!("../../migrations/0001_artifacts_and_tokens.sql")),
    ("0002_releases_and_audit", include_str!("../../migrations/0002_releases_and_audit.sql")),
    ("0003_artifact_blocks_and_purges", include_str!("../../migrations/0003_artifact_blocks_and_purges.sql")),
    ("0004_release_exclusions", include_str!("../../migrations/0004_release_exclusions.sql")),
    (
        "0005_release_configs_and_shared_files",
        include_str!("../../migrations/0005_release_configs_and_shared_files.sql"),
    ),
    ("0006_release_adoptions", include_str!("../../migrations/0006_release_adoptions.sql")),
    ("0007_webhooks", include_str!("../../migrations/0007_webhooks.sql")),
    ("0008_web_sessions_and_audit_filters", include_str!("../../migrations/0008_web_sessions_and_audit_filters.sql")),
    ("0009_blocks_hold_and_purges_wait", include_str!("../../migrations/0009_blocks_hold_and_purges_wait.sql")),
    ("0010_owners_compared_lowercase", include_str!("../../migrations/0010_owners_compared_lowercase.sql")),
    ("0011_node_marks", include_str!("../../migrations/0011_node_marks.sql")),
    ("0012_artifact_shared_checks", include_str!("../../migrations/0012_artifact_shared_checks.sql")),
    ("0013_release_forced_migrations", include_str!("../../migrations/0013_release_forced_migrations.sql")),
    ("0014_staged_uploads", include_str!("../../migrations/0014_staged_uploads.sql")),
    ("0015_artifact_indexes", include_str!("../../migrations/0015_artifact_indexes.sql")),
];

/// Brings the schema up to date; refuses a registry written by a newer `release`.
/// The schema version this binary knows (a registry newer than that is refused).
pub fn known_schema() -> u64 {
    MIGRATIONS.len() as u64
}

pub fn apply(conn: &mut Connection) -> Result<(), RegistryError> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(RegistryError::TooNew { found: current, known: MIGRATIONS.len() });
    }
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|source| RegistryError::Migration { name, source })?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
        tracing::info!(migration = name, "applied registry migration");
    }
    Ok(())
}
