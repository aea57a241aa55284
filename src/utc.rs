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
}
