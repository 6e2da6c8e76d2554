//! Node keys in WireGuard's text form.
//!
//! A key is 32 bytes written as standard base64 (44 characters ending in
//! `=`), exactly as `wg genkey` / `wg pubkey` print them, so that keys move
//! freely between warren and stock WireGuard. Parsing is strict: a key that
//! decodes to anything but 32 bytes is refused with a message that says what
//! was wrong, because a silently truncated key is a tunnel that never comes up.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use x25519_dalek::{PublicKey, StaticSecret};

/// Why a key string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key is not valid base64 ({0})")]
    Base64(#[source] base64::DecodeError),
    #[error("key decodes to {0} bytes; a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A node's public key: its identity in the mesh and its WireGuard key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(pub [u8; 32]);

impl NodeKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first characters of the base64 form: what logs and the CLI show.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }

    pub fn to_x25519(self) -> PublicKey {
        PublicKey::from(self.0)
    }
}

impl From<PublicKey> for NodeKey {
    fn from(k: PublicKey) -> Self {
        NodeKey(k.to_bytes())
    }
}

impl FromStr for NodeKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(NodeKey)
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.short())
    }
}

impl serde::Serialize for NodeKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A private key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        PrivateKey(StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    /// The key with these secret bytes (a simulator's seeded keys).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(StaticSecret::from(bytes))
    }

    pub fn public(&self) -> NodeKey {
        NodeKey::from(PublicKey::from(&self.0))
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// The base64 form, for writing the key file. Deliberately not `Display`,
    /// so a secret never ends up in a log line by accident.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(|b| PrivateKey(StaticSecret::from(b)))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public().short())
    }
}

impl<'de> serde::Deserialize<'de> for PrivateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A pre-shared key (WireGuard's optional symmetric layer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl FromStr for PresharedKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PresharedKey)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

impl<'de> serde::Deserialize<'de> for PresharedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_matches_wireguard_format() {
        let k = PrivateKey::generate();
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        let back: PrivateKey = text.parse().unwrap();
        assert_eq!(back.public(), k.public());
        let pubtext = k.public().to_string();
        assert_eq!(pubtext.parse::<NodeKey>().unwrap(), k.public());
    }

    #[test]
    fn known_vector_from_wg() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let k: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            k.public().to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn bad_keys_say_why() {
        assert!(matches!("abc".parse::<NodeKey>(), Err(KeyError::Base64(_))));
        assert_eq!("AAAA".parse::<NodeKey>(), Err(KeyError::Length(3)));
        let msg = "AAAA".parse::<NodeKey>().unwrap_err().to_string();
        assert!(msg.contains("32 bytes"), "{msg}");
    }

    #[test]
    fn debug_hides_secret() {
        let k = PrivateKey::generate();
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
