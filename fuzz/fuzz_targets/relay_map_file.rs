//! Fuzzes the coordinator's relay map file parser (`--relay-map`,
//! `coordinator/src/relay_map.rs`): any text gets a map or a typed error
//! naming the line and key, never a panic.
//!
//! The module is compiled in here from its source file rather than through
//! the coordinator crate, whose database drivers would otherwise be built
//! with the sanitizer too; it depends on nothing but `warren` and serde.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../coordinator/src/relay_map.rs"]
mod relay_map;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = std::path::Path::new("relays.toml");
    match relay_map::parse(text, file, Some(1)) {
        // Every region that passed names a usable URL and no reserved id.
        Ok(map) => {
            for r in &map.regions {
                assert!(r.id != 0 && r.id != 1);
                assert!(warren::dial::parse_url(&r.url, true).is_ok());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
