//! The background task behind [`super::RelayClient`]: dial, run one
//! session, back off, dial again.
//!
//! All protocol decisions live in the sans-IO session; this loop only moves
//! bytes between it and the socket, turns its deadline into a sleep, and
//! passes its events on. Backoff doubles from `backoff_min` to `backoff_max`
//! with jitter and resets once a session is established. A refusal waits
//! at least [`REFUSED_FIRST`] and doubles like any failure: a node that has
//! just registered can reach a relay before the coordinator's node feed
//! does (the first refusal is a race, and a 30 s wait there kept a fresh
//! node off its home relay), while a removed key still ends up retrying
//! only every `backoff_max`. With [`RelayTransport::Auto`], an
//! upgrade that something on the path refuses switches the client to
//! WebSocket for good, without waiting.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use crate::keys::{NodeKey, PrivateKey};
use crate::proto::relay::client::{ClientEvent, ClientSession, SessionError};

use super::dial::{self, Conn, WRITE_TIMEOUT};
use super::{ClientStats, Command, RelayClientConfig, RelayEvent, RelayTransport};
use crate::dial::DialError;

/// Commands taken from the queue per write, so one write carries many frames.
const CMD_BATCH: usize = 128;

pub(crate) struct Driver {
    pub config: RelayClientConfig,
    pub key: PrivateKey,
    pub cmds: mpsc::Receiver<Command>,
    pub packets: mpsc::Sender<(NodeKey, Bytes)>,
    pub events: mpsc::Sender<RelayEvent>,
    pub stats: Arc<ClientStats>,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum EndError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("connection closed by relay")]
    Eof,
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("write timed out")]
    WriteTimeout,
}

/// The least wait after the relay refused us.
pub(super) const REFUSED_FIRST: Duration = Duration::from_secs(1);

/// How long to wait before dialling again, `backoff` being the current
/// step of the doubling.
fn wait_after(backoff: Duration, refused: bool) -> Duration {
    if refused {
        backoff.max(REFUSED_FIRST)
    } else {
        backoff
    }
}

impl Driver {
    pub async fn run(mut self) {
        let mut backoff = self.config.backoff_min;
        let mut transport = match self.config.transport {
            RelayTransport::Auto => RelayTransport::Upgrade,
            t => t,
        };
        loop {
            let mut established = false;
            let result = match dial::dial_with(&self.config, transport).await {
                Ok(conn) => self.session(conn, &mut established).await,
                Err(e) if e.upgrade_blocked() && self.may_fall_back(transport) => {
                    info!("relay upgrade blocked on the path ({e}); switching to WebSocket");
                    transport = RelayTransport::WebSocket;
                    continue;
                }
                Err(e) => Err(e.into()),
            };
            let err = match result {
                Ok(()) => return, // the sender was dropped
                Err(e) => e,
            };
            info!("relay connection ended: {err}");
            let _ = self.events.try_send(RelayEvent::Disconnected {
                error: err.to_string(),
            });
            if established {
                backoff = self.config.backoff_min;
            }
            let refused = matches!(err, EndError::Session(SessionError::Refused(_)));
            let wait = wait_after(backoff, refused);
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            // Meanwhile, packets given to us are dropped, not piled up.
            let until = tokio::time::Instant::now() + wait.mul_f64(jitter);
            loop {
                tokio::select! {
                    _ = sleep_until(until) => break,
                    c = self.cmds.recv() => match c {
                        None => return,
                        Some(_) => { self.stats.send_dropped.fetch_add(1, Relaxed); }
                    },
                }
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Runs one connection until it fails. `Ok` means "stop for good".
    async fn session(&mut self, conn: Conn, established: &mut bool) -> Result<(), EndError> {
        let now = || tokio::time::Instant::now().into_std();
        let mut s = ClientSession::new(self.key.clone(), self.config.session.clone(), now());
        let mut conn = Link::new(conn);
        if !conn.leftover.is_empty() {
            let first = std::mem::take(&mut conn.leftover);
            s.handle_input(now(), &first)?;
        }
        loop {
            while let Some(out) = s.poll_transmit() {
                match timeout(WRITE_TIMEOUT, conn.write(out)).await {
                    Ok(r) => r?,
                    Err(_) => return Err(EndError::WriteTimeout),
                }
            }
            while let Some(ev) = s.poll_event() {
                if let ClientEvent::Connected { .. } = ev {
                    *established = true;
                    self.stats.connects.fetch_add(1, Relaxed);
                }
                self.deliver(ev);
            }
            let deadline = s
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let ready = s.is_established();
            tokio::select! {
                r = conn.read() => {
                    let data = r?;
                    s.handle_input(now(), &data)?;
                }
                c = self.cmds.recv(), if ready => {
                    let Some(c) = c else { return Ok(()) };
                    self.command(&mut s, c)?;
                    // Take what else is waiting, for one larger write.
                    for _ in 0..CMD_BATCH {
                        match self.cmds.try_recv() {
                            Ok(c) => self.command(&mut s, c)?,
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(deadline) => s.handle_timeout(now())?,
            }
        }
    }

    fn may_fall_back(&self, now: RelayTransport) -> bool {
        self.config.transport == RelayTransport::Auto && now == RelayTransport::Upgrade
    }

    fn command(&self, s: &mut ClientSession, c: Command) -> Result<(), SessionError> {
        let now = tokio::time::Instant::now().into_std();
        match c {
            Command::Packet(peer, data) => match s.send_packet(now, &peer, &data) {
                Ok(()) => {
                    self.stats.packets_sent.fetch_add(1, Relaxed);
                    Ok(())
                }
                Err(SessionError::PacketTooLarge(n)) => {
                    debug!(bytes = n, "packet too large for the relay, dropped");
                    self.stats.send_dropped.fetch_add(1, Relaxed);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Command::Health => s.request_health(),
        }
    }

    fn deliver(&self, ev: ClientEvent) {
        let ev = match ev {
            ClientEvent::Packet { src, packet } => {
                if self.packets.try_send((src, packet)).is_ok() {
                    self.stats.packets_received.fetch_add(1, Relaxed);
                } else {
                    self.stats.recv_dropped.fetch_add(1, Relaxed);
                }
                return;
            }
            ClientEvent::Connected { relay_key } => RelayEvent::Connected { relay_key },
            ClientEvent::PeerGone { key, reason } => RelayEvent::PeerGone { key, reason },
            ClientEvent::Health(h) => RelayEvent::Health(h),
            ClientEvent::Pong { rtt } => RelayEvent::Rtt(rtt),
        };
        // Events are advisory; a consumer that never reads them loses them.
        let _ = self.events.try_send(ev);
    }
}

/// A dialed transport with a uniform chunk read/write.
struct Link {
    conn: Conn,
    leftover: Bytes,
    buf: Vec<u8>,
}

impl Link {
    fn new(conn: Conn) -> Self {
        let (conn, leftover) = match conn {
            Conn::Stream(s, rest) => (Conn::Stream(s, Bytes::new()), rest),
            ws => (ws, Bytes::new()),
        };
        Link {
            conn,
            leftover,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Reads the next chunk. Cancel-safe.
    async fn read(&mut self) -> Result<Bytes, EndError> {
        match &mut self.conn {
            Conn::Stream(s, _) => {
                let n = s.read(&mut self.buf).await?;
                if n == 0 {
                    return Err(EndError::Eof);
                }
                Ok(Bytes::copy_from_slice(&self.buf[..n]))
            }
            Conn::WebSocket(ws) => loop {
                match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Err(EndError::Eof),
                    Some(Ok(Message::Binary(b))) => return Ok(b),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                }
            },
        }
    }

    async fn write(&mut self, data: Bytes) -> Result<(), EndError> {
        match &mut self.conn {
            Conn::Stream(s, _) => {
                s.write_all(&data).await?;
                Ok(s.flush().await?)
            }
            Conn::WebSocket(ws) => Ok(ws.send(Message::Binary(data)).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refusals start at a second and double to the maximum, like other
    /// failures but never faster than [`REFUSED_FIRST`].
    #[test]
    fn refusals_back_off_from_a_second_to_the_maximum() {
        let cfg = super::super::RelayClientConfig::new("https://relay.example");
        let mut backoff = cfg.backoff_min;
        let mut waits = Vec::new();
        for _ in 0..8 {
            waits.push(wait_after(backoff, true).as_secs());
            backoff = (backoff * 2).min(cfg.backoff_max);
        }
        assert_eq!(waits, [1, 1, 1, 2, 4, 8, 16, 30]);
        assert_eq!(wait_after(cfg.backoff_min, false), cfg.backoff_min);
    }
}
