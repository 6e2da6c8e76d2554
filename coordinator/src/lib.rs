//! warren-coordinator as a library, so its servers can be mounted by the
//! binary and exercised by integration tests.

pub mod stun;
