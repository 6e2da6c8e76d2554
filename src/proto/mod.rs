//! Sans-IO wire codecs: pure functions from bytes to typed messages and back.
//!
//! Nothing here does IO or reads a clock, so every codec can be fuzzed and
//! tested byte for byte. The state machines that use them live elsewhere
//! (`traversal`, the relay client, netcheck).

pub mod disco;
pub mod relay;
pub mod stream;
pub mod stun;
