//! Closed vocabularies (release states, phases, audit actions, …) declared once: the macro
//! [`vocabulary!`](crate::model::vocabulary) writes the enum, its wire names, `ALL`, `as_str`,
//! a strict `parse` and the serde impls from one list, so a variant cannot lack a name or be
//! missing from `ALL`. A vocabulary a peer of another build may extend (a newer server's new
//! state, read by an older CLI; a phase stored by a newer server, read after a downgrade)
//! declares an `other` variant: reads keep the name they do not know instead of failing,
//! writes (`parse`, the registry's columns) still take only the known ones.

use std::fmt;

/// A name this build does not know, as a peer wrote it, kept inline so that the
/// vocabularies holding one stay `Copy` (the server passes states and phases by value in
/// some 200 places). A name longer than [`OtherName::MAX`] bytes is cut at a character
/// boundary and shown with `…`; control characters (a terminal escape a hostile peer sends)
/// are kept as `?`, since the name reaches logs, the registry and terminals.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OtherName {
    /// The length in bytes; the high bit says the name was cut.
    len: u8,
    bytes: [u8; OtherName::MAX],
}

impl OtherName {
    /// Longer than any name of these vocabularies (`pending_approval`, `prepare adopted`),
    /// short enough that a `Release`, which holds two, stays small (24 bytes a field).
    pub const MAX: usize = 22;
    const CUT: u8 = 0x80;

    pub fn new(name: &str) -> OtherName {
        let cleaned: String;
        let name = if name.chars().any(char::is_control) {
            cleaned = name.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            cleaned.as_str()
        } else {
            name
        };
        let mut end = name.len().min(Self::MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; Self::MAX];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        let cut = if end < name.len() { Self::CUT } else { 0 };
        OtherName { len: end as u8 | cut, bytes }
    }

    /// The name as read (its first [`OtherName::MAX`] bytes when it was longer).
    pub fn as_str(&self) -> &str {
        let len = usize::from(self.len & !Self::CUT);
        std::str::from_utf8(&self.bytes[..len]).expect("cut at a char boundary")
    }
}

impl fmt::Display for OtherName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if self.len & Self::CUT != 0 { f.write_str("…") } else { Ok(()) }
    }
}

impl fmt::Debug for OtherName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// Declares a vocabulary: `enum Name { Variant = "wire name", … }`, or
/// `enum Name(other Variant) { … }` for one with a variant that keeps a name this build does
/// not know (see the module's doc). Generates `ALL` (the known variants, in order), `as_str`, `parse` (known
/// names only), `Display`, `Serialize` (the wire name) and `Deserialize` (strict without an
/// `other` variant; with one, an unknown name reads as it).
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )*
                }
            }
        }

        $crate::model::vocabulary::vocabulary!(@common $name, [$($variant = $wire),*], |name, de| {
            Err(<D::Error as serde::de::Error>::custom(format!(
                concat!("unknown ", stringify!($name), " {:?}"), name
            )))
        });
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident (other $other:ident) {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A name this build does not know (written by another build).
            $other($crate::model::vocabulary::OtherName),
        }

        impl $name {
            /// The wire name; for a name this build does not know, the name as read.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $wire, )*
                    $name::$other(name) => name.as_str(),
                }
            }

            /// `name` as known, or kept as [`OtherName`](crate::model::vocabulary::OtherName):
            /// for reads of what another build wrote, never for a write.
            pub fn read(name: &str) -> Self {
                Self::parse(name).unwrap_or_else(|| $name::$other($crate::model::vocabulary::OtherName::new(name)))
            }

            /// Whether this build knows the name (false for what only a newer peer writes).
            pub fn is_known(&self) -> bool {
                !matches!(self, $name::$other(_))
            }
        }

        $crate::model::vocabulary::vocabulary!(@common $name, [$($variant = $wire),*], |name, de| {
            Ok($name::$other($crate::model::vocabulary::OtherName::new(&name)))
        });
    };
    (@common $name:ident, [$($variant:ident = $wire:literal),*], |$n:ident, $d:ident| $unknown:block) => {
        impl $name {
            /// Every known variant, in declaration order.
            pub const ALL: [$name; [$($wire),*].len()] = [$($name::$variant),*];

            /// The known variant of this wire name, or `None`.
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $( $wire => Some($name::$variant), )*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>($d: D) -> Result<Self, D::Error> {
                let $n = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize($d)?;
                match Self::parse(&$n) {
                    Some(known) => Ok(known),
                    None => $unknown,
                }
            }
        }
    };
}

pub(crate) use vocabulary;

#[cfg(test)]
mod tests {
    use super::*;

    vocabulary! {
        enum Closed {
            One = "one",
            TwoWords = "two words",
        }
    }

    vocabulary! {
        enum Open(other Other) {
            One = "one",
        }
    }

    #[test]
    fn a_closed_vocabulary_reads_its_names_and_refuses_others() {
        assert_eq!(Closed::ALL, [Closed::One, Closed::TwoWords]);
        for v in Closed::ALL {
            assert_eq!(Closed::parse(v.as_str()), Some(v));
            assert_eq!(serde_json::from_value::<Closed>(serde_json::to_value(v).unwrap()).unwrap(), v);
        }
        assert_eq!(serde_json::to_value(Closed::TwoWords).unwrap(), "two words");
        let err = serde_json::from_value::<Closed>("three".into()).unwrap_err();
        assert!(err.to_string().contains("unknown Closed \"three\""), "{err}");
    }

    #[test]
    fn an_open_vocabulary_keeps_the_name_it_does_not_know_and_writes_it_back() {
        let read: Open = serde_json::from_value("newer".into()).unwrap();
        assert_eq!(read, Open::Other(OtherName::new("newer")));
        assert!(!read.is_known() && Open::One.is_known());
        assert_eq!(read.to_string(), "newer");
        assert_eq!(serde_json::to_value(read).unwrap(), "newer");
        assert_eq!(Open::parse("newer"), None, "a write path takes known names only");
        assert_eq!((Open::read("newer"), Open::read("one")), (read, Open::One));
        assert_eq!(Open::ALL, [Open::One]);
    }

    #[test]
    fn a_long_unknown_name_is_cut_at_a_character_boundary_and_says_so() {
        let long = format!("{}é-and-more", "x".repeat(OtherName::MAX - 1));
        let name = OtherName::new(&long);
        assert_eq!(name.as_str(), "x".repeat(OtherName::MAX - 1));
        assert_eq!(name.to_string(), format!("{}…", "x".repeat(OtherName::MAX - 1)));
        assert_eq!(OtherName::new("short").to_string(), "short");
        assert_eq!(OtherName::new("evil\u{1b}[31m\r").as_str(), "evil?[31m?");
        let whole = "y".repeat(OtherName::MAX);
        assert_eq!(OtherName::new(&whole).to_string(), whole, "a name of MAX bytes is whole");
        assert_eq!(std::mem::size_of::<crate::model::release::State>(), OtherName::MAX + 2);
    }
}
