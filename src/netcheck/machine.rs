//! The netcheck state machine: probe table, retransmission timers, hairpin
//! test and completion rule. See the parent module for what is measured and
//! why; this file is only the bookkeeping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::report::{classify, ProbeReport, Rejected, Report, ServerReport, TcpReport};
use super::Config;
use crate::portmap::PortmapPresence;
use crate::proto::stun::{self, Class, Message, StunError, TransactionId};

/// Why an input datagram was not accepted. Each is counted in
/// [`Report::rejected`]; none of them changes the report otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    #[error(transparent)]
    Stun(#[from] StunError),
    #[error("answer for a request to {expected} came from {from}")]
    WrongSource {
        expected: SocketAddr,
        from: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProbeState {
    /// Waiting for an answer; the next transmission is due at `next_send`
    /// (or the probe fails then if every attempt is used).
    Pending {
        next_send: Instant,
    },
    Done {
        rtt: Duration,
        mapped: SocketAddr,
    },
    Failed,
}

#[derive(Debug)]
struct Probe {
    server: usize,
    dest: SocketAddr,
    attempts: u32,
    state: ProbeState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hairpin {
    /// Not started: waiting for a mapped IPv4 address behind a NAT.
    Idle,
    /// Ready to send the request to this mapped address.
    Due(SocketAddr),
    /// Sent; fails at the given instant.
    Sent {
        tx: TransactionId,
        give_up: Instant,
    },
    Finished(Option<bool>),
}

/// The sans-IO netcheck. Create it, then loop: send everything from
/// [`poll_transmit`](Self::poll_transmit), feed datagrams and timeouts, until
/// [`poll_report`](Self::poll_report) returns the report.
#[derive(Debug)]
pub struct Netcheck {
    config: Config,
    deadline: Instant,
    rng: StdRng,
    probes: Vec<Probe>,
    /// Outstanding transaction → (probe index, when that attempt left).
    transactions: HashMap<TransactionId, (usize, Instant)>,
    hairpin: Hairpin,
    portmap: Option<PortmapPresence>,
    rejected: Rejected,
    finished: bool,
    /// When the run began (the provisional verdict counts from it).
    start: Instant,
    /// The fastest STUN exchange over TCP we were told of.
    tcp_rtt: Option<Duration>,
    /// What the last TCP answer saw of our TCP port.
    tcp_public: Option<SocketAddr>,
    /// UDP is probably blocked: TCP answered, UDP stayed silent.
    udp_suspect: bool,
}

impl Netcheck {
    pub fn new(now: Instant, config: Config) -> Self {
        let probes = config
            .servers
            .iter()
            .enumerate()
            .flat_map(|(server, s)| {
                s.addrs.iter().map(move |&dest| Probe {
                    server,
                    dest: canonical(dest),
                    attempts: 0,
                    state: ProbeState::Pending { next_send: now },
                })
            })
            .collect();
        let mut nc = Self {
            deadline: now + config.deadline,
            rng: StdRng::seed_from_u64(config.seed),
            probes,
            transactions: HashMap::new(),
            hairpin: Hairpin::Idle,
            portmap: None,
            rejected: Rejected::default(),
            finished: false,
            start: now,
            tcp_rtt: None,
            tcp_public: None,
            udp_suspect: false,
            config,
        };
        nc.check_finished();
        nc
    }

    /// The next datagram to send, if one is due. Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.finished {
            return None;
        }
        let max_attempts = self.config.max_attempts;
        if let Some(i) = self.probes.iter().position(|p| {
            p.attempts < max_attempts
                && matches!(p.state, ProbeState::Pending { next_send } if next_send <= now)
        }) {
            let tx = TransactionId::random(&mut self.rng);
            let probe = &mut self.probes[i];
            // Attempt k waits rto * 2^k before the next one (or failure).
            let wait = self.config.initial_rto * 2u32.saturating_pow(probe.attempts);
            probe.attempts += 1;
            probe.state = ProbeState::Pending {
                next_send: now + wait,
            };
            self.transactions.insert(tx, (i, now));
            return Some((probe.dest, stun::binding_request(tx)));
        }
        if let Hairpin::Due(mapped) = self.hairpin {
            // Only after every probe's first transmission, so this new
            // mapping cannot interleave with the port sequence we measure.
            if self.probes.iter().all(|p| p.attempts > 0) {
                let tx = TransactionId::random(&mut self.rng);
                self.hairpin = Hairpin::Sent {
                    tx,
                    give_up: now + self.config.hairpin_timeout,
                };
                return Some((mapped, stun::binding_request(tx)));
            }
        }
        None
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let probe_timers = self.probes.iter().filter_map(|p| match p.state {
            ProbeState::Pending { next_send } => Some(next_send),
            _ => None,
        });
        let hairpin_timer = match self.hairpin {
            Hairpin::Sent { give_up, .. } => Some(give_up),
            _ => None,
        };
        probe_timers
            .chain(hairpin_timer)
            .chain(self.suspect_at())
            .chain(Some(self.deadline))
            .min()
    }

    /// A STUN server answered our Binding request over TCP, `rtt` after
    /// the connection was started: the network is up, so UDP's silence
    /// from now on says something.
    pub fn handle_tcp_answer(&mut self, rtt: Duration, public: SocketAddr) {
        if self.finished {
            return;
        }
        self.tcp_rtt = Some(self.tcp_rtt.map_or(rtt, |r| r.min(rtt)));
        self.tcp_public = Some(canonical(public));
    }

    /// Whether UDP is probably blocked, before the report can say so: a
    /// server answered over TCP and no UDP probe has been answered within
    /// the provisional wait. False once any UDP answer came, and once the
    /// run is over (the report then says).
    pub fn udp_probably_blocked(&self) -> bool {
        self.udp_suspect && !self.finished
    }

    /// When UDP's silence becomes a provisional verdict: the configured
    /// wait, stretched to twice the TCP exchange (about four round trips,
    /// room for a lost first probe and its retransmission) on slow paths.
    fn suspect_at(&self) -> Option<Instant> {
        let rtt = self.tcp_rtt?;
        if self.udp_suspect || self.udp_answered() {
            return None;
        }
        Some(self.start + self.config.provisional_wait.max(rtt * 2))
    }

    fn udp_answered(&self) -> bool {
        self.probes
            .iter()
            .any(|p| matches!(p.state, ProbeState::Done { .. }))
    }

    /// Advances timers: exhausted probes fail, the hairpin test gives up,
    /// UDP's silence may become a provisional verdict, and at the deadline
    /// everything still open is closed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        let max_attempts = self.config.max_attempts;
        for p in &mut self.probes {
            if let ProbeState::Pending { next_send } = p.state {
                if (p.attempts >= max_attempts && next_send <= now) || now >= self.deadline {
                    p.state = ProbeState::Failed;
                }
            }
        }
        if self.suspect_at().is_some_and(|t| now >= t) {
            self.udp_suspect = true;
        }
        if let Hairpin::Sent { give_up, .. } = self.hairpin {
            if now >= give_up {
                self.hairpin = Hairpin::Finished(Some(false));
            }
        }
        if now >= self.deadline {
            if !matches!(self.hairpin, Hairpin::Finished(_)) {
                self.hairpin = Hairpin::Finished(None);
            }
            self.finished = true;
        }
        self.check_finished();
    }

    /// Feeds a datagram that [`stun::is_stun`] accepted (anything else is
    /// counted as malformed). Responses to our probes update the probe;
    /// our own hairpinned request completes the hairpin test.
    pub fn handle_stun(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), InputError> {
        if self.finished {
            // The report is final; late answers change nothing.
            return Ok(());
        }
        let result = self.accept(now, canonical(from), datagram);
        if let Err(e) = &result {
            let r = &mut self.rejected;
            match e {
                InputError::Stun(StunError::WrongTransaction) => r.wrong_transaction += 1,
                InputError::Stun(StunError::NotBindingResponse | StunError::NoMappedAddress) => {
                    r.unusable += 1
                }
                InputError::Stun(_) => r.malformed += 1,
                InputError::WrongSource { .. } => r.wrong_source += 1,
            }
        }
        self.check_finished();
        result
    }

    /// The result of the port-mapping probe (UPnP, NAT-PMP, PCP).
    pub fn handle_portmap(&mut self, presence: PortmapPresence) {
        if self.finished {
            return;
        }
        self.portmap = Some(presence);
        self.check_finished();
    }

    /// The report, once every probe is resolved or the deadline passed.
    pub fn poll_report(&self) -> Option<Report> {
        self.finished.then(|| self.build_report())
    }

    fn accept(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), InputError> {
        let msg = Message::decode(datagram)?;
        if msg.class == Class::Request {
            return match self.hairpin {
                Hairpin::Sent { tx, .. } if tx == msg.transaction_id => {
                    self.hairpin = Hairpin::Finished(Some(true));
                    Ok(())
                }
                _ => Err(StunError::WrongTransaction.into()),
            };
        }
        let &(index, sent_at) = self
            .transactions
            .get(&msg.transaction_id)
            .ok_or(StunError::WrongTransaction)?;
        let probe = &mut self.probes[index];
        if from != probe.dest {
            return Err(InputError::WrongSource {
                expected: probe.dest,
                from,
            });
        }
        let mapped = msg.binding_mapped_address()?;
        let mapped = canonical(mapped);
        if matches!(probe.state, ProbeState::Done { .. }) {
            // A duplicate (answer to an earlier attempt): first one wins.
            return Ok(());
        }
        probe.state = ProbeState::Done {
            rtt: now.saturating_duration_since(sent_at),
            mapped,
        };
        // UDP works after all (a slow first answer).
        self.udp_suspect = false;
        if self.hairpin == Hairpin::Idle && mapped.is_ipv4() && Some(mapped) != self.config.local_v4
        {
            self.hairpin = Hairpin::Due(mapped);
        }
        Ok(())
    }

    fn check_finished(&mut self) {
        if self.finished {
            return;
        }
        let probes_done = self
            .probes
            .iter()
            .all(|p| !matches!(p.state, ProbeState::Pending { .. }));
        if !probes_done {
            return;
        }
        match self.hairpin {
            // No NAT seen on IPv4: nothing to hairpin.
            Hairpin::Idle => self.hairpin = Hairpin::Finished(None),
            Hairpin::Finished(_) => {}
            Hairpin::Due(_) | Hairpin::Sent { .. } => return,
        }
        if self.portmap.is_some() || !self.config.expect_portmap {
            self.finished = true;
        }
    }

    fn build_report(&self) -> Report {
        let done = |v4: bool| -> Vec<(SocketAddr, SocketAddr)> {
            self.probes
                .iter()
                .filter(|p| p.dest.is_ipv4() == v4)
                .filter_map(|p| match p.state {
                    ProbeState::Done { mapped, .. } => Some((p.dest, mapped)),
                    _ => None,
                })
                .collect()
        };
        let ipv4 = classify(self.config.local_v4, &done(true));
        let ipv6 = classify(self.config.local_v6, &done(false));
        let servers: Vec<ServerReport> = self
            .config
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let probes: Vec<ProbeReport> = self
                    .probes
                    .iter()
                    .filter(|p| p.server == i)
                    .map(|p| match p.state {
                        ProbeState::Done { rtt, mapped } => ProbeReport {
                            addr: p.dest,
                            mapped: Some(mapped),
                            rtt: Some(rtt),
                        },
                        _ => ProbeReport {
                            addr: p.dest,
                            mapped: None,
                            rtt: None,
                        },
                    })
                    .collect();
                ServerReport {
                    name: s.name.clone(),
                    latency: probes.iter().filter_map(|p| p.rtt).min(),
                    probes,
                }
            })
            .collect();
        let preferred_server = servers
            .iter()
            .filter_map(|s| s.latency.map(|l| (l, &s.name)))
            .min()
            .map(|(_, name)| name.clone());
        let hairpinning = match self.hairpin {
            Hairpin::Finished(h) => h,
            _ => None,
        };
        Report {
            udp: ipv4.works || ipv6.works,
            ipv4,
            ipv6,
            hairpinning,
            portmap: self.portmap,
            servers,
            preferred_server,
            rejected: self.rejected,
            tcp: self.tcp_public.map(|public| TcpReport {
                public,
                rtt: self.tcp_rtt,
            }),
        }
    }
}

/// IPv4 peers seen through a dual-stack IPv6 socket appear as
/// `::ffff:a.b.c.d`; compare and report them as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
