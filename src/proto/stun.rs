//! STUN (RFC 8489) message codec, sans-IO.
//!
//! warren only needs the Binding method without authentication: the agent asks
//! "what address do you see me as?" and the coordinator/relays answer. That is
//! a small, fixed subset, so the codec is our own instead
//! of a general STUN stack: the general crates pull in attribute families we
//! never use, allocate per attribute, and make the "never panic, typed error"
//! contract harder to audit. The well-kept `stun_codec` crate is used only as a
//! dev-dependency to cross-check our bytes in both directions.
//!
//! What the decoder enforces, because STUN arrives on the agent's shared UDP
//! socket from anyone:
//! - the datagram is exactly one message (header length == datagram length),
//!   no larger than [`MAX_MESSAGE_LEN`];
//! - the first two bits are zero and the magic cookie is present;
//! - every attribute fits in the buffer; a comprehension-required attribute we
//!   do not know is an error (RFC 8489 §7.3.1), optional ones are skipped;
//! - FINGERPRINT, when present, is last and matches.
//!
//! Matching a response to an outstanding transaction is the caller's job
//! (netcheck keeps the table); the codec only exposes the transaction id.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::RngCore;

/// The fixed magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Largest message we accept or produce. Binding traffic is tiny; anything
/// near an MTU is hostile or not for us.
pub const MAX_MESSAGE_LEN: usize = 1280;
/// XOR constant applied to the CRC-32 in FINGERPRINT (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// The Binding method.
pub const METHOD_BINDING: u16 = 0x0001;
/// Longest SOFTWARE value we write (RFC 8489 §14.14: < 128 characters).
pub const MAX_SOFTWARE_LEN: usize = 127;

/// Attribute type codes we understand.
pub mod attr {
    /// MAPPED-ADDRESS (RFC 3489 clients still read it).
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// CHANGE-REQUEST (RFC 5780). Decoded so a server can refuse a change
    /// it cannot make (420) instead of silently answering from the same
    /// address, which would mislead the client's filtering test.
    pub const CHANGE_REQUEST: u16 = 0x0003;
    /// USERNAME: understood (ignored) since we never authenticate.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY: understood (not verified) for the same reason.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// MESSAGE-INTEGRITY-SHA256: understood (not verified).
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Errors from decoding a STUN message. Every variant is a reason to drop the
/// datagram; callers count them rather than log each one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    #[error("datagram of {0} bytes is shorter than a STUN header")]
    Truncated(usize),
    #[error("datagram of {0} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    Oversized(usize),
    #[error("first two bits are not zero")]
    NotStun,
    #[error("wrong magic cookie {0:#010x}")]
    BadMagicCookie(u32),
    #[error("header length {header} does not match the {actual} bytes after the header")]
    LengthMismatch { header: usize, actual: usize },
    #[error("attribute {attr_type:#06x} of length {len} runs past the end of the message")]
    AttributeOverflow { attr_type: u16, len: usize },
    #[error("unknown comprehension-required attribute {0:#06x}")]
    UnknownRequiredAttribute(u16),
    #[error("attribute {attr_type:#06x} has invalid length {len}")]
    BadAttributeLength { attr_type: u16, len: usize },
    #[error("unknown address family {0:#04x}")]
    BadAddressFamily(u8),
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
    #[error("attribute after FINGERPRINT")]
    FingerprintNotLast,
    #[error("SOFTWARE is not UTF-8")]
    BadSoftware,
    #[error("transaction id does not match any outstanding request")]
    WrongTransaction,
    #[error("message is not a Binding success response")]
    NotBindingResponse,
    #[error("response carries no usable mapped address")]
    NoMappedAddress,
}

/// The 96-bit transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// A fresh id from the given random source (the caller chooses it so the
    /// sans-IO state machines can run on a seeded generator).
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut id = [0u8; 12];
        rng.fill_bytes(&mut id);
        Self(id)
    }
}

/// The message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    SuccessResponse,
    ErrorResponse,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x0000,
            Class::Indication => 0x0010,
            Class::SuccessResponse => 0x0100,
            Class::ErrorResponse => 0x0110,
        }
    }

    fn from_type(msg_type: u16) -> Self {
        match msg_type & 0x0110 {
            0x0000 => Class::Request,
            0x0010 => Class::Indication,
            0x0100 => Class::SuccessResponse,
            _ => Class::ErrorResponse,
        }
    }
}

/// Interleaves the 12-bit method with the class bits (RFC 8489 Figure 3).
fn message_type(class: Class, method: u16) -> u16 {
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | class.bits()
}

fn method_of(msg_type: u16) -> u16 {
    (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
}

/// A decoded STUN message, reduced to what warren uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub class: Class,
    pub method: u16,
    pub transaction_id: TransactionId,
    pub xor_mapped_address: Option<SocketAddr>,
    pub mapped_address: Option<SocketAddr>,
    pub software: Option<String>,
    /// ERROR-CODE as (code, reason phrase).
    pub error_code: Option<(u16, String)>,
    /// CHANGE-REQUEST flags (0x4 change IP, 0x2 change port), if present.
    pub change_request: Option<u32>,
    /// Whether a (valid) FINGERPRINT was present.
    pub fingerprint: bool,
    /// How many comprehension-optional attributes were skipped.
    pub skipped_optional: usize,
}

impl Message {
    /// The mapped address a client should believe: XOR-MAPPED-ADDRESS, or
    /// MAPPED-ADDRESS from an RFC 3489 server.
    pub fn reflexive_address(&self) -> Option<SocketAddr> {
        self.xor_mapped_address.or(self.mapped_address)
    }

    /// Decodes one datagram as a STUN message.
    pub fn decode(buf: &[u8]) -> Result<Self, StunError> {
        let (msg_type, transaction_id) = decode_header(buf)?;
        let mut msg = Message {
            class: Class::from_type(msg_type),
            method: method_of(msg_type),
            transaction_id,
            xor_mapped_address: None,
            mapped_address: None,
            software: None,
            error_code: None,
            change_request: None,
            fingerprint: false,
            skipped_optional: 0,
        };
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            let (attr_type, value) = next_attribute(buf, pos)?;
            match attr_type {
                attr::XOR_MAPPED_ADDRESS => {
                    msg.xor_mapped_address =
                        Some(decode_address(attr_type, value, Some(&transaction_id))?)
                }
                attr::MAPPED_ADDRESS => {
                    msg.mapped_address = Some(decode_address(attr_type, value, None)?)
                }
                attr::SOFTWARE => {
                    let s = std::str::from_utf8(value).map_err(|_| StunError::BadSoftware)?;
                    msg.software = Some(s.to_owned());
                }
                attr::ERROR_CODE => msg.error_code = Some(decode_error_code(value)?),
                attr::FINGERPRINT => {
                    check_fingerprint(buf, pos, value)?;
                    msg.fingerprint = true;
                }
                attr::CHANGE_REQUEST => {
                    let flags: [u8; 4] =
                        value
                            .try_into()
                            .map_err(|_| StunError::BadAttributeLength {
                                attr_type,
                                len: value.len(),
                            })?;
                    msg.change_request = Some(u32::from_be_bytes(flags));
                }
                attr::USERNAME
                | attr::MESSAGE_INTEGRITY
                | attr::MESSAGE_INTEGRITY_SHA256
                | attr::UNKNOWN_ATTRIBUTES => {}
                t if t < 0x8000 => return Err(StunError::UnknownRequiredAttribute(t)),
                _ => msg.skipped_optional += 1,
            }
            pos += 4 + padded(value.len());
        }
        Ok(msg)
    }
}

/// Checks the fixed header and returns (message type, transaction id).
///
/// Also used by servers that must answer a message whose attributes failed
/// to decode (RFC 8489 §6.3.1: 420 for unknown required attributes).
pub fn decode_header(buf: &[u8]) -> Result<(u16, TransactionId), StunError> {
    if buf.len() < HEADER_LEN {
        return Err(StunError::Truncated(buf.len()));
    }
    if buf.len() > MAX_MESSAGE_LEN {
        return Err(StunError::Oversized(buf.len()));
    }
    if buf[0] & 0xC0 != 0 {
        return Err(StunError::NotStun);
    }
    let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if cookie != MAGIC_COOKIE {
        return Err(StunError::BadMagicCookie(cookie));
    }
    let header = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let actual = buf.len() - HEADER_LEN;
    if header != actual || header % 4 != 0 {
        return Err(StunError::LengthMismatch { header, actual });
    }
    let msg_type = u16::from_be_bytes([buf[0], buf[1]]);
    let mut id = [0u8; 12];
    id.copy_from_slice(&buf[8..HEADER_LEN]);
    Ok((msg_type, TransactionId(id)))
}

/// Cheap demultiplexing test for the shared agent socket: WireGuard messages
/// start with 1..=4 followed by three zero bytes and disco with its 6-byte
/// magic, so "top bits zero + cookie + length field matches the datagram"
/// tells STUN apart without parsing attributes. (A WireGuard message has a
/// zero STUN length field but is never 20 bytes long.)
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf.len() <= MAX_MESSAGE_LEN
        && buf[0] & 0xC0 == 0
        && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([buf[2], buf[3]])) == buf.len() - HEADER_LEN
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Reads the attribute starting at `pos`: (type, unpadded value).
fn next_attribute(buf: &[u8], pos: usize) -> Result<(u16, &[u8]), StunError> {
    let head = buf.get(pos..pos + 4).ok_or(StunError::AttributeOverflow {
        attr_type: 0,
        len: buf.len() - pos,
    })?;
    let attr_type = u16::from_be_bytes([head[0], head[1]]);
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let start = pos + 4;
    if start + padded(len) > buf.len() {
        return Err(StunError::AttributeOverflow { attr_type, len });
    }
    Ok((attr_type, &buf[start..start + len]))
}

fn decode_address(
    attr_type: u16,
    value: &[u8],
    xor_with: Option<&TransactionId>,
) -> Result<SocketAddr, StunError> {
    let bad_len = StunError::BadAttributeLength {
        attr_type,
        len: value.len(),
    };
    if value.len() < 4 {
        return Err(bad_len);
    }
    let mut port = u16::from_be_bytes([value[2], value[3]]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor_with.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match value[1] {
        0x01 => {
            let raw: [u8; 4] = value[4..].try_into().map_err(|_| bad_len)?;
            let mut octets = raw;
            if xor_with.is_some() {
                octets.iter_mut().zip(cookie).for_each(|(o, k)| *o ^= k);
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        0x02 => {
            let raw: [u8; 16] = value[4..].try_into().map_err(|_| bad_len)?;
            let mut octets = raw;
            if let Some(tx) = xor_with {
                let key = cookie.iter().chain(tx.0.iter());
                octets.iter_mut().zip(key).for_each(|(o, k)| *o ^= k);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        family => return Err(StunError::BadAddressFamily(family)),
    };
    Ok(SocketAddr::new(ip, port))
}

fn decode_error_code(value: &[u8]) -> Result<(u16, String), StunError> {
    if value.len() < 4 {
        return Err(StunError::BadAttributeLength {
            attr_type: attr::ERROR_CODE,
            len: value.len(),
        });
    }
    let code = u16::from(value[2] & 0x07) * 100 + u16::from(value[3]);
    let reason = String::from_utf8_lossy(&value[4..]).into_owned();
    Ok((code, reason))
}

fn check_fingerprint(buf: &[u8], pos: usize, value: &[u8]) -> Result<(), StunError> {
    let got: [u8; 4] = value
        .try_into()
        .map_err(|_| StunError::BadAttributeLength {
            attr_type: attr::FINGERPRINT,
            len: value.len(),
        })?;
    // FINGERPRINT must be last, and then the header length already counts
    // it, exactly as the CRC input requires.
    if pos + 8 != buf.len() {
        return Err(StunError::FingerprintNotLast);
    }
    if fingerprint(&buf[..pos]) != u32::from_be_bytes(got) {
        return Err(StunError::BadFingerprint);
    }
    Ok(())
}

fn fingerprint(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes) ^ FINGERPRINT_XOR
}

/// Builds one STUN message. Attributes are appended in call order; the header
/// length is fixed up by `finish*`.
#[derive(Debug, Clone)]
pub struct MessageWriter {
    buf: Vec<u8>,
    transaction_id: TransactionId,
}

impl MessageWriter {
    pub fn new(class: Class, method: u16, transaction_id: TransactionId) -> Self {
        let mut buf = Vec::with_capacity(96);
        buf.extend_from_slice(&message_type(class, method).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction_id.0);
        Self {
            buf,
            transaction_id,
        }
    }

    /// Appends any attribute, padding its value to 4 bytes. Values longer
    /// than a u16 are cut, which only our own code could attempt.
    pub fn attribute(&mut self, attr_type: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(usize::from(u16::MAX))];
        self.buf.extend_from_slice(&attr_type.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf
            .resize(HEADER_LEN + padded(self.buf.len() - HEADER_LEN), 0);
        self
    }

    pub fn xor_mapped_address(&mut self, addr: SocketAddr) -> &mut Self {
        let value = encode_address(addr, Some(&self.transaction_id));
        self.attribute(attr::XOR_MAPPED_ADDRESS, &value)
    }

    pub fn mapped_address(&mut self, addr: SocketAddr) -> &mut Self {
        self.attribute(attr::MAPPED_ADDRESS, &encode_address(addr, None))
    }

    /// SOFTWARE, cut at a character boundary to the RFC's limit.
    pub fn software(&mut self, software: &str) -> &mut Self {
        let mut end = software.len().min(MAX_SOFTWARE_LEN);
        while !software.is_char_boundary(end) {
            end -= 1;
        }
        self.attribute(attr::SOFTWARE, &software.as_bytes()[..end])
    }

    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut value = vec![0, 0, ((code / 100) & 0x07) as u8, (code % 100) as u8];
        value.extend_from_slice(reason.as_bytes());
        self.attribute(attr::ERROR_CODE, &value)
    }

    /// The finished message without FINGERPRINT.
    pub fn finish(mut self) -> Vec<u8> {
        self.set_length(0);
        self.buf
    }

    /// The finished message with FINGERPRINT as its last attribute.
    pub fn finish_with_fingerprint(mut self) -> Vec<u8> {
        self.set_length(8);
        let crc = fingerprint(&self.buf);
        self.buf.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf
    }

    fn set_length(&mut self, extra: usize) {
        let len = (self.buf.len() - HEADER_LEN + extra) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }
}

fn encode_address(addr: SocketAddr, xor_with: Option<&TransactionId>) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = addr.port();
    if xor_with.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let mut value = vec![0];
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            let mut octets = ip.octets();
            if xor_with.is_some() {
                octets.iter_mut().zip(cookie).for_each(|(o, k)| *o ^= k);
            }
            value.extend_from_slice(&octets);
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mut octets = ip.octets();
            if let Some(tx) = xor_with {
                let key = cookie.iter().chain(tx.0.iter());
                octets.iter_mut().zip(key).for_each(|(o, k)| *o ^= k);
            }
            value.extend_from_slice(&octets);
        }
    }
    value
}

/// A Binding request as warren's clients send it: no attributes but
/// FINGERPRINT, which lets servers on shared sockets demultiplex it.
pub fn binding_request(transaction_id: TransactionId) -> Vec<u8> {
    MessageWriter::new(Class::Request, METHOD_BINDING, transaction_id).finish_with_fingerprint()
}

/// A Binding success response: XOR-MAPPED-ADDRESS, MAPPED-ADDRESS for RFC
/// 3489 clients, optional SOFTWARE, FINGERPRINT.
pub fn binding_response(
    transaction_id: TransactionId,
    observed: SocketAddr,
    software: Option<&str>,
) -> Vec<u8> {
    let mut w = MessageWriter::new(Class::SuccessResponse, METHOD_BINDING, transaction_id);
    w.xor_mapped_address(observed).mapped_address(observed);
    if let Some(s) = software {
        w.software(s);
    }
    w.finish_with_fingerprint()
}

impl Message {
    /// The mapped address of a Binding success response, checked for use as
    /// an endpoint (no port 0, no unspecified address).
    pub fn binding_mapped_address(&self) -> Result<SocketAddr, StunError> {
        if self.class != Class::SuccessResponse || self.method != METHOD_BINDING {
            return Err(StunError::NotBindingResponse);
        }
        let addr = self.reflexive_address().ok_or(StunError::NoMappedAddress)?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(StunError::NoMappedAddress);
        }
        Ok(addr)
    }
}

/// Decodes a datagram as a Binding success response and returns its
/// transaction id and reflexive address.
pub fn parse_binding_response(buf: &[u8]) -> Result<(TransactionId, SocketAddr), StunError> {
    let msg = Message::decode(buf)?;
    Ok((msg.transaction_id, msg.binding_mapped_address()?))
}

#[cfg(test)]
mod tests;
