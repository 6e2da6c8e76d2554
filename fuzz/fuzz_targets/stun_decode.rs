//! STUN decoder: any datagram must decode to a message or a typed error,
//! never panic; and the cheap demultiplexer must accept everything the full
//! decoder accepts (otherwise the agent would route real STUN elsewhere).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::proto::stun::{self, Message};

fuzz_target!(|data: &[u8]| {
    let decoded = Message::decode(data);
    if let Ok(msg) = &decoded {
        assert!(stun::is_stun(data), "decoded but not recognised as STUN");
        // What we accept as a mapped address survives our own encoder.
        if let Ok(addr) = msg.binding_mapped_address() {
            let again = stun::binding_response(msg.transaction_id, addr, None);
            assert_eq!(
                stun::parse_binding_response(&again),
                Ok((msg.transaction_id, addr))
            );
        }
    }
    let _ = stun::decode_header(data);
});
