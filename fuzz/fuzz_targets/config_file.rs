//! Fuzzes the agent's config file parser (`Config::parse`): any text gets
//! a config or a typed error naming the line and key, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = warren::config::Config::parse(text, std::path::Path::new("fuzz.toml")) {
        // The message must render (it quotes the offending line).
        let _ = e.to_string();
    }
});
