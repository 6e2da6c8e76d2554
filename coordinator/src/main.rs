//! `warren-coordinator`: the control server, STUN server and relay.
//!
//! The control API lands with the coordinator issue; until then the binary
//! only reports its version so packaging and CI can already build it.

fn main() -> anyhow::Result<()> {
    println!("warren-coordinator {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
