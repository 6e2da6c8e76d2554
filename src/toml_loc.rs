//! Where in a TOML file an error is: the line and the dotted key, for the
//! agent's config and the coordinator's relay map alike, so a bad file is
//! answered with `file:line: key `peer[0].endpoint`: message`.
//!
//! The key path comes from `serde_path_to_error`, the line from the span the
//! TOML parser gives. Errors found after parsing (a failed check on a valid
//! value) have no span; [`key_line`] then looks the key up in the text.
//! Hand-written because neither crate maps a path back to a line.

use serde::de::DeserializeOwned;

/// A TOML document that does not deserialise, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// 1-based line.
    pub line: usize,
    /// Dotted key path (`peer[1].endpoint`), or `(top level)`.
    pub key: String,
    pub message: String,
}

/// Deserialises `text`, locating any error.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Located> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| line_of(text, s.start))
            .unwrap_or_else(|| key_line(text, &key));
        Located {
            line,
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: inner.message().trim().to_owned(),
        }
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Best-effort line of a dotted key such as `peer[1].endpoint`,
/// `interface.mtu` or `region[0].stun[1]` (an index on the last segment is
/// ignored): the key's line inside the right table, or the table's header
/// when the key itself is absent (a missing key), or line 1.
pub fn key_line(text: &str, path: &str) -> usize {
    let (table, leaf) = path.rsplit_once('.').unwrap_or(("", path));
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    let (name, index) = match table.split_once('[') {
        Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut seen = 0usize;
    let mut header = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let t = line.trim_matches(|c| c == '[' || c == ']').trim();
            let here = t == name && index.is_none_or(|i| seen == i);
            if t == name {
                seen += 1;
            }
            if header.is_some() && !here {
                break;
            }
            if here {
                header = Some(n + 1);
            }
            continue;
        }
        if header.is_some() || name.is_empty() {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == leaf {
                    return n + 1;
                }
            }
        }
    }
    header.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "top = 1\n[interface]\nmtu = 5\n\n[[peer]]\nendpoint = \"a\"\n\n[[peer]]\nendpoint = \"b\"\nstun = []\n";

    #[test]
    fn keys_are_found_in_the_right_table() {
        assert_eq!(key_line(TEXT, "top"), 1);
        assert_eq!(key_line(TEXT, "interface.mtu"), 3);
        assert_eq!(key_line(TEXT, "peer[0].endpoint"), 6);
        assert_eq!(key_line(TEXT, "peer[1].endpoint"), 9);
        assert_eq!(key_line(TEXT, "peer[1].stun[0]"), 10);
        // Absent key: the table's header; absent table: line 1.
        assert_eq!(key_line(TEXT, "peer[1].keepalive"), 8);
        assert_eq!(key_line(TEXT, "agent.socket"), 1);
    }

    #[test]
    fn parse_errors_carry_line_and_key() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            top: u8,
            interface: Iface,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Iface {
            mtu: u16,
        }
        let e = from_str::<Doc>("top = 1\n[interface]\nmtu = \"x\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "interface.mtu"));
        assert!(!e.message.is_empty());
    }
}
