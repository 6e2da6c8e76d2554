//! Authentication on the relay's two channels: the agent's proof of its
//! node key to the relay, and the relay's credentials on the coordinator's
//! node feed (with the feed's event type, so both ends share one definition).
//!
//! ## Proof of node key
//!
//! The relay opens with its X25519 public key and a fresh random challenge.
//! The client answers with `HMAC-SHA256(k, transcript)` where
//! `k = SHA-256("warren relay proof v1" || X25519(node private, relay public))`
//! and the transcript binds the challenge, the node key and the relay key.
//! Only the holder of the node's private key (or of the relay's) can compute
//! `k`, so the relay learns that the client owns the key it claims without any
//! bearer secret crossing the wire (see docs/architecture.md, "Keys"). The
//! challenge is fresh per
//! connection, so a recorded proof is useless later.
//!
//! A static-static DH MAC was chosen over a sealed box because it needs one
//! message each way and no extra crate; `hmac` and `sha2` are the RustCrypto
//! implementations, with constant-time verification.
//!
//! ## The node feed
//!
//! A relay running apart from the coordinator (`warren-coordinator relay`)
//! must know which node keys may connect, and must drop a removed node within
//! 2 s. It opens one long-lived request to the coordinator:
//!
//! ```text
//! GET /api/v1/relay/nodes HTTP/1.1
//! Authorization: WarrenRelay key=<relay pubkey b64>, ts=<unix secs>, mac=<b64>
//! ```
//!
//! where `mac = HMAC-SHA256(relay secret, "warren-relay-nodes-v1\n" key "\n" ts)`.
//! The secret is shared by the coordinator and its relays out of band; only a
//! MAC over a timestamp travels, never the secret itself, and the coordinator
//! refuses a timestamp more than [`AUTH_MAX_SKEW_SECS`] away from its clock.
//! The answer is `200` with `Content-Type: application/x-ndjson` and a body
//! that never ends: one [`NodesEvent`] per line, a `snapshot` first, then
//! `add`/`remove` deltas as they happen and a `keepalive` every 15 s. A bad
//! header gets `401` and the usual `{code, message}` JSON error.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::PublicKey;

use crate::keys::{NodeKey, PrivateKey};

use super::CHALLENGE_LEN;

type HmacSha256 = Hmac<Sha256>;

const KDF_LABEL: &[u8] = b"warren relay proof v1";
const TRANSCRIPT_LABEL: &[u8] = b"warren relay hello v1";

/// Why a proof could not be made or was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The other key is a low-order point: the shared secret would be
    /// predictable, so it proves nothing.
    #[error("the peer's key is a low-order point")]
    WeakKey,
    #[error("the proof does not match")]
    Mismatch,
}

fn mac_for(
    ours: &PrivateKey,
    theirs: &NodeKey,
    node_key: &NodeKey,
    relay_key: &NodeKey,
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<HmacSha256, ProofError> {
    let shared = ours.secret().diffie_hellman(&PublicKey::from(theirs.0));
    if !shared.was_contributory() {
        return Err(ProofError::WeakKey);
    }
    let mut kdf = Sha256::new();
    kdf.update(KDF_LABEL);
    kdf.update(shared.as_bytes());
    let k = kdf.finalize();
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&k).map_err(|_| ProofError::Mismatch)?;
    mac.update(TRANSCRIPT_LABEL);
    mac.update(challenge);
    mac.update(node_key.as_bytes());
    mac.update(relay_key.as_bytes());
    Ok(mac)
}

/// The client's proof that it holds `node`'s private key, for this relay and
/// this challenge.
pub fn prove(
    node: &PrivateKey,
    relay_key: &NodeKey,
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<[u8; 32], ProofError> {
    let mac = mac_for(node, relay_key, &node.public(), relay_key, challenge)?;
    Ok(mac.finalize().into_bytes().into())
}

/// The relay's check of a client's proof, in constant time.
pub fn verify(
    relay: &PrivateKey,
    node_key: &NodeKey,
    challenge: &[u8; CHALLENGE_LEN],
    proof: &[u8; 32],
) -> Result<(), ProofError> {
    let relay_key = relay.public();
    let mac = mac_for(relay, node_key, node_key, &relay_key, challenge)?;
    mac.verify_slice(proof).map_err(|_| ProofError::Mismatch)
}

/// A fresh random challenge.
pub fn new_challenge() -> [u8; CHALLENGE_LEN] {
    use rand::RngCore;
    let mut c = [0u8; CHALLENGE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut c);
    c
}

/// The path of the coordinator's node feed.
pub const NODES_PATH: &str = "/api/v1/relay/nodes";
/// How far the header's timestamp may be from the coordinator's clock.
pub const AUTH_MAX_SKEW_SECS: u64 = 60;
/// The coordinator sends a keepalive line this often; the relay treats a
/// silence of three intervals as a dead feed and reconnects.
pub const KEEPALIVE_SECS: u64 = 15;

// v2 binds a nonce: a captured header no longer replays for its minute.
const AUTH_LABEL: &str = "warren-relay-nodes-v2";
/// Bytes of the header's nonce.
pub const NONCE_LEN: usize = 16;

/// One line of the node feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodesEvent {
    /// Every node key that may connect now. Replaces what the relay knew.
    Snapshot {
        nodes: Vec<NodeKey>,
    },
    Add {
        node: NodeKey,
    },
    Remove {
        node: NodeKey,
    },
    Keepalive,
}

/// Why an `Authorization` header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodesAuthError {
    #[error("authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("timestamp is {0} s away from the coordinator's clock")]
    Skew(u64),
    #[error("MAC does not match")]
    Mismatch,
}

/// A header that verified: whose it is, and the nonce and time the
/// coordinator must remember (for [`AUTH_MAX_SKEW_SECS`] each way) to
/// refuse a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedCredentials {
    pub relay: NodeKey,
    pub nonce: [u8; NONCE_LEN],
    pub ts: u64,
}

fn mac(secret: &[u8], relay_key: &NodeKey, ts: u64, nonce: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this never falls back.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new(&Default::default()));
    m.update(format!("{AUTH_LABEL}\n{relay_key}\n{ts}\n").as_bytes());
    m.update(nonce);
    m
}

/// The `Authorization` header value a relay sends at `now_unix`, with a
/// fresh random nonce.
pub fn auth_header(secret: &[u8], relay_key: &NodeKey, now_unix: u64) -> String {
    use rand::RngCore;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    auth_header_with(secret, relay_key, now_unix, &nonce)
}

/// [`auth_header`] with the nonce given (tests).
pub fn auth_header_with(
    secret: &[u8],
    relay_key: &NodeKey,
    now_unix: u64,
    nonce: &[u8; NONCE_LEN],
) -> String {
    let tag = mac(secret, relay_key, now_unix, nonce)
        .finalize()
        .into_bytes();
    format!(
        "WarrenRelay key={relay_key}, ts={now_unix}, nonce={}, mac={}",
        STANDARD.encode(nonce),
        STANDARD.encode(tag)
    )
}

/// The coordinator's check of a relay's header (the caller refuses a
/// nonce it has seen).
pub fn verify_auth_header(
    secret: &[u8],
    header: &str,
    now_unix: u64,
) -> Result<FeedCredentials, NodesAuthError> {
    let rest = header
        .strip_prefix("WarrenRelay ")
        .ok_or(NodesAuthError::Malformed("scheme"))?;
    let (mut key, mut ts, mut tag, mut nonce) = (None, None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(NodesAuthError::Malformed("parameter"))?;
        // Base64 values end in '=', so split only at the first one.
        match k {
            "key" => key = Some(v),
            "ts" => ts = Some(v),
            "mac" => tag = Some(v),
            "nonce" => nonce = Some(v),
            _ => return Err(NodesAuthError::Malformed("unknown parameter")),
        }
    }
    let key: NodeKey = key
        .ok_or(NodesAuthError::Malformed("key missing"))?
        .parse()
        .map_err(|_| NodesAuthError::Malformed("key"))?;
    let ts: u64 = ts
        .ok_or(NodesAuthError::Malformed("ts missing"))?
        .parse()
        .map_err(|_| NodesAuthError::Malformed("ts"))?;
    let tag = STANDARD
        .decode(tag.ok_or(NodesAuthError::Malformed("mac missing"))?)
        .map_err(|_| NodesAuthError::Malformed("mac"))?;
    let nonce: [u8; NONCE_LEN] = STANDARD
        .decode(nonce.ok_or(NodesAuthError::Malformed("nonce missing"))?)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or(NodesAuthError::Malformed("nonce"))?;
    let skew = now_unix.abs_diff(ts);
    if skew > AUTH_MAX_SKEW_SECS {
        return Err(NodesAuthError::Skew(skew));
    }
    mac(secret, &key, ts, &nonce)
        .verify_slice(&tag)
        .map_err(|_| NodesAuthError::Mismatch)?;
    Ok(FeedCredentials {
        relay: key,
        nonce,
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_verifies_only_for_the_right_key_and_challenge() {
        let relay = PrivateKey::generate();
        let node = PrivateKey::generate();
        let other = PrivateKey::generate();
        let ch = new_challenge();
        let proof = prove(&node, &relay.public(), &ch).unwrap();
        assert_eq!(verify(&relay, &node.public(), &ch, &proof), Ok(()));
        // Claiming someone else's key with our proof fails.
        assert_eq!(
            verify(&relay, &other.public(), &ch, &proof),
            Err(ProofError::Mismatch)
        );
        // A replay against a new challenge fails.
        let ch2 = new_challenge();
        assert_eq!(
            verify(&relay, &node.public(), &ch2, &proof),
            Err(ProofError::Mismatch)
        );
        // A proof made for another relay fails.
        let relay2 = PrivateKey::generate();
        let p2 = prove(&node, &relay2.public(), &ch).unwrap();
        assert_eq!(
            verify(&relay, &node.public(), &ch, &p2),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn low_order_key_is_refused() {
        let relay = PrivateKey::generate();
        let zero = NodeKey([0; 32]);
        assert_eq!(
            verify(&relay, &zero, &[1; 32], &[0; 32]),
            Err(ProofError::WeakKey)
        );
        let node = PrivateKey::generate();
        assert_eq!(prove(&node, &zero, &[1; 32]), Err(ProofError::WeakKey));
    }

    #[test]
    fn header_round_trips_and_rejects_tampering() {
        let k = PrivateKey::generate().public();
        let h = auth_header(b"s3cret", &k, 1_000_000);
        let ok = verify_auth_header(b"s3cret", &h, 1_000_030).unwrap();
        assert_eq!((ok.relay, ok.ts), (k, 1_000_000));
        // Two headers of the same second differ by their nonces.
        let h2 = auth_header(b"s3cret", &k, 1_000_000);
        assert_ne!(
            verify_auth_header(b"s3cret", &h2, 1_000_000).unwrap().nonce,
            ok.nonce
        );
        // The nonce is under the MAC.
        let fixed = auth_header_with(b"s3cret", &k, 1_000_000, &[7; NONCE_LEN]);
        let other = STANDARD.encode([8u8; NONCE_LEN]);
        let swapped = fixed.replace(&STANDARD.encode([7u8; NONCE_LEN]), &other);
        assert_eq!(
            verify_auth_header(b"s3cret", &swapped, 1_000_000),
            Err(NodesAuthError::Mismatch)
        );
        assert_eq!(
            verify_auth_header(b"other", &h, 1_000_000),
            Err(NodesAuthError::Mismatch)
        );
        assert_eq!(
            verify_auth_header(b"s3cret", &h, 1_000_000 + 61),
            Err(NodesAuthError::Skew(61))
        );
        let forged = h.replace("ts=1000000", "ts=1000001");
        assert_eq!(
            verify_auth_header(b"s3cret", &forged, 1_000_000),
            Err(NodesAuthError::Mismatch)
        );
        assert!(matches!(
            verify_auth_header(b"s3cret", "Bearer x", 0),
            Err(NodesAuthError::Malformed(_))
        ));
    }

    #[test]
    fn events_are_tagged_json_lines() {
        let k = PrivateKey::generate().public();
        let line = serde_json::to_string(&NodesEvent::Remove { node: k }).unwrap();
        assert_eq!(line, format!(r#"{{"type":"remove","node":"{k}"}}"#));
        let back: NodesEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, NodesEvent::Remove { node: k });
        let snap: NodesEvent = serde_json::from_str(r#"{"type":"snapshot","nodes":[]}"#).unwrap();
        assert_eq!(snap, NodesEvent::Snapshot { nodes: vec![] });
    }
}
