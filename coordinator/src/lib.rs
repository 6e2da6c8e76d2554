//! Library half of `warren-coordinator`.

pub mod relay;
