//! A service's node as the configuration gives it, and the checks its SSH inputs pass at load.
//!
//! `host` and `user` reach the system `ssh` on its command line: the `openssh` crate puts the
//! destination last with no `--` before it (and offers no way to add one), so a host such as
//! `-oProxyCommand=…` would be read as an option and run a command on the server. Each value is
//! therefore checked when the file is read, by the deserializer, so the error names the file,
//! the line and the key like any other: a host is a DNS name (RFC 1123 labels), an IPv4 or
//! IPv6 address, or `local`; a user a POSIX portable user name; `base` an absolute path
//! without `.` or `..`; `port` 1 to 65535. The SSH transport checks host and user again before
//! it connects.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, de::Error as _};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Defaults to `host` (or `host:port` when the port is not 22).
    #[serde(default)]
    pub name: Option<String>,
    pub environment: String,
    /// A host name or address, or `"local"` for this machine without SSH.
    #[serde(deserialize_with = "host")]
    pub host: String,
    #[serde(default = "default_ssh_port", deserialize_with = "port")]
    pub port: u16,
    #[serde(default, deserialize_with = "user")]
    pub user: Option<String>,
    /// Absolute, without `.` or `..` components, repeated or trailing slashes (removed).
    #[serde(deserialize_with = "base")]
    pub base: PathBuf,
    #[serde(default)]
    pub migrate: bool,
}

fn default_ssh_port() -> u16 {
    22
}

impl Node {
    /// How the node is named in the registry and in messages: its `name`, else its host (and
    /// port when not 22); local nodes by their base directory.
    pub fn display_name(&self) -> String {
        match (&self.name, self.host.as_str(), self.port) {
            (Some(name), _, _) => name.clone(),
            (None, "local", _) => format!("local:{}", self.base.display()),
            (None, host, 22) => host.to_owned(),
            (None, host, port) => format!("{host}:{port}"),
        }
    }

    pub fn is_local(&self) -> bool {
        self.host == "local"
    }
}

/// `local`, an IPv4 or IPv6 address (without brackets), or a DNS name: dot-separated labels of
/// 1 to 63 letters, digits and `-`, neither starting nor ending with `-`, at most 253 bytes in
/// all, not all digits (that would be a mistyped IPv4 address). None can begin with `-`.
pub fn check_host(host: &str) -> Result<(), String> {
    if host == "local" || host.parse::<Ipv4Addr>().is_ok() || host.parse::<Ipv6Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let all_digits = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok) && !all_digits {
        return Ok(());
    }
    Err(format!(
        "{host:?} is not a host: give a DNS name (labels of letters, digits and '-', not starting or ending \
         with '-'), an IPv4 or IPv6 address, or \"local\""
    ))
}

/// A POSIX portable user name as `useradd` takes it: `[a-z_][a-z0-9_-]*[$]?`, at most 32 bytes.
pub fn check_user(user: &str) -> Result<(), String> {
    let body = user.strip_suffix('$').unwrap_or(user);
    let ok = (1..=32).contains(&user.len())
        && body.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && body.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{user:?} is not a user name: 1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or '_' \
             (a final '$' allowed)"
        ))
    }
}

/// An absolute directory other than `/`, without `.` or `..` components; repeated and trailing
/// slashes are dropped (`/srv/web/` is `/srv/web`).
pub fn normalize_base(base: &Path) -> Result<PathBuf, String> {
    if !base.is_absolute() {
        return Err(format!("{} must be an absolute path", base.display()));
    }
    // `components()` already drops repeated slashes, trailing slashes and inner `.`; a `.`
    // that was written is refused all the same, as it is not what a base directory looks like.
    if base.to_str().is_some_and(|s| s.split('/').any(|part| part == "." || part == "..")) {
        return Err(format!("{} must not contain `.` or `..` components", base.display()));
    }
    let mut normalized = PathBuf::from("/");
    for component in base.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => normalized.push(part),
            _ => return Err(format!("{} must not contain `.` or `..` components", base.display())),
        }
    }
    if normalized == Path::new("/") {
        return Err("must not be the root directory: releases and `current` go inside it".into());
    }
    Ok(normalized)
}

fn host<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let host = String::deserialize(d)?;
    check_host(&host).map_err(D::Error::custom)?;
    Ok(host)
}

fn user<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let user = String::deserialize(d)?;
    check_user(&user).map_err(D::Error::custom)?;
    Ok(Some(user))
}

fn base<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    normalize_base(&PathBuf::deserialize(d)?).map_err(D::Error::custom)
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match u16::deserialize(d)? {
        0 => Err(D::Error::custom("port 0 is not a port: give 1 to 65535 (SSH's is 22)")),
        port => Ok(port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_addresses_or_local_and_never_options() {
        for good in ["local", "web-1", "web-1.example.com", "10.0.0.5", "::1", "fe80::1", "2001:db8::5", "A.B-c.d9"] {
            assert!(check_host(good).is_ok(), "{good:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = ["abcdefghij"; 26].join(".");
        for bad in [
            "",
            "-oProxyCommand=touch /tmp/pwned",
            "-p",
            "web 1",
            "web_1",
            "-web",
            "web-",
            "web..example",
            ".web",
            "web.",
            "user@web",
            "web:22",
            "[::1]",
            "10.0.0.256",
            "10.0.0",
            "wéb",
            "web\n1",
            &long_label,
            &long_name,
        ] {
            assert!(check_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn users_are_posix_portable_names() {
        for good in ["deploy", "_release", "www-data", "a1", "machine$", &"a".repeat(32)] {
            assert!(check_user(good).is_ok(), "{good:?}");
        }
        for bad in ["", "-oProxyCommand=x", "deploy user", "Deploy", "1deploy", "de$ploy", "$", "dé", &"a".repeat(33)]
        {
            assert!(check_user(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bases_are_absolute_and_normalized() {
        assert_eq!(normalize_base(Path::new("/srv/web")).unwrap(), Path::new("/srv/web"));
        assert_eq!(normalize_base(Path::new("/srv//web/")).unwrap(), Path::new("/srv/web"));
        for bad in ["srv/web", "./srv", "/srv/../etc", "/srv/./web", "/", "//", "/.."] {
            assert!(normalize_base(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
