//! The two ways frames reach the relay, behind one read/write interface.
//!
//! A client arrives either on a raw byte stream (the `Upgrade: warren-relay`
//! path, over TLS or, in labs, plain TCP) or on a WebSocket (for networks
//! whose proxies only pass HTTP). Frames are the same bytes in both; a
//! WebSocket binary message is just a chunk of that byte stream. The session
//! code sees only [`RxHalf`] (chunks in) and [`TxHalf`] (chunks out), so both
//! paths share every rule about handshakes, limits and queues.

use std::io;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use warren::proto::relay::FrameDecoder;

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
