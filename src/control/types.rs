//! The JSON bodies of the control protocol, shared by agent and coordinator.
//!
//! Every request body is `deny_unknown_fields`: a field the coordinator does
//! not know is far more likely a client bug (or a probe) than a feature, and
//! refusing it loudly keeps "accepted" meaning "understood". Responses and map
//! messages are read leniently by the agent instead, so an older agent keeps
//! working against a newer coordinator that adds fields.
//!
//! The advertised tags' validator lives here too, beside the request that
//! carries them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::keys::NodeKey;
use crate::policy::FilterRule;
use crate::traversal::NatSummary;

/// A node's id in the coordinator's store. Stable for the node's lifetime.
pub type NodeId = i64;

/// `GET /key`: the coordinator's X25519 public key, which the agent needs to
/// derive the key that authenticates all its later requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeyResponse {
    pub key: NodeKey,
    /// The coordinator's software version, for diagnostics only.
    pub version: String,
}

/// `POST /register` (signed with the node key being registered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The join token. It may be omitted when the node key is already
    /// registered: proof of the key is then enough, and nothing is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub node_key: NodeKey,
    pub disco_key: NodeKey,
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub version: String,
    /// Tags the node advertises (`warren up --advertise-tags`), checked with
    /// [`validate_tag`]. `None` keeps what the coordinator has
    /// (an older agent sends none); `Some(vec![])` clears them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Routes the node offers to carry (`warren up --advertise-routes`,
    /// both default routes for `--advertise-exit-node`), checked with
    /// [`super::advertise::check_advertised`]. `None` keeps what the
    /// coordinator has; `Some(vec![])` withdraws them. They carry traffic
    /// only once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<ipnet::IpNet>>,
}

/// What the coordinator gives a registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: NodeId,
    /// The name peers see (the hostname, made unique in the network).
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ephemeral: bool,
    pub relay_map: RelayMap,
}

/// Where the relays are. A placeholder until the relay issue lands: the
/// coordinator sends an empty list, and agents must cope with that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayMap {
    #[serde(default)]
    pub regions: Vec<RelayRegion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRegion {
    pub id: u16,
    pub name: String,
    /// `https://host:port/relay` (or `http://` in the lab).
    pub url: String,
    #[serde(default)]
    pub stun: Vec<SocketAddr>,
    /// The relay's public key. An agent refuses a relay at `url` whose
    /// handshake shows another key (someone on the path, or a server that
    /// is not this region's); `None` (a region listed without one) takes
    /// whatever key the server has, as TLS alone vouches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<NodeKey>,
}

/// How an endpoint candidate was learnt; peers try them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    Host,
    Portmapped,
    Srflx,
    Predicted,
}

/// One endpoint candidate of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub kind: EndpointKind,
}

/// The most candidates one report may carry; more is a bug or an attack.
pub const MAX_ENDPOINTS: usize = 64;

/// `POST /endpoints` (signed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsReport {
    pub endpoints: Vec<Endpoint>,
    /// The netcheck summary, free-form until netcheck's report type settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netcheck: Option<serde_json::Value>,
    /// What the node's NAT does, for its peers' hard-NAT strategies.
    #[serde(default)]
    pub nat: NatSummary,
    /// The relay region the node keeps its connection to: peers reach it
    /// there while no direct path works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<u16>,
}

impl EndpointsReport {
    /// A report of candidates only (no netcheck, NAT or relay news).
    pub fn endpoints(endpoints: &[Endpoint]) -> Self {
        EndpointsReport {
            endpoints: endpoints.to_vec(),
            netcheck: None,
            nat: NatSummary::default(),
            home_relay: None,
        }
    }
}

/// A node as its peers see it in the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node_id: NodeId,
    pub key: NodeKey,
    pub disco_key: NodeKey,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Left out when empty (every agent reads it with a default): most of
    /// a fresh node's entry otherwise, and a full map at 10,000 nodes is
    /// 10,000 entries (issue 19).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    pub online: bool,
    /// Unix time in milliseconds when the coordinator last heard from it.
    pub last_seen_ms: i64,
    /// The tags its join token granted and those it advertises, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The node's operating system (`linux`) and warren version, as it
    /// registered them; empty from an older coordinator.
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub version: String,
    /// The node's NAT as its last netcheck saw it (left out while nothing
    /// is known: every agent reads it with a default).
    #[serde(default, skip_serializing_if = "NatSummary::is_unknown")]
    pub nat: NatSummary,
    /// The relay region where the node can be reached (its home relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<u16>,
    /// The routes it serves: advertised and approved (a subnet router's
    /// prefixes, both default routes for an exit node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnet::IpNet>,
}

#[cfg(test)]
impl Peer {
    /// A peer for tests: a fresh key, `100.64.0.ID`, and `v6`.
    pub(crate) fn for_test(id: u8, v6: &str) -> Peer {
        let k = crate::keys::PrivateKey::generate().public();
        Peer {
            node_id: i64::from(id),
            key: k,
            disco_key: k,
            name: format!("n{id}"),
            ipv4: [100, 64, 0, id].into(),
            ipv6: v6.parse().expect("a test's IPv6 address"),
            endpoints: vec![],
            online: true,
            last_seen_ms: 0,
            tags: vec![],
            os: String::new(),
            version: String::new(),
            nat: Default::default(),
            home_relay: None,
            routes: vec![],
        }
    }
}

/// One line of the map stream (`GET /map`, newline-delimited JSON).
///
/// The first line is always `full`; after it only deltas and keepalives
/// follow, until the coordinator decides a resynchronisation is simpler than
/// a delta (after it fell behind, say) and sends `full` again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MapMessage {
    Full {
        self_node: Peer,
        peers: Vec<Peer>,
        relay_map: RelayMap,
        /// This node's compiled packet filter (`policy::filter`); absent
        /// when the network has no policy, which allows everything.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        packet_filter: Option<Vec<FilterRule>>,
        /// The network's DNS settings (absent from older coordinators:
        /// the agent then uses the defaults).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dns: Option<Box<crate::dns::DnsSettings>>,
    },
    /// The node's packet filter changed (a `policy set`, a user or tag
    /// change, a node joining or leaving); `None`: no policy any more.
    FilterChanged {
        #[serde(default)]
        packet_filter: Option<Vec<FilterRule>>,
    },
    PeerAdded {
        peer: Peer,
    },
    PeerChanged {
        peer: Peer,
    },
    PeerRemoved {
        key: NodeKey,
    },
    /// Only a peer's presence changed: the rest of its entry is as the
    /// agent holds it. Sent only on streams opened with [`MAP_PATH`]'s
    /// `v=2`: when a coordinator restarts, every node coming online is a
    /// change every other node hears of, and this line is a quarter of a
    /// full entry (issue 19).
    PeerOnline {
        key: NodeKey,
        online: bool,
        last_seen_ms: i64,
    },
    /// Presence alone, for many peers in one line. Sent instead of
    /// `peer_online` lines only on streams opened with [`MAP_PATH`]'s
    /// `presence=1`: in a reconnect storm every stream hears of nearly
    /// every node coming online, and one line per write with about 65
    /// bytes a peer costs the coordinator and the agent far less than a
    /// line, a write part and a parse per peer (issue 19).
    Presence {
        peers: Vec<PresenceEntry>,
    },
    /// The receiving node's own entry changed (endpoints it reported, its
    /// online state, a rename by the administrator).
    SelfChanged {
        node: Peer,
    },
    Keepalive,
}

/// One peer's presence in a [`MapMessage::Presence`] line: the key, whether
/// it is online, and `last_seen_ms`, encoded as the JSON array
/// `[key, online, last_seen_ms]` so that the key's name is not repeated
/// ten thousand times in a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry(pub NodeKey, pub bool, pub i64);

/// The answer to `GET /reach`: what each peer in this node's map lets it
/// do, from the peers' filters, which only the coordinator holds. Asked
/// for by `warren status` when the network has a policy (computing it for
/// every node on every change would be O(nodes²); README, "Access
/// policy").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachResponse {
    /// `false`: the network has no policy and every peer allows everything.
    pub policy: bool,
    pub peers: Vec<PeerReach>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReach {
    pub key: NodeKey,
    /// Empty: the peer is in the map only because it may reach this node.
    pub allows: Vec<crate::policy::Allowance>,
}

/// The map stream's path. `v=2`: this agent understands
/// [`MapMessage::PeerOnline`]; a coordinator sends it only to streams that
/// ask, so older agents (which ask for plain `/map`) get whole entries,
/// and an older coordinator ignores the query. `presence=1`: it also
/// understands [`MapMessage::Presence`], which a coordinator that knows it
/// sends instead of `peer_online` lines (an older one ignores the flag and
/// sends those). `zstd=1`: it reads the stream as zstd frames when the
/// answer says `Content-Encoding: zstd` (`control::zmap`; coordinators
/// send them only with `--compress-maps`).
pub const MAP_PATH: &str = "/map?v=2&presence=1&zstd=1";

/// How often the coordinator writes a keepalive line on an idle map stream.
pub const KEEPALIVE_SECS: u64 = 30;

/// The body of every error response, with the HTTP status from
/// [`ErrorCode::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable error codes. Agents match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Malformed JSON, an unknown field, a value out of range.
    BadRequest,
    PayloadTooLarge,
    /// Authentication headers missing or malformed.
    Unauthenticated,
    /// The MAC does not verify.
    BadSignature,
    /// The timestamp is outside the accepted window.
    StaleRequest,
    /// The nonce was seen before: a replayed request.
    Replayed,
    /// The node key is not (or no longer) registered.
    UnknownNode,
    InvalidToken,
    TokenExpired,
    TokenRevoked,
    /// A one-off token that has already been spent.
    TokenUsed,
    NotFound,
    MethodNotAllowed,
    /// The request would take something that belongs to another node (its
    /// disco key).
    Conflict,
    /// The access policy does not allow it (a tag the node's user does not
    /// own in `tagOwners`).
    Forbidden,
    /// Too many of something at once from this client (map streams from
    /// one address); try again later.
    TooManyRequests,
    Internal,
    /// A code this build does not know (sent by a newer coordinator).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status each code travels with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Unauthenticated
            | ErrorCode::BadSignature
            | ErrorCode::StaleRequest
            | ErrorCode::Replayed
            | ErrorCode::UnknownNode
            | ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::TokenUsed => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }

    /// Whether retrying the same request later can help. A node that was
    /// removed, or whose token is dead, must stop and tell its operator.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownNode
                | ErrorCode::InvalidToken
                | ErrorCode::TokenExpired
                | ErrorCode::TokenRevoked
                | ErrorCode::TokenUsed
                | ErrorCode::Forbidden
        )
    }
}

// Advertised tags: the labels a node claims for itself with
// `warren up --advertise-tags tag:server,tag:db`.
//
// A tag is `tag:` followed by 1–63 lower-case letters, digits or `-`, and
// must start with a letter or digit — the shape of a DNS label, so a tag can
// later name a group in a policy or a DNS record without escaping. One
// validator, shared by the CLI (an early, clear error), the daemon and the
// coordinator (which faces the network and must refuse rather than store
// junk), so the three cannot disagree on what a tag is.

/// The prefix every tag carries; it keeps tags apart from user or group
/// names should a policy language ever mix them.
pub const TAG_PREFIX: &str = "tag:";

/// Longest name after the prefix (a DNS label).
pub const MAX_TAG_NAME: usize = 63;

/// Most tags one node may advertise.
pub const MAX_TAGS: usize = 16;

/// Why a tag or a list of tags was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    #[error("tag {0:?} must start with \"tag:\" (e.g. tag:server)")]
    NoPrefix(String),
    #[error("tag {0:?} has no name after \"tag:\"")]
    Empty(String),
    #[error("tag {0:?} is longer than {MAX_TAG_NAME} characters after \"tag:\"")]
    TooLong(String),
    #[error(
        "tag {tag:?} has the character {bad:?}: use lower-case letters, digits and '-', \
         starting with a letter or digit"
    )]
    BadChar { tag: String, bad: char },
    #[error("{0} tags given; at most {MAX_TAGS} are allowed")]
    TooMany(usize),
}

/// Checks one tag.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    let Some(name) = tag.strip_prefix(TAG_PREFIX) else {
        return Err(TagError::NoPrefix(tag.to_owned()));
    };
    if name.is_empty() {
        return Err(TagError::Empty(tag.to_owned()));
    }
    if name.chars().count() > MAX_TAG_NAME {
        return Err(TagError::TooLong(tag.to_owned()));
    }
    for (i, c) in name.chars().enumerate() {
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || (c == '-' && i > 0);
        if !ok {
            return Err(TagError::BadChar {
                tag: tag.to_owned(),
                bad: c,
            });
        }
    }
    Ok(())
}

/// Checks a list and returns it sorted without duplicates, so that two
/// spellings of the same set compare equal (`up` compares settings).
pub fn normalize_tags(tags: &[String]) -> Result<Vec<String>, TagError> {
    for t in tags {
        validate_tag(t)?;
    }
    let mut out = tags.to_vec();
    out.sort();
    out.dedup();
    if out.len() > MAX_TAGS {
        return Err(TagError::TooMany(out.len()));
    }
    Ok(out)
}

/// Parses the CLI's comma-separated form; an empty string means "no tags"
/// (so `--advertise-tags ''` clears them).
pub fn parse_tag_list(s: &str) -> Result<Vec<String>, TagError> {
    let tags: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    normalize_tags(&tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn map_messages_are_tagged_snake_case() {
        let k = PrivateKey::generate().public();
        let line = serde_json::to_string(&MapMessage::PeerRemoved { key: k }).unwrap();
        assert_eq!(line, format!(r#"{{"type":"peer_removed","key":"{k}"}}"#));
        let ka: MapMessage = serde_json::from_str(r#"{"type":"keepalive"}"#).unwrap();
        assert_eq!(ka, MapMessage::Keepalive);
        // The shape the coordinator's outbox writes by hand.
        let presence = MapMessage::Presence {
            peers: vec![PresenceEntry(k, true, 12), PresenceEntry(k, false, -1)],
        };
        let line = serde_json::to_string(&presence).unwrap();
        assert_eq!(
            line,
            format!(r#"{{"type":"presence","peers":[["{k}",true,12],["{k}",false,-1]]}}"#)
        );
        assert_eq!(serde_json::from_str::<MapMessage>(&line).unwrap(), presence);
        // A short entry is refused, not read with a default.
        let short = format!(r#"{{"type":"presence","peers":[["{k}",true]]}}"#);
        assert!(serde_json::from_str::<MapMessage>(&short).is_err());
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let k = PrivateKey::generate().public();
        let ok = format!(r#"{{"node_key":"{k}","disco_key":"{k}","hostname":"a"}}"#);
        let req: RegisterRequest = serde_json::from_str(&ok).unwrap();
        assert_eq!(req.token, None);
        let bad = format!(r#"{{"node_key":"{k}","disco_key":"{k}","hostname":"a","admin":true}}"#);
        let err = serde_json::from_str::<RegisterRequest>(&bad).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn endpoint_kinds_are_lowercase() {
        let e: Endpoint = serde_json::from_str(r#"{"addr":"1.2.3.4:5","kind":"srflx"}"#).unwrap();
        assert_eq!(e.kind, EndpointKind::Srflx);
        assert!(serde_json::from_str::<Endpoint>(r#"{"addr":"1.2.3.4:5","kind":"x"}"#).is_err());
    }

    #[test]
    fn unknown_error_codes_still_parse() {
        let b: ErrorBody = serde_json::from_str(r#"{"code":"brand_new","message":"m"}"#).unwrap();
        assert_eq!(b.code, ErrorCode::Unknown);
        assert_eq!(ErrorCode::Replayed.status(), 401);
        assert!(ErrorCode::UnknownNode.is_permanent());
        assert!(!ErrorCode::Internal.is_permanent());
    }

    #[test]
    fn good_tags_pass() {
        for t in ["tag:server", "tag:db", "tag:a", "tag:0day", "tag:eu-west-1"] {
            assert_eq!(validate_tag(t), Ok(()), "{t}");
        }
        let long = format!("tag:{}", "a".repeat(MAX_TAG_NAME));
        assert_eq!(validate_tag(&long), Ok(()));
    }

    #[test]
    fn bad_tags_say_why() {
        assert_eq!(
            validate_tag("server"),
            Err(TagError::NoPrefix("server".into()))
        );
        assert_eq!(validate_tag("tag:"), Err(TagError::Empty("tag:".into())));
        let long = format!("tag:{}", "a".repeat(MAX_TAG_NAME + 1));
        assert_eq!(validate_tag(&long), Err(TagError::TooLong(long.clone())));
        assert_eq!(
            validate_tag("tag:Server"),
            Err(TagError::BadChar {
                tag: "tag:Server".into(),
                bad: 'S'
            })
        );
        assert!(matches!(
            validate_tag("tag:-x"),
            Err(TagError::BadChar { bad: '-', .. })
        ));
        assert!(matches!(
            validate_tag("tag:a b"),
            Err(TagError::BadChar { bad: ' ', .. })
        ));
        assert!(matches!(
            validate_tag("tag:é"),
            Err(TagError::BadChar { bad: 'é', .. })
        ));
        let msg = validate_tag("server").unwrap_err().to_string();
        assert!(msg.contains("must start with \"tag:\""), "{msg}");
    }

    #[test]
    fn lists_are_sorted_deduplicated_and_bounded() {
        assert_eq!(
            parse_tag_list("tag:web, tag:db,tag:web").unwrap(),
            vec!["tag:db".to_string(), "tag:web".to_string()]
        );
        assert_eq!(parse_tag_list("").unwrap(), Vec::<String>::new());
        assert!(matches!(
            parse_tag_list("tag:ok,bad"),
            Err(TagError::NoPrefix(t)) if t == "bad"
        ));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("tag:t{i}")).collect();
        assert_eq!(normalize_tags(&many), Err(TagError::TooMany(MAX_TAGS + 1)));
    }
}
