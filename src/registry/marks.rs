//! Stranded nodes: the marks a failed deploy leaves on the nodes it could not put back, and
//! the repairs that lift them (`migrations/0011_node_marks.sql`).
//!
//! A node is stranded while its newest mark in its cell says so. Marks are only appended:
//! the history of when a node was stranded and by what it was repaired stays readable.

use rusqlite::{Connection, Transaction, params};

use super::{Registry, RegistryError, immediate};
use crate::model::release::{Release, Stranded};
use crate::utc;

impl Registry {
    /// Marks as repaired those of `nodes` stranded in the cell: `status --nodes` found them
    /// serving the live release again. Returns the nodes it marked.
    pub fn repair_nodes(
        &self,
        service: &str,
        environment: &str,
        nodes: &[String],
        reason: &str,
    ) -> Result<Vec<String>, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let repaired = repair(&tx, (service, environment), nodes, None, reason)?;
            tx.commit()?;
            Ok(repaired)
        })
    }
}

/// Marks `nodes` stranded by `release`'s failure.
pub(super) fn strand(
    tx: &Transaction<'_>,
    release: &Release,
    nodes: &[String],
    reason: &str,
) -> Result<(), RegistryError> {
    let now = utc::Timestamp::now();
    let mut insert = tx.prepare_cached(
        "INSERT INTO node_marks (service, environment, node, mark, release_id, reason, at)
         VALUES (?1, ?2, ?3, 'stranded', ?4, ?5, ?6)",
    )?;
    for node in nodes {
        insert.execute(params![release.service, release.environment, node, release.id, reason, now])?;
    }
    Ok(())
}

/// Marks those of `nodes` that are stranded in the cell as repaired (by `release`, when a
/// deploy went live on them). Returns the nodes it marked.
pub(super) fn repair(
    tx: &Transaction<'_>,
    (service, environment): (&str, &str),
    nodes: &[String],
    release: Option<i64>,
    reason: &str,
) -> Result<Vec<String>, RegistryError> {
    let stranded: Vec<String> =
        stranded_in(tx, service, environment)?.into_iter().map(|s| s.node).filter(|n| nodes.contains(n)).collect();
    let now = utc::Timestamp::now();
    let mut insert = tx.prepare_cached(
        "INSERT INTO node_marks (service, environment, node, mark, release_id, reason, at)
         VALUES (?1, ?2, ?3, 'repaired', ?4, ?5, ?6)",
    )?;
    for node in &stranded {
        insert.execute(params![service, environment, node, release, reason, now])?;
    }
    Ok(stranded)
}

/// The nodes stranded in one cell (whose newest mark is `stranded`), by name.
pub(super) fn stranded_in(conn: &Connection, service: &str, environment: &str) -> Result<Vec<Stranded>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.node, m.release_id, m.reason, m.at FROM node_marks m
         WHERE m.service = ?1 AND m.environment = ?2 AND m.mark = 'stranded'
           AND m.id = (SELECT MAX(n.id) FROM node_marks n
                       WHERE n.service = m.service AND n.environment = m.environment AND n.node = m.node)
         ORDER BY m.node",
    )?;
    let rows = stmt.query_map(params![service, environment], |r| {
        Ok(Stranded { node: r.get(0)?, release: r.get(1)?, reason: r.get(2)?, since: r.get(3)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The nodes `release`'s failure stranded (whether or not repaired since).
pub(super) fn stranded_by(conn: &Connection, release: i64) -> Result<Vec<String>, RegistryError> {
    let mut stmt =
        conn.prepare_cached("SELECT node FROM node_marks WHERE release_id = ?1 AND mark = 'stranded' ORDER BY node")?;
    Ok(stmt.query_map([release], |r| r.get(0))?.collect::<Result<_, _>>()?)
}
