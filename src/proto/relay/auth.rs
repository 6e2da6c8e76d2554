//! Proof of node key for the relay handshake.
//!
//! The relay opens with its X25519 public key and a fresh random challenge.
//! The client answers with `HMAC-SHA256(k, transcript)` where
//! `k = SHA-256("warren relay proof v1" || X25519(node private, relay public))`
//! and the transcript binds the challenge, the node key and the relay key.
//! Only the holder of the node's private key (or of the relay's) can compute
//! `k`, so the relay learns that the client owns the key it claims without any
//! bearer secret crossing the wire (DESIGN §2). The challenge is fresh per
//! connection, so a recorded proof is useless later.
//!
//! A static-static DH MAC was chosen over a sealed box because it needs one
//! message each way and no extra crate; `hmac` and `sha2` are the RustCrypto
//! implementations, with constant-time verification.

use hmac::{Hmac, Mac};
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
}
