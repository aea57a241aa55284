//! Token rows: created with a hashed secret, listed, revoked once, never deleted.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Registry, RegistryError, join_list, split_list};
use crate::model::access::{Role, join_roles};
use crate::model::audit::NewEvent;
use crate::utc::{self, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    #[serde(skip)]
    pub id: String,
    pub name: String,
    pub owner: String,
    pub roles: Vec<Role>,
    pub services: Option<Vec<String>>,
    pub environments: Option<Vec<String>>,
    #[serde(skip)]
    pub secret_sha256: Vec<u8>,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

pub struct NewToken {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub roles: Vec<Role>,
    pub services: Option<Vec<String>>,
    pub environments: Option<Vec<String>>,
    pub secret_sha256: [u8; 32],
    pub expires_at: Option<Timestamp>,
}

const COLUMNS: &str =
    "id, name, owner, roles, services, environments, secret_sha256, created_at, expires_at, revoked_at";

impl Registry {
    /// Creates a token and appends `event` in the same transaction.
    pub fn create_token(&self, new: &NewToken, event: &NewEvent) -> Result<TokenRecord, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let taken: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM tokens WHERE name = ?1)", [&new.name], |r| r.get(0))?;
            if taken {
                return Err(RegistryError::TokenNameTaken(new.name.clone()));
            }
            tx.execute(
                &format!("INSERT INTO tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL)"),
                params![
                    new.id,
                    new.name,
                    new.owner,
                    join_roles(&new.roles),
                    join_list(&new.services),
                    join_list(&new.environments),
                    &new.secret_sha256[..],
                    utc::Timestamp::now(),
                    new.expires_at,
                ],
            )?;
            let record =
                query_one(&tx, "id", &new.id)?.ok_or_else(|| RegistryError::Corrupt("token row vanished".into()))?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(record)
        })
    }

    pub fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>, RegistryError> {
        self.read(|conn| query_one(conn, "id", id))
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_at, name"))?;
            let rows = stmt.query_map([], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Revokes a token and appends `event` in the same transaction.
    pub fn revoke_token(&self, name: &str, event: &NewEvent) -> Result<TokenRecord, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let token = query_one(&tx, "name", name)?.ok_or_else(|| RegistryError::TokenNotFound(name.to_owned()))?;
            if token.revoked_at.is_some() {
                return Err(RegistryError::TokenAlreadyRevoked(name.to_owned()));
            }
            tx.execute("UPDATE tokens SET revoked_at = ?1 WHERE name = ?2", params![utc::Timestamp::now(), name])?;
            let token =
                query_one(&tx, "name", name)?.ok_or_else(|| RegistryError::Corrupt("token row vanished".into()))?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(token)
        })
    }
}

fn query_one(conn: &rusqlite::Connection, column: &str, value: &str) -> Result<Option<TokenRecord>, RegistryError> {
    debug_assert!(matches!(column, "id" | "name"));
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM tokens WHERE {column} = ?1"), [value], from_row).optional()?)
}

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let roles: String = row.get(3)?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        owner: row.get(2)?,
        // Unknown role names (written by a newer release) are ignored, never widened.
        roles: roles.split(',').filter_map(|r| r.parse().ok()).collect(),
        services: split_list(row.get(4)?),
        environments: split_list(row.get(5)?),
        secret_sha256: row.get(6)?,
        created_at: row.get(7)?,
        expires_at: row.get(8)?,
        revoked_at: row.get(9)?,
    })
}
