//! Fuzzes what the control protocol parses from the other side: the map
//! stream's lines (the agent's parser, folded into a map as the agent
//! does) and the request bodies the coordinator takes (register, endpoint
//! reports), with the checks the coordinator runs on them.
//!
//! Properties: nothing panics on any bytes; a line that parses as a full
//! map builds a map, and every later delta applies to it without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::control::{EndpointsReport, MapMessage, NetMap, RegisterRequest};
use warren::keys::NodeKey;

fuzz_target!(|data: &[u8]| {
    // As the map stream client reads them: newline-separated JSON.
    let mut map: Option<NetMap> = None;
    for line in data.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<MapMessage>(line) else {
            continue;
        };
        if let MapMessage::Full { .. } = msg {
            map = NetMap::from_full(NodeKey([7; 32]), &msg);
        } else if let Some(m) = map.as_mut() {
            let _ = m.apply(&msg);
        }
    }
    // As the coordinator reads a body, then checks it.
    if let Ok(req) = serde_json::from_slice::<RegisterRequest>(data) {
        let _ = warren::text::is_printable(&req.os);
        let _ = warren::text::for_terminal(&req.hostname);
        if let Some(tags) = &req.tags {
            let _ = warren::control::types::normalize_tags(tags);
        }
    }
    if let Ok(report) = serde_json::from_slice::<EndpointsReport>(data) {
        for e in &report.endpoints {
            let _ = warren::proto::disco::is_candidate_addr(e.addr);
        }
    }
});
