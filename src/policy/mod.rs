//! Access policy: who may reach whom, in Tailscale's policy file format.
//!
//! A team moving from Tailscale or Headscale brings its policy file as it
//! is, and warren's behaviour can be judged against a well-known reference
//! (README, "Access policy"). The pieces, each pure (no IO, no clock), so
//! the coordinator, the offline `policy` commands and the tests share them:
//!
//! - `hujson`: the file's syntax, with a line and column on every value;
//! - `selector`: the words (selectors, ports, protocols);
//! - `parse`: sections and keys into a [`Policy`];
//! - `check`: names that must exist (users, groups, tags, hosts) and where
//!   each kind of selector may appear;
//! - `eval`: the policy's meaning between identities, for the file's
//!   `tests` and for `policy explain`;
//! - `inventory` and `compile`: the packet filter of each node, given the
//!   network's nodes, and which nodes may see each other in their maps;
//! - `filter`: the compiled filter as it travels to the agent, and the
//!   stateless match the agent's data plane runs on a packet.
//!
//! No policy at all means every node may reach every other, as in
//! Tailscale's default policy.

pub mod check;
pub mod compile;
pub mod eval;
pub mod filter;
pub mod hujson;
pub mod inventory;
pub mod parse;
pub mod selector;

use ipnet::IpNet;

pub use compile::{compile, Compiled};
pub use filter::{reach, Allowance, DstNet, FilterRule, PacketFilter};
pub use hujson::Pos;
pub use inventory::{Inventory, InventoryNode, InventoryUser};
pub use selector::{PortRange, Selector, WordError};

/// A parsed value with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    pub value: T,
    pub pos: Pos,
}

/// A policy file, parsed. See the module doc and README for the format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub groups: Vec<Group>,
    pub tag_owners: Vec<TagOwner>,
    pub hosts: Vec<HostAlias>,
    /// `acls` then `grants`, in file order, each as rules of one protocol
    /// set (`parse.rs`).
    pub rules: Vec<Rule>,
    pub auto_approvers: AutoApprovers,
    pub tests: Vec<PolicyTest>,
    /// Tailscale sections read past (`parse::IGNORED_SECTIONS`).
    pub ignored: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Without the `group:` prefix.
    pub name: String,
    pub pos: Pos,
    /// User emails.
    pub members: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagOwner {
    /// With the `tag:` prefix.
    pub tag: String,
    pub pos: Pos,
    pub owners: Vec<Spanned<Selector>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAlias {
    pub name: String,
    pub pos: Pos,
    pub prefix: IpNet,
}

/// One accept rule: packets of `protos` from any of `src` to any of `dst`
/// on its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pos: Pos,
    /// Where it came from: `acls[2]`, `grants[0]`.
    pub entry: String,
    pub protos: Vec<u8>,
    pub src: Vec<Spanned<Selector>>,
    pub dst: Vec<Dst>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dst {
    pub sel: Spanned<Selector>,
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoApprovers {
    pub routes: Vec<RouteApprover>,
    pub exit_node: Vec<Spanned<Selector>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteApprover {
    pub prefix: IpNet,
    pub pos: Pos,
    pub approvers: Vec<Spanned<Selector>>,
}

/// An entry of `tests`: what `src` must be able to reach and must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    pub pos: Pos,
    pub entry: String,
    pub src: Spanned<Selector>,
    pub protos: Vec<u8>,
    pub accept: Vec<Dst>,
    pub deny: Vec<Dst>,
}

/// Why a policy was refused: where, in which entry, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}{}: {kind}", if entry.is_empty() { String::new() } else { format!(" ({entry})") })]
pub struct PolicyError {
    pub pos: Pos,
    /// `acls[1].dst[0]`, or empty for the file as a whole.
    pub entry: String,
    /// Boxed: the error travels up through every parsing function.
    pub kind: Box<PolicyErrorKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyErrorKind {
    #[error("not HuJSON: {0}")]
    Syntax(String),
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "unknown section {0:?} (warren reads groups, tagOwners, hosts, acls, grants, \
         autoApprovers and tests)"
    )]
    UnknownSection(String),
    #[error("unknown key {key:?} (known here: {known})")]
    UnknownKey { key: String, known: String },
    #[error("the key {0:?} is missing")]
    MissingKey(&'static str),
    #[error("{0}")]
    Word(#[from] WordError),
    #[error("{0}")]
    Principal(#[source] eval::PrincipalError),
    #[error("{name:?} is not a {what} name (it must start with {prefix:?})")]
    BadName {
        what: &'static str,
        name: String,
        prefix: &'static str,
    },
    #[error("action must be \"accept\" (found {0:?}); whatever no rule accepts is denied")]
    BadAction(String),
    #[error(
        "grants with \"app\" give application capabilities, which warren does not have; \
         only network grants (\"ip\") are supported"
    )]
    AppGrant,
    #[error("{0} is not supported by warren")]
    Unsupported(&'static str),
    #[error("protocols {0:?} have no ports: write * as the port")]
    PortsWithoutProto(Vec<u8>),
    #[error("{selector} cannot be used in {place}")]
    NotHere {
        selector: String,
        place: &'static str,
    },
    #[error("no user {0:?} in this network (warren-coordinator user list)")]
    UnknownUser(String),
    #[error("group:{0} is not defined in groups")]
    UnknownGroup(String),
    #[error("{0} has no entry in tagOwners")]
    UnknownTag(String),
    #[error("host {0:?} is not defined in hosts")]
    UnknownHost(String),
    #[error("group:{0} is a group inside a group, which Tailscale's format does not allow")]
    NestedGroup(String),
    #[error("{0:?} is not a user email")]
    NotAUser(String),
    #[error("test failed: {src} {verb} {dst} ({proto}) but the test says it {says}")]
    TestFailed {
        src: String,
        dst: String,
        proto: String,
        verb: &'static str,
        says: &'static str,
    },
}

impl Policy {
    /// Parses a policy file; names are not checked yet (see [`Policy::check`]).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        parse::parse(text)
    }

    /// Parses, checks the names against the network and runs the file's
    /// `tests`: what `policy set` and `policy check` do before anything is
    /// stored.
    pub fn load(text: &str, inventory: &Inventory) -> Result<Policy, PolicyError> {
        let policy = Policy::parse(text)?;
        policy.check(inventory)?;
        policy.run_tests(inventory)?;
        Ok(policy)
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn host(&self, name: &str) -> Option<&HostAlias> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn tag_owner(&self, tag: &str) -> Option<&TagOwner> {
        self.tag_owners.iter().find(|t| t.tag == tag)
    }
}

#[cfg(test)]
mod tests;
