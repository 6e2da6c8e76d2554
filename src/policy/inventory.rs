//! The network as the policy sees it: users and nodes with their owner,
//! tags, addresses and routes.
//!
//! It is also the `--nodes INVENTORY.json` file of the offline `policy`
//! commands (README, "Reviewing a policy offline"), so its serde form is
//! part of the interface: read strictly, so a misspelt key in a file
//! written by hand is an error, not a node without routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub users: Vec<InventoryUser>,
    #[serde(default)]
    pub nodes: Vec<InventoryNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryUser {
    pub name: String,
    pub email: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryNode {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The owning user's name; `None` for a tagged node, which its tags
    /// own instead (as in Tailscale).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    #[serde(default)]
    pub approved_routes: Vec<IpNet>,
}

/// Why an inventory file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    #[error("line {line}, column {column}: {source}")]
    Json {
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("node {node:?} is owned by {user:?}, who is not in users")]
    UnknownOwner { node: String, user: String },
}

impl Inventory {
    pub fn from_json(text: &str) -> Result<Inventory, InventoryError> {
        let inv: Inventory = serde_json::from_str(text).map_err(|e| InventoryError::Json {
            line: e.line(),
            column: e.column(),
            source: e,
        })?;
        for n in &inv.nodes {
            if let Some(u) = &n.user {
                if !inv.users.iter().any(|x| &x.name == u) {
                    return Err(InventoryError::UnknownOwner {
                        node: n.name.clone(),
                        user: u.clone(),
                    });
                }
            }
        }
        Ok(inv)
    }

    pub fn user_by_email(&self, email: &str) -> Option<&InventoryUser> {
        self.users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }

    /// The email of the user owning `node`, if a user owns it.
    pub fn owner_email(&self, node: &InventoryNode) -> Option<&str> {
        if node.is_tagged() {
            return None;
        }
        let name = node.user.as_deref()?;
        self.users
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.email.as_str())
    }

    pub fn node_by_ip(&self, ip: IpAddr) -> Option<&InventoryNode> {
        self.nodes.iter().find(|n| n.owns(ip))
    }

    pub fn node_by_name(&self, name: &str) -> Option<&InventoryNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

impl InventoryNode {
    /// A node with tags is owned by them, whoever joined it.
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    pub fn owns(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.ipv4) || ip == IpAddr::V6(self.ipv6)
    }

    /// Its own two addresses as host prefixes.
    pub fn addrs(&self) -> [IpNet; 2] {
        [
            IpNet::from(IpAddr::V4(self.ipv4)),
            IpNet::from(IpAddr::V6(self.ipv6)),
        ]
    }

    /// Routes it both advertises and has approved: the ones it serves.
    pub fn served_routes(&self) -> impl Iterator<Item = &IpNet> {
        self.approved_routes
            .iter()
            .filter(|r| self.advertised_routes.contains(r))
    }
}
