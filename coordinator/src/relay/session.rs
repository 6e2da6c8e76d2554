//! One client connection on the relay: handshake, then a reader and a writer.
//!
//! The handshake runs under one deadline: server hello with a fresh
//! challenge, the client's proof of its node key, then admission and the
//! per-node connection limit. A client that fails any step gets a `Refused`
//! frame and is closed before it can send a single packet.
//!
//! After that the connection splits in two. The reader (this task) decodes
//! frames and pushes packets into receivers' queues without waiting. The
//! writer (its own task) drains this client's queue in batches; when the
//! client stops reading, only the writer blocks, the queue fills, and further
//! packets to this client are dropped and counted. A write that makes no
//! progress for `write_timeout` ends the connection.
//!
//! A client arrives either on a raw byte stream (the `Upgrade: warren-relay`
//! path, over TLS or, in labs, plain TCP) or on a WebSocket (for networks
//! whose proxies only pass HTTP). Frames are the same bytes in both; a
//! WebSocket binary message is just a chunk of that byte stream. The session
//! sees only [`RxHalf`] (chunks in) and [`TxHalf`] (chunks out), so both
//! paths share every rule about handshakes, limits and queues.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, Instrument};
use warren::keys::NodeKey;
use warren::proto::relay::{
    auth, Frame, FrameDecoder, FrameError, RefuseReason, CHALLENGE_LEN, PROTOCOL_VERSION,
};

use super::state::{Client, CloseReason, Hub, Metrics};

/// Payload of a client hello: version, node key, proof.
const HELLO_LEN: usize = 1 + 32 + 32;

/// Largest chunk the writer hands to the transport at once.
const WRITE_BATCH: usize = 64 * 1024;

/// Serves one client from hello to close.
pub(crate) async fn run(hub: Arc<Hub>, mut rx: RxHalf, mut tx: TxHalf, addr: Option<SocketAddr>) {
    let peer = addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    // Until the client has proven its key, only a hello fits.
    let mut dec = FrameDecoder::new(HELLO_LEN);
    let Ok(permit) = hub.pending.try_acquire() else {
        Metrics::inc(&hub.metrics.refused_busy);
        return refuse(&hub, tx, None).await;
    };
    // One address holds a bounded share of the handshake places; the
    // place comes back when `slot` drops, also if this task is cancelled.
    let slot = match addr {
        Some(a) => match hub.pending_by_ip.take(a.ip().to_canonical()) {
            Some(s) => Some(s),
            None => {
                drop(permit);
                Metrics::inc(&hub.metrics.refused_busy);
                return refuse(&hub, tx, None).await;
            }
        },
        None => None,
    };
    let deadline = Instant::now() + hub.limits.handshake_timeout;
    let handshook = timeout_at(deadline, handshake(&hub, &mut rx, &mut tx, &mut dec)).await;
    drop(slot);
    drop(permit);
    let key = match handshook {
        Ok(Ok(key)) => key,
        Ok(Err(reason)) => {
            debug!(%peer, ?reason, "relay handshake refused");
            return refuse(&hub, tx, reason).await;
        }
        Err(_) => {
            Metrics::inc(&hub.metrics.handshake_timeouts);
            return refuse(&hub, tx, None).await;
        }
    };
    dec.set_max_payload(hub.limits.max_payload);
    let span = tracing::info_span!("relay", node = %key.short(), %peer);
    async move {
        let Some(client) = hub.register(key) else {
            Metrics::inc(&hub.metrics.refused_too_many);
            return refuse(&hub, tx, Some(RefuseReason::TooManyConnections)).await;
        };
        // A removal that landed between the admission check and register()
        // found nothing to disconnect; asking again closes that window.
        if !hub.admission.is_allowed(&key).await {
            hub.unregister(&client);
            Metrics::inc(&hub.metrics.refused_unknown_key);
            return refuse(&hub, tx, Some(RefuseReason::UnknownKey)).await;
        }
        let via = match rx {
            RxHalf::Stream(_) => &hub.metrics.connections_upgrade,
            RxHalf::Ws(_) => &hub.metrics.connections_websocket,
        };
        Metrics::inc(via);
        info!(
            websocket = matches!(rx, RxHalf::Ws(_)),
            "relay client connected"
        );
        hub.push_control(&client, Frame::Accepted.to_bytes());
        let writer = tokio::spawn(write_loop(hub.clone(), client.clone(), tx).in_current_span());
        let why = read_loop(&hub, &client, &mut rx, &mut dec).await;
        client.request_close(CloseReason::Shutdown);
        hub.unregister(&client);
        let _ = writer.await;
        info!(reason = why, "relay client disconnected");
    }
    .instrument(span)
    .await;
}

/// Tells the client why (if there is a reason to give) and closes, never
/// waiting longer than the write timeout on a client that does not read.
async fn refuse(hub: &Hub, mut tx: TxHalf, reason: Option<RefuseReason>) {
    if let Some(reason) = reason {
        let bye = Frame::Refused { reason }.to_bytes();
        let _ = timeout(hub.limits.write_timeout, tx.write(bye)).await;
    }
    let _ = timeout(hub.limits.write_timeout, tx.shutdown()).await;
}

/// Runs the handshake. `Err(Some(reason))` is told to the client,
/// `Err(None)` (garbage, early close) just closes.
async fn handshake(
    hub: &Hub,
    rx: &mut RxHalf,
    tx: &mut TxHalf,
    dec: &mut FrameDecoder,
) -> Result<NodeKey, Option<RefuseReason>> {
    let challenge: [u8; CHALLENGE_LEN] = auth::new_challenge();
    let hello = Frame::ServerHello {
        version: PROTOCOL_VERSION,
        relay_key: hub.key.public(),
        challenge,
    };
    tx.write(hello.to_bytes()).await.map_err(|_| None)?;
    let read_hello = async {
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(_) => {
                    Metrics::inc(&hub.metrics.drop_bad_frame);
                    return Err(None);
                }
            }
            match rx.read_into(dec).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    };
    // The client's hello is one small frame: a client that stays silent
    // gives its place back after `hello_timeout`, not the whole handshake
    // deadline.
    let frame = match timeout(hub.limits.hello_timeout, read_hello).await {
        Ok(r) => r?,
        Err(_) => {
            Metrics::inc(&hub.metrics.handshake_timeouts);
            return Err(None);
        }
    };
    let Frame::ClientHello {
        version,
        node_key,
        proof,
    } = frame
    else {
        Metrics::inc(&hub.metrics.drop_bad_frame);
        return Err(None);
    };
    if version != PROTOCOL_VERSION {
        return Err(Some(RefuseReason::Version));
    }
    // Proof first: only the key's holder learns whether it is admitted.
    if auth::verify(&hub.key, &node_key, &challenge, &proof).is_err() {
        Metrics::inc(&hub.metrics.refused_bad_proof);
        return Err(Some(RefuseReason::BadProof));
    }
    if !hub.admission.is_allowed(&node_key).await {
        Metrics::inc(&hub.metrics.refused_unknown_key);
        return Err(Some(RefuseReason::UnknownKey));
    }
    Ok(node_key)
}

/// Decodes frames until the client leaves, errs, idles out or is closed.
/// Returns why it stopped, for the log.
async fn read_loop(
    hub: &Hub,
    client: &Client,
    rx: &mut RxHalf,
    dec: &mut FrameDecoder,
) -> &'static str {
    let mut closed = client.close.subscribe();
    loop {
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(why) = on_frame(hub, client, frame) {
                        Metrics::inc(&hub.metrics.drop_bad_frame);
                        return why;
                    }
                }
                Ok(None) => break,
                Err(FrameError::UnknownType(_)) => Metrics::inc(&hub.metrics.drop_bad_frame),
                Err(_) => {
                    Metrics::inc(&hub.metrics.drop_bad_frame);
                    return "bad frame";
                }
            }
        }
        tokio::select! {
            r = timeout(hub.limits.idle_timeout, rx.read_into(dec)) => match r {
                Err(_) => return "idle timeout",
                Ok(Ok(0)) => return "closed by client",
                Ok(Err(_)) => return "read error",
                Ok(Ok(n)) => {
                    hub.metrics.bytes_in.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            },
            _ = closed.wait_for(|c| c.is_some()) => return "closed by relay",
        }
    }
}

fn on_frame(hub: &Hub, client: &Client, frame: Frame) -> Result<(), &'static str> {
    match frame {
        Frame::SendPacket { dest, packet } => {
            Metrics::inc(&hub.metrics.packets_in);
            hub.forward(&client.key, &dest, &packet);
        }
        Frame::Ping(d) => hub.push_control(client, Frame::Pong(d).to_bytes()),
        Frame::HealthRequest => {
            let h = Frame::Health(hub.metrics.snapshot());
            hub.push_control(client, h.to_bytes());
        }
        Frame::KeepAlive | Frame::Pong(_) => {}
        _ => return Err("unexpected frame"),
    }
    Ok(())
}

/// Drains the client's queue onto the transport.
async fn write_loop(hub: Arc<Hub>, client: Arc<Client>, mut tx: TxHalf) {
    let mut closed = client.close.subscribe();
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    let mut buf = BytesMut::with_capacity(WRITE_BATCH + 4096);
    loop {
        batch.clear();
        let packets = hub.pop_batch(&client, &mut batch, WRITE_BATCH) as u64;
        if batch.is_empty() {
            tokio::select! {
                _ = client.wake.notified() => continue,
                _ = closed.wait_for(|c| c.is_some()) => break,
            }
        }
        for f in &batch {
            buf.extend_from_slice(f);
        }
        let chunk = buf.split().freeze();
        let n = chunk.len() as u64;
        tokio::select! {
            r = timeout(hub.limits.write_timeout, tx.write(chunk)) => match r {
                Ok(Ok(())) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    hub.metrics.bytes_out.fetch_add(n, Relaxed);
                    hub.metrics.packets_forwarded.fetch_add(packets, Relaxed);
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    Metrics::inc(&hub.metrics.drop_write_timeout);
                    client.request_close(CloseReason::WriteTimeout);
                    break;
                }
            },
            _ = closed.wait_for(|c| c.is_some()) => break,
        }
    }
    let why = *client.close.borrow();
    if why == Some(CloseReason::Removed) {
        let bye = Frame::Refused {
            reason: RefuseReason::Removed,
        };
        let _ = timeout(hub.limits.write_timeout, tx.write(bye.to_bytes())).await;
    }
    client.request_close(CloseReason::Shutdown);
    let _ = timeout(hub.limits.write_timeout, tx.shutdown()).await;
}

/// Any byte stream the relay can serve a client on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Splits a transport into its receiving and sending halves.
pub(crate) fn from_stream(io: Box<dyn Io>) -> (RxHalf, TxHalf) {
    let (r, w) = tokio::io::split(io);
    (RxHalf::Stream(r), TxHalf::Stream(w))
}

pub(crate) fn from_websocket(ws: WebSocket) -> (RxHalf, TxHalf) {
    let (w, r) = ws.split();
    (RxHalf::Ws(r), TxHalf::Ws(w))
}

pub(crate) enum RxHalf {
    Stream(ReadHalf<Box<dyn Io>>),
    Ws(SplitStream<WebSocket>),
}

impl RxHalf {
    /// Reads the next chunk into the decoder. Returns the number of bytes
    /// added; `0` means the client closed the connection. Cancel-safe.
    pub async fn read_into(&mut self, dec: &mut FrameDecoder) -> io::Result<usize> {
        match self {
            RxHalf::Stream(r) => {
                let buf = dec.buffer_mut();
                buf.reserve(16 * 1024);
                r.read_buf(buf).await
            }
            RxHalf::Ws(r) => loop {
                match r.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                        dec.extend(&b);
                        return Ok(b.len());
                    }
                    // Control messages are answered by the WebSocket layer;
                    // empty binary messages carry nothing.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_))) => {}
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text message on a binary relay socket",
                        ))
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                }
            },
        }
    }
}

pub(crate) enum TxHalf {
    Stream(WriteHalf<Box<dyn Io>>),
    Ws(SplitSink<WebSocket, Message>),
}

impl TxHalf {
    /// Writes one chunk of frames and flushes it.
    pub async fn write(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            TxHalf::Stream(w) => {
                w.write_all(&data).await?;
                w.flush().await
            }
            TxHalf::Ws(w) => w
                .send(Message::Binary(data))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Ends the connection politely; errors are irrelevant by then.
    pub async fn shutdown(&mut self) {
        match self {
            TxHalf::Stream(w) => {
                let _ = w.shutdown().await;
            }
            TxHalf::Ws(w) => {
                let _ = w.send(Message::Close(None)).await;
                let _ = w.close().await;
            }
        }
    }
}
