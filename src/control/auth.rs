//! Request authentication by proof of the node key.
//!
//! After registration no bearer secret travels. Each request carries four
//! headers: the node key, a Unix timestamp, a random nonce and an
//! HMAC-SHA256 over the method, the path (with query), the timestamp, the
//! nonce and the SHA-256 of the body. The MAC key is derived from
//! X25519(node private, coordinator public), which only the node and the
//! coordinator can compute, so a valid MAC proves possession of the node key
//! without the key or any reusable secret ever crossing the wire.
//!
//! The coordinator rejects timestamps more than [`MAX_SKEW_SECS`] away from
//! its clock and remembers every nonce it accepted for that window (in its
//! database, so replicas share the memory); a captured request replayed
//! later is therefore refused either as stale or as a replay. Binding the
//! body hash means a captured MAC cannot be moved onto another body, and
//! binding method and path means it cannot be moved onto another endpoint.
//!
//! The derivation is a plain HMAC extract over the shared secret and both
//! public keys (HKDF-extract, in effect): the shared secret is already
//! uniformly distributed for honest keys, and binding both public keys stops
//! a small-subgroup key from producing a MAC key shared by many nodes. An
//! all-zero shared secret (a low-order public key) is refused outright.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use x25519_dalek::PublicKey;

use crate::keys::{NodeKey, PrivateKey};

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the requesting node's public key (base64).
pub const HDR_NODE: &str = "x-warren-node";
/// Header carrying the request time, Unix seconds.
pub const HDR_TIME: &str = "x-warren-time";
/// Header carrying the request's random nonce (16..=64 URL-safe characters).
pub const HDR_NONCE: &str = "x-warren-nonce";
/// Header carrying the MAC, base64.
pub const HDR_MAC: &str = "x-warren-mac";

/// How far a request's clock may be from the coordinator's, either way.
/// Nonces are remembered for at least twice this long.
pub const MAX_SKEW_SECS: u64 = 120;

const LABEL: &[u8] = b"warren control v1";

/// Why a request's authentication was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {0}")]
    BadHeader(&'static str),
    #[error("request time is {skew_secs} s away from the coordinator's clock")]
    Stale { skew_secs: u64 },
    #[error("the MAC does not verify")]
    BadMac,
    #[error("the key exchange gave a weak shared secret (low-order public key)")]
    WeakKey,
}

/// The symmetric key one node shares with the coordinator.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    fn derive(shared: [u8; 32], node: &NodeKey, coordinator: &NodeKey) -> Result<Self, AuthError> {
        if shared == [0u8; 32] {
            return Err(AuthError::WeakKey);
        }
        let mut mac = new_hmac(LABEL);
        mac.update(&shared);
        mac.update(node.as_bytes());
        mac.update(coordinator.as_bytes());
        Ok(SessionKey(mac.finalize().into_bytes().into()))
    }

    /// The agent's side: its private node key and the coordinator's public key.
    pub fn for_node(node: &PrivateKey, coordinator: &NodeKey) -> Result<Self, AuthError> {
        let shared = node
            .secret()
            .diffie_hellman(&PublicKey::from(coordinator.0))
            .to_bytes();
        Self::derive(shared, &node.public(), coordinator)
    }

    /// The coordinator's side: its private key and the node's public key.
    pub fn for_coordinator(coordinator: &PrivateKey, node: &NodeKey) -> Result<Self, AuthError> {
        let shared = coordinator
            .secret()
            .diffie_hellman(&PublicKey::from(node.0))
            .to_bytes();
        Self::derive(shared, node, &coordinator.public())
    }

    fn mac(&self, method: &str, path: &str, time: u64, nonce: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = new_hmac(&self.0);
        let body_hash = Sha256::digest(body);
        // Newlines cannot occur in a method, an origin-form path, a decimal
        // number or a URL-safe nonce, so this encoding is unambiguous.
        for part in [method.as_bytes(), path.as_bytes()] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.update(time.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(nonce.as_bytes());
        mac.update(b"\n");
        mac.update(&body_hash);
        mac
    }
}

fn new_hmac(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm cannot be reached.
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The four authentication headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeaders {
    pub node: NodeKey,
    pub time: u64,
    pub nonce: String,
    pub mac: Vec<u8>,
}

impl AuthHeaders {
    /// Signs a request. `path` is the origin-form target, e.g. `/map?x=1`.
    pub fn sign(
        key: &SessionKey,
        node: NodeKey,
        method: &str,
        path: &str,
        now_unix: u64,
        body: &[u8],
    ) -> Self {
        use base64::Engine as _;
        let raw: [u8; 18] = rand::random();
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let mac = key
            .mac(method, path, now_unix, &nonce, body)
            .finalize()
            .into_bytes()
            .to_vec();
        AuthHeaders {
            node,
            time: now_unix,
            nonce,
            mac,
        }
    }

    /// The headers as name/value pairs, ready for an HTTP client.
    pub fn to_pairs(&self) -> [(&'static str, String); 4] {
        use base64::Engine as _;
        [
            (HDR_NODE, self.node.to_string()),
            (HDR_TIME, self.time.to_string()),
            (HDR_NONCE, self.nonce.clone()),
            (
                HDR_MAC,
                base64::engine::general_purpose::STANDARD.encode(&self.mac),
            ),
        ]
    }

    /// Reads the headers through `get` (a header lookup by lower-case name).
    pub fn parse<'a>(get: impl Fn(&'static str) -> Option<&'a str>) -> Result<Self, AuthError> {
        use base64::Engine as _;
        let field = |name: &'static str| get(name).ok_or(AuthError::MissingHeader(name));
        let node = field(HDR_NODE)?
            .parse::<NodeKey>()
            .map_err(|_| AuthError::BadHeader(HDR_NODE))?;
        let time = field(HDR_TIME)?
            .parse::<u64>()
            .map_err(|_| AuthError::BadHeader(HDR_TIME))?;
        let nonce = field(HDR_NONCE)?;
        let nonce_ok = (16..=64).contains(&nonce.len())
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !nonce_ok {
            return Err(AuthError::BadHeader(HDR_NONCE));
        }
        let mac = base64::engine::general_purpose::STANDARD
            .decode(field(HDR_MAC)?)
            .map_err(|_| AuthError::BadHeader(HDR_MAC))?;
        if mac.len() != 32 {
            return Err(AuthError::BadHeader(HDR_MAC));
        }
        Ok(AuthHeaders {
            node,
            time,
            nonce: nonce.to_owned(),
            mac,
        })
    }

    /// Checks the timestamp against `now_unix`, then the MAC in constant
    /// time. The nonce's freshness is the caller's job (it needs storage).
    pub fn verify(
        &self,
        key: &SessionKey,
        method: &str,
        path: &str,
        now_unix: u64,
        body: &[u8],
    ) -> Result<(), AuthError> {
        let skew_secs = now_unix.abs_diff(self.time);
        if skew_secs > MAX_SKEW_SECS {
            return Err(AuthError::Stale { skew_secs });
        }
        key.mac(method, path, self.time, &self.nonce, body)
            .verify_slice(&self.mac)
            .map_err(|_| AuthError::BadMac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PrivateKey, PrivateKey) {
        (PrivateKey::generate(), PrivateKey::generate())
    }

    #[test]
    fn both_sides_derive_the_same_key_and_verify() {
        let (node, coord) = pair();
        let kn = SessionKey::for_node(&node, &coord.public()).unwrap();
        let kc = SessionKey::for_coordinator(&coord, &node.public()).unwrap();
        let h = AuthHeaders::sign(&kn, node.public(), "POST", "/endpoints", 1000, b"{}");
        let pairs = h.to_pairs();
        let parsed =
            AuthHeaders::parse(|n| pairs.iter().find(|p| p.0 == n).map(|p| p.1.as_str())).unwrap();
        assert_eq!(parsed, h);
        parsed
            .verify(&kc, "POST", "/endpoints", 1010, b"{}")
            .unwrap();
    }

    #[test]
    fn any_change_breaks_the_mac() {
        let (node, coord) = pair();
        let kn = SessionKey::for_node(&node, &coord.public()).unwrap();
        let kc = SessionKey::for_coordinator(&coord, &node.public()).unwrap();
        let h = AuthHeaders::sign(&kn, node.public(), "POST", "/endpoints", 1000, b"{}");
        assert_eq!(
            h.verify(&kc, "GET", "/endpoints", 1000, b"{}"),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            h.verify(&kc, "POST", "/logout", 1000, b"{}"),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            h.verify(&kc, "POST", "/endpoints", 1000, b"[]"),
            Err(AuthError::BadMac)
        );
        let mut other = h.clone();
        other.nonce.push('x');
        assert_eq!(
            other.verify(&kc, "POST", "/endpoints", 1000, b"{}"),
            Err(AuthError::BadMac)
        );
        // Another coordinator (or another node) derives a different key.
        let stranger = PrivateKey::generate();
        let ks = SessionKey::for_coordinator(&stranger, &node.public()).unwrap();
        assert_eq!(
            h.verify(&ks, "POST", "/endpoints", 1000, b"{}"),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn stale_requests_are_refused() {
        let (node, coord) = pair();
        let kn = SessionKey::for_node(&node, &coord.public()).unwrap();
        let h = AuthHeaders::sign(&kn, node.public(), "GET", "/map", 1000, b"");
        let err = h
            .verify(&kn, "GET", "/map", 1000 + MAX_SKEW_SECS + 1, b"")
            .unwrap_err();
        assert_eq!(
            err,
            AuthError::Stale {
                skew_secs: MAX_SKEW_SECS + 1
            }
        );
        assert!(h
            .verify(&kn, "GET", "/map", 1000 - MAX_SKEW_SECS, b"")
            .is_ok());
    }

    #[test]
    fn low_order_keys_are_refused() {
        let node = PrivateKey::generate();
        assert_eq!(
            SessionKey::for_node(&node, &NodeKey([0; 32])).unwrap_err(),
            AuthError::WeakKey
        );
    }

    #[test]
    fn malformed_headers_say_which() {
        let none = AuthHeaders::parse(|_| None).unwrap_err();
        assert_eq!(none, AuthError::MissingHeader(HDR_NODE));
        let k = PrivateKey::generate().public().to_string();
        let bad_nonce = AuthHeaders::parse(|n| match n {
            HDR_NODE => Some(k.as_str()),
            HDR_TIME => Some("5"),
            HDR_NONCE => Some("short"),
            _ => Some("AAAA"),
        });
        assert_eq!(bad_nonce.unwrap_err(), AuthError::BadHeader(HDR_NONCE));
    }
}
