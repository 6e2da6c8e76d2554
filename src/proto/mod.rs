//! Sans-IO wire codecs.

pub mod relay;
