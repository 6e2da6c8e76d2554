//! The agent's resolver, without IO (README, "Names and DNS"): what to do
//! with one query. Names of the network are answered from the zone; every
//! other name is answered from the cache or forwarded, to the split-DNS
//! servers of its domain, else to the network's nameservers when the admin
//! overrides local DNS, else to the resolvers the host had before warren
//! (and to the network's nameservers when the host had none).
//!
//! The driver (`agent::dns::server`) owns the sockets: it hands each
//! datagram or TCP message to [`Resolver::handle_query`], sends a
//! [`Decision::Reply`] back, and for a [`Decision::Forward`] asks the
//! upstreams in turn (UDP, then TCP when the answer is truncated) and
//! passes what came back to [`Resolver::handle_answer`], which caches it
//! and shapes the reply. Time comes in as `now`. The wire format is
//! hickory-proto's; a datagram it cannot parse is dropped and counted,
//! never answered with anything but FORMERR when a header can be read.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use super::cache::Cache;
use super::settings::{canonical, DnsSettings, Upstream};
use super::zone::{reverse_name_ip, Lookup, Reverse, Zone};

/// TTL of the network's own names: short, so a rename or a new address
/// is seen at once even by caches downstream of us.
pub const ZONE_TTL: u32 = 5;
/// How long a forwarded failure (SERVFAIL) or an answer without TTLs is
/// kept: not at all, and 30 s for negative answers without an SOA.
const NEGATIVE_TTL: u32 = 30;
/// The EDNS payload we offer and accept (the DNS flag day's 1232).
pub const EDNS_PAYLOAD: u16 = 1232;

/// Where an answer came from, for `warren dns query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The network's own names (or an overlay reverse name).
    Zone,
    /// The cache, holding an answer from `upstream` earlier.
    Cache,
    /// Split DNS for `domain`.
    Split { domain: String },
    /// The network's global nameservers.
    Global,
    /// The host's own resolvers, as they were before warren.
    Host,
    /// Refused or malformed, answered here.
    Local,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Zone => f.write_str("the network's names"),
            Source::Cache => f.write_str("the cache"),
            Source::Split { domain } => write!(f, "split DNS for {domain}"),
            Source::Global => f.write_str("the network's nameservers"),
            Source::Host => f.write_str("the host's resolvers"),
            Source::Local => f.write_str("the resolver itself"),
        }
    }
}

/// A query to forward.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The client's query, parsed.
    pub request: Message,
    /// Its bytes to send upstream (the client's own, so EDNS and flags
    /// pass through; the driver sets a fresh id per upstream).
    pub wire: Vec<u8>,
    /// The upstreams to try in turn.
    pub upstreams: Vec<SocketAddr>,
    pub source: Source,
    /// Largest reply the client takes (512 over UDP without EDNS).
    pub limit: usize,
}

/// What to do with one query.
#[derive(Debug)]
pub enum Decision {
    Reply {
        wire: Vec<u8>,
        source: Source,
    },
    Forward(Box<Forward>),
    /// Not even a header: nothing to answer.
    Drop,
}

/// Counters for `warren dns status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub queries: u64,
    pub answered_locally: u64,
    pub from_cache: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub malformed: u64,
}

type Key = (String, u16, u16);

/// The resolver's state: the zone, the settings, the host's resolvers and
/// the cache.
#[derive(Debug, Default)]
pub struct Resolver {
    zone: Arc<Zone>,
    settings: DnsSettings,
    host: Vec<Upstream>,
    cache: Cache<Key, Message>,
    pub stats: Stats,
}

fn key_of(m: &Message) -> Option<Key> {
    let q = m.queries.first()?;
    Some((
        canonical(&q.name().to_ascii()),
        u16::from(q.query_type()),
        u16::from(q.query_class()),
    ))
}

fn reply_to(req: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.message_type = MessageType::Response;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    resp.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        resp.set_edns(e);
    }
    resp
}

/// Serialises `resp`, truncated (TC set, records dropped) if it does not
/// fit `limit`.
fn encode(resp: &Message, limit: usize) -> Vec<u8> {
    match resp.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => resp.truncate().to_vec().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The largest reply `req` takes over `udp` (TCP takes any).
fn limit_of(req: &Message, udp: bool) -> usize {
    if udp {
        usize::from(req.max_payload().min(EDNS_PAYLOAD.max(512)))
    } else {
        usize::from(u16::MAX)
    }
}

impl Resolver {
    /// The zone to answer from (swapped whole on each map change).
    pub fn set_zone(&mut self, zone: Arc<Zone>) {
        self.zone = zone;
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// The network's settings; changed upstreams empty the cache.
    pub fn set_settings(&mut self, settings: DnsSettings) {
        if settings != self.settings {
            self.cache.clear();
            self.settings = settings;
        }
    }

    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// The host's own resolvers, from before warren changed anything.
    pub fn set_host_resolvers(&mut self, host: Vec<Upstream>) {
        if host != self.host {
            self.cache.clear();
            self.host = host;
        }
    }

    pub fn host_resolvers(&self) -> &[Upstream] {
        &self.host
    }

    /// How many answers the cache holds.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Where a name outside the network goes.
    pub fn upstreams_for(&self, name: &str) -> (Vec<SocketAddr>, Source) {
        let name = canonical(name);
        let split = self
            .settings
            .split
            .iter()
            .filter(|(d, _)| name == **d || name.ends_with(&format!(".{d}")))
            .max_by_key(|(d, _)| d.len());
        if let Some((domain, servers)) = split {
            let addrs = servers.iter().map(|u| u.0).collect();
            return (
                addrs,
                Source::Split {
                    domain: domain.clone(),
                },
            );
        }
        let global: Vec<SocketAddr> = self.settings.nameservers.iter().map(|u| u.0).collect();
        if self.settings.override_local || (self.host.is_empty() && !global.is_empty()) {
            return (global, Source::Global);
        }
        (self.host.iter().map(|u| u.0).collect(), Source::Host)
    }

    /// Decides what to do with one query (`udp`: it came as a datagram,
    /// which bounds the reply's size).
    pub fn handle_query(&mut self, now: Instant, wire: &[u8], udp: bool) -> Decision {
        self.stats.queries += 1;
        let req = match Message::from_vec(wire) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                // FORMERR when the header is readable, as RFC 1035 asks.
                return match Header::from_bytes(wire) {
                    Ok(h) if h.metadata.message_type == MessageType::Query => {
                        let resp = Message::error_msg(
                            h.metadata.id,
                            h.metadata.op_code,
                            ResponseCode::FormErr,
                        );
                        Decision::Reply {
                            wire: encode(&resp, 512),
                            source: Source::Local,
                        }
                    }
                    _ => Decision::Drop,
                };
            }
        };
        let limit = limit_of(&req, udp);
        let local = |me: &mut Self, resp: Message, source: Source| {
            me.stats.answered_locally += 1;
            Decision::Reply {
                wire: encode(&resp, limit),
                source,
            }
        };
        if req.metadata.message_type != MessageType::Query {
            self.stats.malformed += 1;
            return Decision::Drop;
        }
        if req.metadata.op_code != OpCode::Query {
            return local(self, reply_to(&req, ResponseCode::NotImp), Source::Local);
        }
        let Some(q) = req.queries.first().filter(|_| req.queries.len() == 1) else {
            self.stats.malformed += 1;
            return local(self, reply_to(&req, ResponseCode::FormErr), Source::Local);
        };
        let (name, qtype, class) = (q.name().clone(), q.query_type(), q.query_class());
        if let Some(resp) = self.zone_answer(&req, &name, qtype, class) {
            return local(self, resp, Source::Zone);
        }
        if let Some(key) = key_of(&req) {
            if let Some((cached, age)) = self.cache.get(now, &key) {
                let mut resp = cached.clone();
                resp.metadata.id = req.metadata.id;
                let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
                for r in resp.answers.iter_mut().chain(resp.authorities.iter_mut()) {
                    r.ttl = r.ttl.saturating_sub(age);
                }
                self.stats.from_cache += 1;
                return Decision::Reply {
                    wire: encode(&resp, limit),
                    source: Source::Cache,
                };
            }
        }
        let (upstreams, source) = self.upstreams_for(&name.to_ascii());
        if upstreams.is_empty() {
            return local(self, reply_to(&req, ResponseCode::ServFail), Source::Local);
        }
        self.stats.forwarded += 1;
        Decision::Forward(Box::new(Forward {
            request: req,
            wire: wire.to_vec(),
            upstreams,
            source,
            limit,
        }))
    }

    /// The answer from the zone, if the name is the network's.
    fn zone_answer(
        &self,
        req: &Message,
        name: &Name,
        qtype: RecordType,
        class: DNSClass,
    ) -> Option<Message> {
        let text = name.to_ascii();
        let lookup = match reverse_name_ip(&text) {
            Some(ip) => match self.zone.reverse(ip) {
                Reverse::Name(target) => Some(Some(target.to_owned())),
                Reverse::Unused => Some(None),
                Reverse::NotOverlay => None,
            },
            None => None,
        };
        let mut resp;
        if let Some(found) = lookup {
            resp = reply_to(req, ResponseCode::NoError);
            resp.metadata.authoritative = true;
            match found {
                Some(target) if matches!(qtype, RecordType::PTR | RecordType::ANY) => {
                    let target = Name::from_ascii(format!("{target}.")).ok()?;
                    resp.add_answer(Record::from_rdata(
                        name.clone(),
                        ZONE_TTL,
                        RData::PTR(PTR(target)),
                    ));
                }
                Some(_) => {}
                None => resp.metadata.response_code = ResponseCode::NXDomain,
            }
            return Some(resp);
        }
        match self.zone.lookup(&text) {
            Lookup::NotOurs => None,
            Lookup::NoSuchName => {
                let mut resp = reply_to(req, ResponseCode::NXDomain);
                resp.metadata.authoritative = true;
                Some(resp)
            }
            Lookup::Found(addrs) => {
                resp = reply_to(req, ResponseCode::NoError);
                resp.metadata.authoritative = true;
                if class != DNSClass::IN && class != DNSClass::ANY {
                    return Some(resp);
                }
                let any = qtype == RecordType::ANY;
                if qtype == RecordType::A || any {
                    for v4 in &addrs.v4 {
                        resp.add_answer(Record::from_rdata(
                            name.clone(),
                            ZONE_TTL,
                            RData::A(A(*v4)),
                        ));
                    }
                }
                if qtype == RecordType::AAAA || any {
                    for v6 in &addrs.v6 {
                        resp.add_answer(Record::from_rdata(
                            name.clone(),
                            ZONE_TTL,
                            RData::AAAA(AAAA(*v6)),
                        ));
                    }
                }
                Some(resp)
            }
        }
    }

    /// Shapes the reply to a forwarded query from the upstream's `answer`
    /// (`None`: every upstream failed), caching it by its TTLs.
    pub fn handle_answer(&mut self, now: Instant, fwd: &Forward, answer: Option<&[u8]>) -> Vec<u8> {
        let parsed = answer.and_then(|a| Message::from_vec(a).ok()).filter(|m| {
            m.metadata.message_type == MessageType::Response
                && key_of(m).is_some()
                && key_of(m) == key_of(&fwd.request)
        });
        let Some(mut resp) = parsed else {
            self.stats.upstream_failures += 1;
            return encode(&reply_to(&fwd.request, ResponseCode::ServFail), fwd.limit);
        };
        resp.metadata.id = fwd.request.metadata.id;
        resp.metadata.recursion_available = true;
        let ttl = cache_ttl(&resp);
        if let (Some(ttl), Some(key)) = (ttl, key_of(&fwd.request)) {
            if !resp.metadata.truncation {
                self.cache
                    .insert(now, key, resp.clone(), Duration::from_secs(u64::from(ttl)));
            }
        }
        encode(&resp, fwd.limit)
    }
}

/// How long an upstream answer may be cached: the smallest TTL of its
/// answers; for NXDOMAIN or no data, the SOA's negative TTL (or 30 s);
/// nothing for failures.
fn cache_ttl(resp: &Message) -> Option<u32> {
    match resp.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        _ => return None,
    }
    if let Some(min) = resp.answers.iter().map(|r| r.ttl).min() {
        return Some(min);
    }
    let soa = resp.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
        _ => None,
    });
    Some(soa.unwrap_or(NEGATIVE_TTL))
}

/// The addresses in an answer (for `warren dns query`'s summary).
pub fn answer_summary(wire: &[u8]) -> Option<(String, Vec<String>)> {
    let m = Message::from_vec(wire).ok()?;
    let records = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => format!("A {} (ttl {})", a.0, r.ttl),
            RData::AAAA(a) => format!("AAAA {} (ttl {})", a.0, r.ttl),
            RData::PTR(p) => format!("PTR {} (ttl {})", p.0, r.ttl),
            RData::CNAME(c) => format!("CNAME {} (ttl {})", c.0, r.ttl),
            other => format!("{} {} (ttl {})", r.record_type(), other, r.ttl),
        })
        .collect();
    Some((m.metadata.response_code.to_string(), records))
}

/// A query for `name` of type `qtype` (`warren dns query`), with EDNS.
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let name = match name.parse::<IpAddr>() {
        Ok(ip) if qtype == RecordType::PTR => Name::from(ip),
        _ => Name::from_ascii(if name.ends_with('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        })
        .ok()?,
    };
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(name, qtype));
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(e);
    m.to_vec().ok()
}

#[cfg(test)]
#[path = "resolver_tests.rs"]
mod tests;
