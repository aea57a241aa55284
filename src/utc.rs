//! Time stamps: UTC, RFC 3339 with microseconds (`2026-11-27T11:05:30.123456Z`), so that their
//! text sorts in time order.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub fn format(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"))
        .expect("UTC time stamps always format")
}

pub fn now_text() -> String {
    format(now())
}

pub fn parse(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

/// A time stamp as the registry stores it and the API sends it: the text of [`format`]
/// (`2026-11-27T11:05:30.123456Z`), kept as that text, so that it goes out and comes back
/// byte for byte, and orders (as that text does) in time order.
///
/// Made on write paths by [`Timestamp::now`], [`Timestamp::at`] or [`Timestamp::parse`] (which
/// refuses any other form); read back as stored (a row or an answer is never refused for its
/// time's form: the registry only ever wrote this one).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(String);

/// A time that is not in the one form a [`Timestamp`] has.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a UTC time stamp like 2026-11-27T11:05:30.123456Z")]
pub struct BadTimestamp(String);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::at(now())
    }

    pub fn at(t: OffsetDateTime) -> Timestamp {
        Timestamp(format(t))
    }

    /// Exactly the form [`format`] writes: UTC, microseconds, `Z`.
    pub fn parse(text: &str) -> Result<Timestamp, BadTimestamp> {
        match parse(text) {
            Ok(t) if format(t) == text => Ok(Timestamp(text.to_owned())),
            _ => Err(BadTimestamp(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The time it names (`None` for a text stored in another form).
    pub fn time(&self) -> Option<OffsetDateTime> {
        parse(&self.0).ok()
    }
}

impl AsRef<str> for Timestamp {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Timestamp)
    }
}

impl rusqlite::types::ToSql for Timestamp {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        self.0.to_sql()
    }
}

impl rusqlite::types::FromSql for Timestamp {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        String::column_result(value).map(Timestamp)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_sorts_as_text() {
        let a = super::now();
        let text = super::format(a);
        assert_eq!(text.len(), "2026-11-27T11:05:30.123456Z".len());
        let back = super::parse(&text).unwrap();
        assert!((a - back).abs() < time::Duration::microseconds(1));
        let later = super::format(a + time::Duration::seconds(1));
        assert!(later > text);
    }

    #[test]
    fn a_timestamp_is_its_text_on_the_wire_and_in_the_registry() {
        use super::Timestamp;
        let text = "2026-11-27T11:05:30.123456Z";
        let stamp = Timestamp::parse(text).unwrap();
        assert_eq!(stamp.to_string(), text);
        assert_eq!(serde_json::to_string(&stamp).unwrap(), format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<Timestamp>(&format!("\"{text}\"")).unwrap(), stamp);
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let (back, stored): (Timestamp, String) =
            conn.query_row("SELECT ?1, ?1", [&stamp], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((back, stored.as_str()), (stamp.clone(), text));
        assert!(Timestamp::parse("2026-11-27T11:05:30.123457Z").unwrap() > stamp);
        assert!(Timestamp::now() > stamp);
    }

    #[test]
    fn a_timestamp_is_made_of_one_form_only() {
        use super::Timestamp;
        for other in [
            "2026-11-27T11:05:30Z",
            "2026-11-27T11:05:30.123Z",
            "2026-11-27T12:05:30.123456+01:00",
            "2026-11-27 11:05:30.123456Z",
            "2026-11-27T11:05:30.123456z",
            "yesterday",
            "",
        ] {
            assert!(Timestamp::parse(other).is_err(), "{other:?}");
        }
        let now = Timestamp::now();
        assert_eq!(Timestamp::parse(now.as_str()).unwrap(), now);
        assert_eq!(Timestamp::at(now.time().unwrap()), now);
    }
}
