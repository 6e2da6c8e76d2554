//! The resolver's sockets (README, "Names and DNS"): UDP and TCP on the
//! resolver's address, and the queries it forwards.
//!
//! Tasks: one UDP receive loop and one TCP accept loop per address, a task
//! per TCP connection (at most [`MAX_TCP`] at once, each message read
//! within [`TCP_IDLE`]), and a task per forwarded query (at most
//! [`MAX_FORWARDS`] in flight; beyond that a query gets SERVFAIL rather
//! than queueing without bound). The decisions are the sans-IO
//! `dns::Resolver`'s, behind a mutex held only for one call, never across
//! an await.
//!
//! Forwarding asks each upstream in turn: UDP with a fresh random id from
//! a fresh port (so an answer is checked by source, port and id), within
//! [`UPSTREAM_TIMEOUT`]; a truncated answer is asked again over TCP. Its
//! sockets are not marked (`crate::sockmark`): under an exit node, queries
//! to the internet's resolvers leave through it, as the user asked.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::dns::{Decision, Forward, Resolver};

/// Longest wait for one upstream over UDP, and over TCP.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Most queries forwarded at once.
pub const MAX_FORWARDS: usize = 256;
/// Most TCP connections from clients at once, and how long one may wait
/// for its next message.
pub const MAX_TCP: usize = 64;
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The shared resolver.
pub type Shared = Arc<Mutex<Resolver>>;

fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Resolver> {
    // A panic inside one call leaves the resolver usable.
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves DNS on `addr` over UDP and TCP (both bound before either
/// serves, so a half-open listener never exists).
pub fn listen(addr: SocketAddr, resolver: &Shared, forwards: &Arc<Semaphore>) -> io::Result<()> {
    use socket2::{Domain, Socket, Type};
    // Free-bind: a new IPv6 address is tentative for a moment after it is
    // added (duplicate address detection); the socket binds at once.
    let bind = |ty: Type| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), ty, None)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
            s.set_freebind_v6(true)?;
        } else {
            s.set_freebind_v4(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    let udp = bind(Type::DGRAM)?;
    let tcp = bind(Type::STREAM)?;
    tcp.listen(128)?;
    let udp = UdpSocket::from_std(std::net::UdpSocket::from(udp))?;
    let tcp = TcpListener::from_std(std::net::TcpListener::from(tcp))?;
    tokio::spawn(serve_udp(Arc::new(udp), resolver.clone(), forwards.clone()));
    tokio::spawn(serve_tcp(tcp, resolver.clone(), forwards.clone()));
    Ok(())
}

/// Handles one query to its reply (forwarding if the resolver says so);
/// `None`: nothing to answer. Also what `warren dns query` runs.
pub async fn resolve(
    resolver: &Shared,
    forwards: &Semaphore,
    wire: &[u8],
    udp: bool,
) -> Option<(Vec<u8>, crate::dns::Source)> {
    let decision = lock(resolver).handle_query(Instant::now(), wire, udp);
    match decision {
        Decision::Reply { wire, source } => Some((wire, source)),
        Decision::Drop => None,
        Decision::Forward(f) => {
            let answer = match forwards.try_acquire() {
                Ok(_permit) => forward(&f).await,
                Err(_) => None,
            };
            let reply = lock(resolver).handle_answer(Instant::now(), &f, answer.as_deref());
            Some((reply, f.source.clone()))
        }
    }
}

/// Serves UDP queries on `sock` until it fails.
pub async fn serve_udp(sock: Arc<UdpSocket>, resolver: Shared, forwards: Arc<Semaphore>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "DNS: UDP receive failed; the listener stops");
                return;
            }
        };
        let wire = buf[..n].to_vec();
        let (sock, resolver, forwards) = (sock.clone(), resolver.clone(), forwards.clone());
        // Local answers are quick; a task per query keeps a slow upstream
        // from holding up the names of the network.
        tokio::spawn(async move {
            if let Some((reply, _)) = resolve(&resolver, &forwards, &wire, true).await {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

/// Serves TCP clients on `listener` until it fails.
pub async fn serve_tcp(listener: TcpListener, resolver: Shared, forwards: Arc<Semaphore>) {
    let conns = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "DNS: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let (resolver, forwards) = (resolver.clone(), forwards.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp_client(stream, &resolver, &forwards).await;
        });
    }
}

async fn tcp_client(mut s: TcpStream, resolver: &Shared, forwards: &Semaphore) -> io::Result<()> {
    loop {
        let msg = match tokio::time::timeout(TCP_IDLE, read_framed(&mut s)).await {
            Ok(Ok(Some(m))) => m,
            _ => return Ok(()),
        };
        match resolve(resolver, forwards, &msg, false).await {
            Some((reply, _)) => write_framed(&mut s, &reply).await?,
            None => return Ok(()),
        }
    }
}

/// One DNS message over TCP (RFC 1035 §4.2.2: a two-byte length first);
/// `None` at a clean end of stream.
async fn read_framed(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// Asks the upstreams in turn; the first answer wins.
pub async fn forward(f: &Forward) -> Option<Vec<u8>> {
    for up in &f.upstreams {
        let id: u16 = rand::random();
        let mut q = f.wire.clone();
        if q.len() < 12 {
            return None;
        }
        q[..2].copy_from_slice(&id.to_be_bytes());
        match udp_exchange(*up, &q, id).await {
            Some(a) if truncated(&a) => {
                // Too big for a datagram: the whole answer over TCP, or
                // the truncated one if TCP fails (the client retries).
                return Some(tcp_exchange(*up, &q, id).await.unwrap_or(a));
            }
            Some(a) => return Some(a),
            None => tracing::debug!(upstream = %up, "DNS: no answer; trying the next upstream"),
        }
    }
    None
}

fn truncated(answer: &[u8]) -> bool {
    answer.len() > 2 && answer[2] & 0x02 != 0
}

fn id_of(answer: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*answer.first()?, *answer.get(1)?]))
}

async fn udp_exchange(up: SocketAddr, q: &[u8], id: u16) -> Option<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    // Connected: the kernel drops datagrams from anyone but `up`.
    sock.connect(up).await.ok()?;
    sock.send(q).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        // Another id is a late or forged answer: keep waiting.
        if id_of(&buf[..n]) == Some(id) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

async fn tcp_exchange(up: SocketAddr, q: &[u8], id: u16) -> Option<Vec<u8>> {
    let run = async {
        let mut s = TcpStream::connect(up).await.ok()?;
        write_framed(&mut s, q).await.ok()?;
        let a = read_framed(&mut s).await.ok()??;
        (id_of(&a) == Some(id)).then_some(a)
    };
    tokio::time::timeout(TCP_UPSTREAM_TIMEOUT, run).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::resolver::build_query;
    use hickory_proto::op::Message;
    use hickory_proto::rr::RecordType;

    /// An upstream on loopback that answers every UDP query truncated and
    /// every TCP query in full (two A records), counting TCP queries.
    async fn upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let answer = |q: &[u8], tc: bool| {
            let req = Message::from_vec(q).unwrap();
            let mut m = Message::response(req.metadata.id, req.metadata.op_code);
            m.add_queries(req.queries.iter().cloned());
            m.metadata.truncation = tc;
            if !tc {
                let name = req.queries[0].name().clone();
                for i in 1..=2u8 {
                    let rd = hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(
                        [192, 0, 2, i].into(),
                    ));
                    m.add_answer(hickory_proto::rr::Record::from_rdata(name.clone(), 60, rd));
                }
            }
            m.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&answer(&buf[..n], true), from).await;
            }
        });
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(Some(q)) = read_framed(&mut s).await {
                    let _ = write_framed(&mut s, &answer(&q, false)).await;
                }
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn a_truncated_upstream_answer_is_asked_again_over_tcp() {
        let (up, tcp_queries) = upstream().await;
        let resolver: Shared = Arc::default();
        lock(&resolver).set_host_resolvers(vec![crate::dns::Upstream(up)]);
        let forwards = Semaphore::new(4);
        let q = build_query(77, "big.example", RecordType::A).unwrap();
        let (reply, source) = resolve(&resolver, &forwards, &q, true).await.unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, 77);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 2);
        assert_eq!(source, crate::dns::Source::Host);
        assert_eq!(tcp_queries.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_silent_upstream_gives_servfail_after_trying_the_next() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (up, _) = upstream().await;
        let resolver: Shared = Arc::default();
        lock(&resolver).set_host_resolvers(vec![
            crate::dns::Upstream(silent.local_addr().unwrap()),
            crate::dns::Upstream(up),
        ]);
        let forwards = Semaphore::new(4);
        let q = build_query(5, "x.example", RecordType::A).unwrap();
        let t = Instant::now();
        let (reply, _) = resolve(&resolver, &forwards, &q, false).await.unwrap();
        assert!(t.elapsed() >= UPSTREAM_TIMEOUT);
        assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 2);
        // With no permit left, a forward is SERVFAIL at once.
        let none = Semaphore::new(0);
        let q = build_query(6, "y.example", RecordType::A).unwrap();
        let (reply, _) = resolve(&resolver, &none, &q, false).await.unwrap();
        assert_eq!(
            Message::from_vec(&reply).unwrap().metadata.response_code,
            hickory_proto::op::ResponseCode::ServFail
        );
    }
}
