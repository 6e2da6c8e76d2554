//! Text that came from another machine (a node's OS and version strings,
//! its host name) on its way to a person's terminal.
//!
//! A joined node is not trusted (README, "Security model"): the
//! coordinator accepts only printable text from it ([`is_printable`]), and
//! every renderer escapes what it shows anyway ([`for_terminal`]), so that
//! a value stored before the check, or sent by another coordinator, still
//! cannot move the cursor, retitle the window or hide text from an admin.
//! Hand-written because what counts as dangerous here is small and fixed:
//! control characters (C0, DEL, C1, which start every escape sequence) and
//! the bidirectional overrides that reorder what a reader sees.
//!
//! Also how both binaries put a failure in front of a person: the error
//! and its causes on one line, each once ([`error_chain`]).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` may reach a terminal as it is.
fn is_safe(c: char) -> bool {
    !c.is_control() && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether `s` is printable text: no control character, no bidirectional
/// override.
pub fn is_printable(s: &str) -> bool {
    s.chars().all(is_safe)
}

/// `s` with every unsafe character written as `\u{…}`.
pub fn for_terminal(s: &str) -> Cow<'_, str> {
    if is_printable(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_safe(c) {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// An error and its causes on one line, each cause once: many errors name
/// their source in their own text too, which printing the whole chain
/// would repeat. Both binaries print their failures this way.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let inner = std::io::Error::other("disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("saving the key: {0}")]
        struct Repeats(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("saving the key")]
        struct Quiet(#[source] std::io::Error);
        assert_eq!(error_chain(&Repeats(inner)), "saving the key: disk full");
        let quiet = Quiet(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&quiet), "saving the key: disk full");
    }
    use super::*;

    #[test]
    fn escapes_only_what_a_terminal_acts_on() {
        assert!(is_printable("Debian GNU/Linux 12 (bookworm) ü 日本"));
        assert_eq!(for_terminal("linux"), "linux");
        assert!(!is_printable("\u{1b}]0;pwned\u{7}"));
        assert_eq!(for_terminal("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(for_terminal("x\u{9b}y\u{7f}"), "x\\u{9b}y\\u{7f}");
        assert_eq!(for_terminal("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert!(!is_printable("tab\there"));
    }
}
