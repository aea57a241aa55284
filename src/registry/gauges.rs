//! What `/metrics` reads from the registry at each scrape: the artifacts whose bytes are
//! stored, and what waits or is in flight in each cell of the status matrix, and its stranded
//! nodes.
//!
//! Cheap at any history size: the artifacts are one scan of their (small) table, and each
//! cell's counts are lookups in the partial indexes `one_in_flight` and `releases_pending`.

use super::{Registry, RegistryError};

/// The registry's gauges at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Artifacts whose bytes are stored: never purged, or uploaded again since.
    pub artifacts: u64,
    /// The sum of their sizes (bytes as stored, tar+zstd).
    pub artifact_bytes: u64,
    /// Every active (service, environment) cell, zero counts included.
    pub cells: Vec<Cell>,
}

/// One cell of the status matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub service: String,
    pub environment: String,
    /// Approved or deploying (at most one).
    pub in_flight: u64,
    pub pending_approval: u64,
    /// Nodes whose newest mark is `stranded`.
    pub stranded_nodes: u64,
}

impl Registry {
    /// Reads the gauges in one read transaction, so they agree with each other.
    pub fn gauges(&self) -> Result<Gauges, RegistryError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            let (artifacts, artifact_bytes) = tx.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM artifacts a
                 WHERE NOT EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = a.digest
                   AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let mut stmt = tx.prepare_cached(
                "SELECT s.name, e.name,
                   (SELECT COUNT(*) FROM releases r WHERE r.service = s.name AND r.environment = e.name
                      AND r.state IN ('approved', 'deploying')),
                   (SELECT COUNT(*) FROM releases r WHERE r.service = s.name AND r.environment = e.name
                      AND r.state = 'pending_approval'),
                   (SELECT COUNT(*) FROM node_marks m WHERE m.service = s.name AND m.environment = e.name
                      AND m.mark = 'stranded' AND m.id = (SELECT MAX(n.id) FROM node_marks n
                        WHERE n.service = m.service AND n.environment = m.environment AND n.node = m.node))
                 FROM services s CROSS JOIN environments e
                 WHERE s.active = 1 AND e.active = 1
                 ORDER BY s.name, e.position",
            )?;
            let cells = stmt
                .query_map([], |r| {
                    Ok(Cell {
                        service: r.get(0)?,
                        environment: r.get(1)?,
                        in_flight: r.get(2)?,
                        pending_approval: r.get(3)?,
                        stranded_nodes: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            drop(stmt);
            tx.finish()?;
            Ok(Gauges { artifacts, artifact_bytes, cells })
        })
    }
}
