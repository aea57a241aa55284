//! Where a request comes from, for the refusal counts: the peer of the connection, or, when
//! that peer is a trusted proxy (`server.trusted_proxies`), the client its `X-Forwarded-For`
//! names. Nobody else's `X-Forwarded-For` is believed: a stranger could name any address.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderMap};

use crate::config::IpRange;

/// The client's address: the peer, or behind trusted proxies the right-most address of
/// `X-Forwarded-For` that is not one of them (each proxy appends the address it was reached
/// from, so everything left of that was written by the client and may be forged).
pub fn client(extensions: &Extensions, headers: &HeaderMap, trusted: &[IpRange]) -> Option<IpAddr> {
    let peer = extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|r| r.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !is_trusted(client) {
                    break;
                }
            }
            // Not an address: what is left of it cannot be trusted either.
            Err(_) => break,
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(peer: &str, forwarded: &[&str], trusted: &[&str]) -> Option<IpAddr> {
        let mut extensions = Extensions::new();
        extensions.insert(ConnectInfo::<SocketAddr>(format!("{peer}:40000").parse().unwrap()));
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        let trusted: Vec<IpRange> = trusted.iter().map(|t| IpRange::parse(t).unwrap()).collect();
        client(&extensions, &headers, &trusted)
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn the_peer_unless_it_is_a_trusted_proxy() {
        assert_eq!(from("198.51.100.4", &["1.2.3.4"], &[]), ip("198.51.100.4"), "nobody is trusted by default");
        assert_eq!(from("198.51.100.4", &["1.2.3.4"], &["127.0.0.1"]), ip("198.51.100.4"));
        assert_eq!(from("127.0.0.1", &["1.2.3.4"], &["127.0.0.1"]), ip("1.2.3.4"));
        // A client's forged entries are left of the one the proxy appended.
        assert_eq!(from("127.0.0.1", &["6.6.6.6, 1.2.3.4"], &["127.0.0.1"]), ip("1.2.3.4"));
        assert_eq!(from("127.0.0.1", &["6.6.6.6", "1.2.3.4"], &["127.0.0.1"]), ip("1.2.3.4"));
        // Through two trusted proxies.
        assert_eq!(from("127.0.0.1", &["1.2.3.4, 10.0.0.2"], &["127.0.0.1", "10.0.0.0/8"]), ip("1.2.3.4"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(from("127.0.0.1", &["1.2.3.4, junk"], &["127.0.0.1"]), ip("127.0.0.1"));
        assert_eq!(from("127.0.0.1", &[], &["127.0.0.1"]), ip("127.0.0.1"));
        assert_eq!(client(&Extensions::new(), &HeaderMap::new(), &[]), None, "in-process: no peer");
    }
}
