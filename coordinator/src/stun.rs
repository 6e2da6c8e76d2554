//! STUN Binding server (RFC 8489) for the coordinator and stand-alone relays.
//!
//! It answers every Binding request with the source address it saw, as
//! XOR-MAPPED-ADDRESS, and no more than that costs: FINGERPRINT only when
//! the request carried one, SOFTWARE only when the answer still fits in
//! the request's size, and never MAPPED-ADDRESS (RFC 3489 clients, which
//! lack the magic cookie, are not served at all). A spoofed 20-byte request
//! thus gets at most 32 bytes back (44 for IPv6). Over UDP, where a source
//! address can be forged, each source IP also gets at most
//! [`RATE_PER_IP`] answers a second (bursts of [`BURST_PER_IP`]): the server
//! cannot be used to reflect traffic at a victim in volume. The per-IP
//! buckets ([`crate::ratelimit`]) are the only state, and bounded.
//!
//! To let clients tell endpoint-independent from endpoint-dependent NAT
//! mappings, run [`serve`] on two sockets (a second port or address): the
//! server itself is the same. [`serve_tcp`] answers the same requests over
//! TCP (RFC 8489 §6.2.2) on the primary port: an agent behind a network
//! that blocks UDP learns there the public address of its TCP port, which
//! its peers dial for the direct TCP path. The codec is `warren::proto::stun`; this module
//! is only the socket loop and the answer policy, kept self-contained so the
//! coordinator can mount it wherever it wants.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::ratelimit::RateLimiter;
use warren::proto::stun::{self, attr, Class, Message, MessageWriter, StunError};

/// How the server answers.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// SOFTWARE attribute to include, if any.
    pub software: Option<String>,
}

/// Counters, shared with whoever exports metrics.
#[derive(Debug, Default)]
pub struct StunStats {
    /// Binding requests answered with a success response.
    pub answered: AtomicU64,
    /// Requests answered with an error response (420 unknown attribute).
    pub rejected: AtomicU64,
    /// Datagrams dropped without an answer (not STUN, malformed, not a request).
    pub dropped: AtomicU64,
    /// Requests not answered because their source IP was over its rate.
    pub rate_limited: AtomicU64,
}

impl StunStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the server sends back for one datagram, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Success(Vec<u8>),
    Error(Vec<u8>),
    Drop(Option<StunError>),
}

/// The answer policy, without IO, so it is testable on its own.
pub fn answer(datagram: &[u8], from: SocketAddr, options: &ServerOptions) -> Answer {
    // A client on a dual-stack socket shows up as ::ffff:a.b.c.d; it wants to
    // learn its IPv4 address.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    match Message::decode(datagram) {
        Ok(msg) if msg.class != Class::Request || msg.method != stun::METHOD_BINDING => {
            Answer::Drop(None)
        }
        // RFC 5780 §7.2: a server that cannot answer from another address
        // or port refuses CHANGE-REQUEST as an unknown attribute.
        Ok(msg) if msg.change_request.is_some_and(|flags| flags & 0x6 != 0) => {
            Answer::Error(unknown_attribute(msg.transaction_id, attr::CHANGE_REQUEST))
        }
        Ok(msg) => Answer::Success(response_to(&msg, datagram.len(), from, options)),
        // RFC 8489 §6.3.1.1: a request with an attribute we must understand
        // but do not gets 420 and the list of offenders.
        Err(StunError::UnknownRequiredAttribute(unknown)) => match stun::decode_header(datagram) {
            // 0x0001 is the Binding request type (class bits zero).
            Ok((msg_type, tx)) if msg_type == stun::METHOD_BINDING => {
                Answer::Error(unknown_attribute(tx, unknown))
            }
            _ => Answer::Drop(Some(StunError::UnknownRequiredAttribute(unknown))),
        },
        Err(e) => Answer::Drop(Some(e)),
    }
}

/// The smallest useful answer to `req` (see the module doc).
fn response_to(
    req: &Message,
    req_len: usize,
    from: SocketAddr,
    options: &ServerOptions,
) -> Vec<u8> {
    let mut w = MessageWriter::new(
        Class::SuccessResponse,
        stun::METHOD_BINDING,
        req.transaction_id,
    );
    w.xor_mapped_address(from);
    let address_len = if from.is_ipv4() { 12 } else { 24 };
    let fingerprint_len = if req.fingerprint { 8 } else { 0 };
    if let Some(s) = &options.software {
        let software_len = 4 + s.len().div_ceil(4) * 4;
        if 20 + address_len + software_len + fingerprint_len <= req_len {
            w.software(s);
        }
    }
    if req.fingerprint {
        w.finish_with_fingerprint()
    } else {
        w.finish()
    }
}

/// Answers a source IP may get per second over UDP. Agents probe a few
/// times per netcheck; a hundred of them behind one NAT restarting at
/// once still fit in the burst.
pub const RATE_PER_IP: f64 = 100.0;
/// Answers a source IP may get at once.
pub const BURST_PER_IP: f64 = 200.0;

fn unknown_attribute(tx: stun::TransactionId, unknown: u16) -> Vec<u8> {
    let mut w = MessageWriter::new(Class::ErrorResponse, stun::METHOD_BINDING, tx);
    w.error_code(420, "Unknown Attribute")
        .attribute(attr::UNKNOWN_ATTRIBUTES, &unknown.to_be_bytes());
    w.finish_with_fingerprint()
}

/// Serves Binding requests on `socket` until the socket fails or the task is
/// dropped. Transient errors (ICMP feedback surfacing on the socket) are
/// skipped; anything else ends the loop with the error.
pub async fn serve(
    socket: UdpSocket,
    options: ServerOptions,
    stats: Arc<StunStats>,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    tracing::info!(%local, "STUN server listening");
    let mut buf = vec![0u8; stun::MAX_MESSAGE_LEN + 1];
    let mut limiter = RateLimiter::new(RATE_PER_IP, BURST_PER_IP);
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        // Before any parsing: a flood costs a table lookup per datagram.
        if !limiter.allow(from.ip().to_canonical(), Instant::now()) {
            StunStats::bump(&stats.rate_limited);
            continue;
        }
        let reply = match answer(&buf[..n], from, &options) {
            Answer::Success(reply) => {
                StunStats::bump(&stats.answered);
                reply
            }
            Answer::Error(reply) => {
                StunStats::bump(&stats.rejected);
                reply
            }
            Answer::Drop(_) => {
                StunStats::bump(&stats.dropped);
                continue;
            }
        };
        if let Err(e) = socket.send_to(&reply, from).await {
            if !is_transient(&e) {
                return Err(e);
            }
        }
    }
}

/// Most TCP clients served at once; more wait in the accept queue.
const TCP_CLIENTS: usize = 256;
/// A TCP client gets this long for its request(s).
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves Binding requests over TCP: each connection may send a few
/// requests (framed by the STUN header's length) within [`TCP_IDLE`], and
/// is closed on anything that is not a request we answer.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    options: ServerOptions,
    stats: Arc<StunStats>,
) -> io::Result<()> {
    tracing::info!(local = %listener.local_addr()?, "STUN server listening (tcp)");
    let slots = Arc::new(tokio::sync::Semaphore::new(TCP_CLIENTS));
    let options = Arc::new(options);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (conn, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        let (options, stats) = (options.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(TCP_IDLE, serve_conn(conn, from, &options, &stats)).await;
        });
    }
}

async fn serve_conn(
    mut conn: tokio::net::TcpStream,
    from: SocketAddr,
    options: &ServerOptions,
    stats: &StunStats,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; stun::MAX_MESSAGE_LEN];
    for _ in 0..4 {
        conn.read_exact(&mut buf[..20]).await?;
        let len = 20 + usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len > buf.len() {
            StunStats::bump(&stats.dropped);
            return Ok(());
        }
        conn.read_exact(&mut buf[20..len]).await?;
        let reply = match answer(&buf[..len], from, options) {
            Answer::Success(r) => {
                StunStats::bump(&stats.answered);
                r
            }
            Answer::Error(r) => {
                StunStats::bump(&stats.rejected);
                r
            }
            Answer::Drop(_) => {
                StunStats::bump(&stats.dropped);
                return Ok(());
            }
        };
        conn.write_all(&reply).await?;
    }
    Ok(())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use warren::proto::stun::{parse_binding_response, TransactionId};

    fn opts() -> ServerOptions {
        ServerOptions {
            software: Some("warren-test".into()),
        }
    }

    #[test]
    fn answers_binding_request_with_observed_address() {
        let tx = TransactionId([9; 12]);
        let from: SocketAddr = "[::ffff:203.0.113.7]:4242".parse().unwrap();
        let Answer::Success(reply) = answer(&stun::binding_request(tx), from, &opts()) else {
            panic!("no success answer");
        };
        let msg = Message::decode(&reply).unwrap();
        assert_eq!(
            msg.xor_mapped_address,
            Some("203.0.113.7:4242".parse().unwrap())
        );
        assert!(msg.fingerprint, "the request had a fingerprint");
        // No more than needed: the 28-byte request gets 40 bytes, without
        // MAPPED-ADDRESS or SOFTWARE (which would not fit in its size).
        assert_eq!(msg.mapped_address, None);
        assert_eq!(msg.software, None);
        assert_eq!(reply.len(), 40);
    }

    #[test]
    fn a_bare_20_byte_request_gets_32_bytes_and_a_padded_one_more() {
        let tx = TransactionId([5; 12]);
        let from: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let bare = MessageWriter::new(Class::Request, stun::METHOD_BINDING, tx).finish();
        assert_eq!(bare.len(), 20);
        let Answer::Success(reply) = answer(&bare, from, &opts()) else {
            panic!("no answer");
        };
        assert_eq!(reply.len(), 32, "amplification capped at 1.6");
        // A client that sends a SOFTWARE of its own has room for ours.
        let mut w = MessageWriter::new(Class::Request, stun::METHOD_BINDING, tx);
        w.software("a client with a longish name");
        let Answer::Success(reply) = answer(&w.finish_with_fingerprint(), from, &opts()) else {
            panic!("no answer");
        };
        let msg = Message::decode(&reply).unwrap();
        assert_eq!(msg.software.as_deref(), Some("warren-test"));
    }

    #[test]
    fn each_source_ip_gets_a_bounded_rate_of_answers() {
        let mut l = RateLimiter::new(RATE_PER_IP, BURST_PER_IP);
        let t0 = Instant::now();
        let victim: std::net::IpAddr = "192.0.2.50".parse().unwrap();
        let answered = (0..10_000).filter(|_| l.allow(victim, t0)).count();
        assert_eq!(
            answered as f64, BURST_PER_IP,
            "a spoofed flood gets one burst"
        );
        // Another source is not affected.
        assert!(l.allow("192.0.2.51".parse().unwrap(), t0));
        // A second later the rate's worth is back, no more.
        let t1 = t0 + Duration::from_secs(1);
        let later = (0..10_000).filter(|_| l.allow(victim, t1)).count();
        assert_eq!(later as f64, RATE_PER_IP);
    }

    #[test]
    fn drops_responses_garbage_and_answers_420() {
        let tx = TransactionId([1; 12]);
        let from: SocketAddr = "198.51.100.2:1000".parse().unwrap();
        let response = stun::binding_response(tx, from, None);
        assert_eq!(answer(&response, from, &opts()), Answer::Drop(None));
        assert!(matches!(
            answer(&[1, 0, 0, 0, 9, 9, 9, 9], from, &opts()),
            Answer::Drop(Some(StunError::Truncated(8)))
        ));
        let mut w = MessageWriter::new(Class::Request, stun::METHOD_BINDING, tx);
        w.attribute(0x0077, &[0; 4]);
        let Answer::Error(reply) = answer(&w.finish(), from, &opts()) else {
            panic!("expected 420");
        };
        let msg = Message::decode(&reply).unwrap();
        assert_eq!(msg.error_code.map(|e| e.0), Some(420));
        assert_eq!(msg.transaction_id, tx);

        // CHANGE-REQUEST asking for another port: refused; all-zero flags: fine.
        for (flags, refused) in [(0x2u32, true), (0, false)] {
            let mut w = MessageWriter::new(Class::Request, stun::METHOD_BINDING, tx);
            w.attribute(attr::CHANGE_REQUEST, &flags.to_be_bytes());
            let got = answer(&w.finish(), from, &opts());
            assert_eq!(matches!(got, Answer::Error(_)), refused, "flags {flags}");
        }
    }

    /// Two listeners (as for EIM/EDM detection) on loopback, both answering
    /// the same client socket with the same observed address.
    #[tokio::test]
    async fn serves_on_two_ports_over_loopback() {
        let stats = Arc::new(StunStats::default());
        let mut servers = Vec::new();
        for _ in 0..2 {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            servers.push(sock.local_addr().unwrap());
            tokio::spawn(serve(sock, opts(), stats.clone()));
        }
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        client
            .send_to(b"not stun at all, just noise....", servers[0])
            .await
            .unwrap();
        for (i, server) in servers.iter().enumerate() {
            let tx = TransactionId([i as u8; 12]);
            client
                .send_to(&stun::binding_request(tx), server)
                .await
                .unwrap();
            let mut buf = [0u8; 1500];
            let (n, src) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("STUN answer within 5 s")
                .unwrap();
            assert_eq!(src, *server);
            assert_eq!(parse_binding_response(&buf[..n]).unwrap(), (tx, me));
        }
        assert_eq!(stats.answered.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    }

    /// STUN over TCP: two requests on one connection, each answered with
    /// the client's TCP source address; a response sent as a request
    /// closes the connection.
    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stats = Arc::new(StunStats::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = l.local_addr().unwrap();
        tokio::spawn(serve_tcp(l, opts(), stats.clone()));
        let mut c = tokio::net::TcpStream::connect(server).await.unwrap();
        let me = c.local_addr().unwrap();
        for i in 0..2u8 {
            let tx = TransactionId([i; 12]);
            c.write_all(&stun::binding_request(tx)).await.unwrap();
            let mut head = [0u8; 20];
            c.read_exact(&mut head).await.unwrap();
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let mut msg = head.to_vec();
            msg.resize(20 + len, 0);
            c.read_exact(&mut msg[20..]).await.unwrap();
            assert_eq!(parse_binding_response(&msg).unwrap(), (tx, me));
        }
        let tx = TransactionId([7; 12]);
        c.write_all(&stun::binding_response(tx, me, None))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .unwrap();
        assert_eq!(n, 0, "no answer to a response");
        assert_eq!(stats.answered.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    }
}
