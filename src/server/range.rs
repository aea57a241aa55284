//! `Range: bytes=…` for blob downloads: one range (first-last, first-, or -suffix).

use std::ops::Range;

/// What a `Range` header asks of an object of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranged {
    /// No header, or one we answer with the whole object (several ranges, other units).
    Whole,
    Part(Range<u64>),
    Unsatisfiable,
}

pub fn parse(header: Option<&str>, size: u64) -> Ranged {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else { return Ranged::Unsatisfiable };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(first), Ok(last)) if first <= last => first..last.saturating_add(1).min(size),
        (Ok(first), Err(_)) if last.is_empty() => first..size,
        (Err(_), Ok(suffix)) if first.is_empty() && suffix > 0 => size.saturating_sub(suffix)..size,
        _ => return Ranged::Unsatisfiable,
    };
    if range.start >= size || range.is_empty() { Ranged::Unsatisfiable } else { Ranged::Part(range) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse(None, 100), Ranged::Whole);
        assert_eq!(parse(Some("bytes=0-9"), 100), Ranged::Part(0..10));
        assert_eq!(parse(Some("bytes=90-"), 100), Ranged::Part(90..100));
        assert_eq!(parse(Some("bytes=-10"), 100), Ranged::Part(90..100));
        assert_eq!(parse(Some("bytes=95-200"), 100), Ranged::Part(95..100));
        assert_eq!(parse(Some("bytes=-200"), 100), Ranged::Part(0..100));
        assert_eq!(parse(Some("bytes=100-"), 100), Ranged::Unsatisfiable);
        assert_eq!(parse(Some("bytes=5-1"), 100), Ranged::Unsatisfiable);
        assert_eq!(parse(Some("bytes=x"), 100), Ranged::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,5-6"), 100), Ranged::Whole);
        assert_eq!(parse(Some("items=0-1"), 100), Ranged::Whole);
        assert_eq!(parse(Some("bytes=0-18446744073709551615"), 100), Ranged::Part(0..100));
    }
}
