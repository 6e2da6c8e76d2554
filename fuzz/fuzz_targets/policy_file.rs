//! Fuzzes the policy file (`src/policy/`): any text gets a policy or a
//! typed error with a line and column inside the text, never a panic; a
//! policy that loads compiles for a small network without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::policy::{compile, Inventory, Policy};

const INVENTORY: &str = r#"{
  "users": [{"name": "alice", "email": "alice@example.com"}],
  "nodes": [
    {"name": "a", "ipv4": "100.80.0.1", "ipv6": "fd7a:115c:a1e0::1", "user": "alice"},
    {"name": "s", "ipv4": "100.80.0.2", "ipv6": "fd7a:115c:a1e0::2", "tags": ["tag:server"],
     "advertised_routes": ["10.0.0.0/8"], "approved_routes": ["10.0.0.0/8"]}
  ]
}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(inv) = Inventory::from_json(INVENTORY) else {
        return;
    };
    match Policy::load(text, &inv) {
        Ok(p) => {
            let c = compile(Some(&p), &inv);
            for i in 0..inv.nodes.len() {
                let _ = c.visible(i);
                let _ = c.filter(i);
            }
        }
        Err(e) => {
            let lines = text.split('\n').count() as u32;
            assert!(e.pos.line >= 1 && e.pos.line <= lines.max(1), "{e}");
            let _ = e.to_string();
        }
    }
});
