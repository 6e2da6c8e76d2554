//! HuJSON, the policy file's syntax: JSON plus `//` and `/* */` comments
//! and trailing commas (Tailscale's "JSON with commas and comments").
//!
//! The lexing and parsing are jsonc-parser's, with every extension beyond
//! those two turned off (no single quotes, bare keys, hex numbers, missing
//! commas...), so a file Tailscale accepts parses the same here and one it
//! refuses is refused here too. Its syntax tree is turned into the small
//! tree below, in which every value and every key carries its line and
//! column: the policy parser (`parse.rs`) walks it by hand rather than
//! through serde so that each error, also a semantic one found later ("no
//! such user"), can name where in the file the entry is.

use std::fmt;

use jsonc_parser::ast;
use jsonc_parser::{CollectOptions, CommentCollectionStrategy, ParseOptions};

/// A place in the file, both counted from 1; the column in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

/// A value of the file with where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number as written; the policy has no use for numbers beyond
    /// naming a protocol, which is checked where it is read.
    Number(String),
    String(String),
    Array(Vec<Node>),
    /// Members in file order; a key given twice is refused at parse time.
    Object(Vec<Member>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Value {
    /// What the value is, for "expected a list, found a string".
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        }
    }
}

/// Why a file is not HuJSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses a whole file; an empty file (or only comments) is an error.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let lines = LineIndex::new(text);
    let options = ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    let collect = CollectOptions {
        comments: CommentCollectionStrategy::Off,
        tokens: false,
    };
    let parsed = jsonc_parser::parse_to_ast(text, &collect, &options).map_err(|e| SyntaxError {
        pos: lines.pos(e.range().start),
        message: e.kind().to_string(),
    })?;
    let Some(value) = parsed.value else {
        return Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: "the file holds no JSON value".into(),
        });
    };
    convert(&lines, value)
}

fn convert(lines: &LineIndex, value: ast::Value<'_>) -> Result<Node, SyntaxError> {
    let (start, value) = match value {
        ast::Value::NullKeyword(n) => (n.range.start, Value::Null),
        ast::Value::BooleanLit(b) => (b.range.start, Value::Bool(b.value)),
        ast::Value::NumberLit(n) => (n.range.start, Value::Number(n.value.to_owned())),
        ast::Value::StringLit(s) => (s.range.start, Value::String(s.value.into_owned())),
        ast::Value::Array(a) => {
            let start = a.range.start;
            let items = a
                .elements
                .into_iter()
                .map(|v| convert(lines, v))
                .collect::<Result<Vec<_>, _>>()?;
            (start, Value::Array(items))
        }
        ast::Value::Object(o) => {
            let start = o.range.start;
            let mut members: Vec<Member> = Vec::with_capacity(o.properties.len());
            for prop in o.properties {
                let key_pos = lines.pos(prop.range.start);
                let key = prop.name.into_string();
                if let Some(first) = members.iter().find(|m| m.key == key) {
                    return Err(SyntaxError {
                        pos: key_pos,
                        message: format!(
                            "the key {key:?} is given twice (first at {})",
                            first.key_pos
                        ),
                    });
                }
                let value = convert(lines, prop.value)?;
                members.push(Member {
                    key,
                    key_pos,
                    value,
                });
            }
            (start, Value::Object(members))
        }
    };
    Ok(Node {
        pos: lines.pos(start),
        value,
    })
}

/// Byte offset to line and column.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    fn pos(&self, offset: usize) -> Pos {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let col = self
            .text
            .get(start..offset.min(self.text.len()))
            .map_or(0, |s| s.chars().count());
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col + 1).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_parse_and_keep_positions() {
        let text = "// a policy\n{\n  /* groups */ \"groups\": {\n    \"group:dev\": [\"a@x\",],\n  },\n}\n";
        let root = parse(text).unwrap();
        let Value::Object(members) = &root.value else {
            panic!("not an object");
        };
        assert_eq!(members[0].key, "groups");
        assert_eq!(members[0].key_pos, Pos { line: 3, col: 16 });
        let Value::Object(groups) = &members[0].value.value else {
            panic!();
        };
        assert_eq!(groups[0].value.pos, Pos { line: 4, col: 18 });
    }

    #[test]
    fn extensions_beyond_hujson_are_refused_with_their_place() {
        for (text, line) in [
            ("{\n 'a': 1}", 2),
            ("{\n a: 1}", 2),
            ("{\"a\": 1\n \"b\": 2}", 1),
            ("{\"a\": 0x10}", 1),
            ("{\"a\": [1 2]}", 1),
            ("", 1),
            ("{\"a\": 1,\n\"a\": 2}", 2),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.pos.line, line, "{text:?}: {err}");
        }
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let root = parse("{\"é\": [1, \"ü\", 3]}").unwrap();
        let Value::Object(m) = &root.value else {
            panic!()
        };
        let Value::Array(items) = &m[0].value.value else {
            panic!()
        };
        assert_eq!(items[2].pos, Pos { line: 1, col: 16 });
    }
}
