//! Caller identity. Owns: the API key table the control plane publishes (SHA-256 of each key ->
//! its service), checking `Authorization: Bearer <key>`, and deciding which service a request is
//! charged to.
//! Must not: keep or log a plain key; only hashes are held.

use crate::codec::Head;
use ahash::AHashMap;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// What a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    pub service: Arc<str>,
    /// May name another service in `x-switchyard-service` (gateways acting for many teams).
    pub any_service: bool,
}

/// Every valid key, by the SHA-256 of the key.
#[derive(Debug, Default)]
pub struct KeyTable {
    keys: AHashMap<[u8; 32], KeyGrant>,
}

pub fn key_hash(key: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

impl KeyTable {
    /// Whether a key belongs to `service`.
    pub fn names(&self, service: &str) -> bool {
        self.keys.values().any(|g| &*g.service == service)
    }

    pub fn new(keys: impl IntoIterator<Item = ([u8; 32], KeyGrant)>) -> KeyTable {
        KeyTable {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The service a request is charged to.
pub enum Service<'h> {
    /// From `x-switchyard-service` (auth off, or a key allowed to act for any service).
    Named(&'h str),
    /// The service the caller's key belongs to; `trusted` for keys that may act for any.
    Key { service: Arc<str>, trusted: bool },
}

impl Service<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Service::Named(s) => s,
            Service::Key { service, .. } => service,
        }
    }

    /// May the caller's headers decide what a key would otherwise (the category, so a
    /// category budget cannot be dodged)?
    pub fn trusted(&self) -> bool {
        match self {
            Service::Named(_) => true,
            Service::Key { trusted, .. } => *trusted,
        }
    }
}

/// Who is calling. With `required` off, the header names the service (default "default").
/// Errors are the message for a 401.
pub fn identify<'h>(
    keys: &ArcSwap<KeyTable>,
    required: bool,
    head: &'h Head,
) -> Result<Service<'h>, &'static str> {
    // Not a name (not UTF-8, or empty: a client's unset variable): checked like one, it is
    // refused with the naming rule rather than billed to `default` or the key's service.
    let named = head
        .header("x-switchyard-service")
        .map(|v| std::str::from_utf8(v).map_or("(not UTF-8)", str::trim));
    if !required {
        return Ok(Service::Named(named.unwrap_or("default")));
    }
    let Some(auth) = head.header("authorization") else {
        return Err("missing API key: send `Authorization: Bearer <key>`");
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let key = auth
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|_| &auth[7..])
        .ok_or("the Authorization header must be `Bearer <key>`")?;
    let keys = keys.load();
    let grant = keys
        .keys
        .get(&key_hash(key.trim_ascii()))
        .ok_or("invalid API key")?;
    Ok(match named {
        Some(s) if grant.any_service => Service::Named(s),
        _ => Service::Key {
            service: grant.service.clone(),
            trusted: grant.any_service,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &str) -> Head {
        let raw = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        crate::codec::parse_request(raw.as_bytes(), 8192)
            .unwrap()
            .expect("a complete head")
            .0
    }

    fn table() -> KeyTable {
        KeyTable::new([
            (
                key_hash(b"sy-etl"),
                KeyGrant {
                    service: "etl".into(),
                    any_service: false,
                },
            ),
            (
                key_hash(b"sy-gateway"),
                KeyGrant {
                    service: "gateway".into(),
                    any_service: true,
                },
            ),
        ])
    }

    fn who(required: bool, headers: &str) -> Result<String, &'static str> {
        let h = head(headers);
        identify(&ArcSwap::from_pointee(table()), required, &h).map(|s| s.as_str().to_string())
    }

    #[test]
    fn keys_decide_the_service_when_required() {
        assert_eq!(who(false, ""), Ok("default".into()));
        assert_eq!(who(false, "x-switchyard-service: a\r\n"), Ok("a".into()));
        // An empty name is no name: refused later by the naming rule, not billed to default.
        assert_eq!(who(false, "x-switchyard-service: \r\n"), Ok("".into()));
        assert!(who(true, "x-switchyard-service: a\r\n").is_err());
        assert_eq!(
            who(true, "authorization: Bearer nope\r\n"),
            Err("invalid API key")
        );
        assert!(who(true, "authorization: Basic eHg=\r\n").is_err());
        assert_eq!(
            who(
                true,
                "authorization: Bearer sy-etl\r\nx-switchyard-service: billing\r\n"
            ),
            Ok("etl".into()),
            "a plain key cannot act for another service"
        );
        assert_eq!(
            who(
                true,
                "authorization: Bearer sy-gateway\r\nx-switchyard-service: billing\r\n"
            ),
            Ok("billing".into())
        );
        assert_eq!(
            who(true, "authorization: Bearer sy-gateway\r\n"),
            Ok("gateway".into())
        );
        // The scheme is case-insensitive; anything shorter than it is no key.
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            assert_eq!(
                who(true, &format!("authorization: {scheme} sy-etl\r\n")),
                Ok("etl".into())
            );
        }
        assert!(who(true, "authorization: Bear\r\n").is_err());
    }
}
