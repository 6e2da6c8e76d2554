//! Wire codecs shared by the agent and the coordinator (sans-IO).

pub mod stun;
