//! Advertised tags: the labels a node claims for itself with
//! `warren up --advertise-tags tag:server,tag:db`.
//!
//! A tag is `tag:` followed by 1–63 lower-case letters, digits or `-`, and
//! must start with a letter or digit — the shape of a DNS label, so a tag can
//! later name a group in a policy or a DNS record without escaping. One
//! validator, shared by the CLI (an early, clear error), the daemon and the
//! coordinator (which faces the network and must refuse rather than store
//! junk), so the three cannot disagree on what a tag is.

/// The prefix every tag carries; it keeps tags apart from user or group
/// names should a policy language ever mix them.
pub const TAG_PREFIX: &str = "tag:";

/// Longest name after the prefix (a DNS label).
pub const MAX_TAG_NAME: usize = 63;

/// Most tags one node may advertise.
pub const MAX_TAGS: usize = 16;

/// Why a tag or a list of tags was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    #[error("tag {0:?} must start with \"tag:\" (e.g. tag:server)")]
    NoPrefix(String),
    #[error("tag {0:?} has no name after \"tag:\"")]
    Empty(String),
    #[error("tag {0:?} is longer than {MAX_TAG_NAME} characters after \"tag:\"")]
    TooLong(String),
    #[error(
        "tag {tag:?} has the character {bad:?}: use lower-case letters, digits and '-', \
         starting with a letter or digit"
    )]
    BadChar { tag: String, bad: char },
    #[error("{0} tags given; at most {MAX_TAGS} are allowed")]
    TooMany(usize),
}

/// Checks one tag.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    let Some(name) = tag.strip_prefix(TAG_PREFIX) else {
        return Err(TagError::NoPrefix(tag.to_owned()));
    };
    if name.is_empty() {
        return Err(TagError::Empty(tag.to_owned()));
    }
    if name.chars().count() > MAX_TAG_NAME {
        return Err(TagError::TooLong(tag.to_owned()));
    }
    for (i, c) in name.chars().enumerate() {
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || (c == '-' && i > 0);
        if !ok {
            return Err(TagError::BadChar {
                tag: tag.to_owned(),
                bad: c,
            });
        }
    }
    Ok(())
}

/// Checks a list and returns it sorted without duplicates, so that two
/// spellings of the same set compare equal (`up` compares settings).
pub fn normalize_tags(tags: &[String]) -> Result<Vec<String>, TagError> {
    for t in tags {
        validate_tag(t)?;
    }
    let mut out = tags.to_vec();
    out.sort();
    out.dedup();
    if out.len() > MAX_TAGS {
        return Err(TagError::TooMany(out.len()));
    }
    Ok(out)
}

/// Parses the CLI's comma-separated form; an empty string means "no tags"
/// (so `--advertise-tags ''` clears them).
pub fn parse_tag_list(s: &str) -> Result<Vec<String>, TagError> {
    let tags: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    normalize_tags(&tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_tags_pass() {
        for t in ["tag:server", "tag:db", "tag:a", "tag:0day", "tag:eu-west-1"] {
            assert_eq!(validate_tag(t), Ok(()), "{t}");
        }
        let long = format!("tag:{}", "a".repeat(MAX_TAG_NAME));
        assert_eq!(validate_tag(&long), Ok(()));
    }

    #[test]
    fn bad_tags_say_why() {
        assert_eq!(
            validate_tag("server"),
            Err(TagError::NoPrefix("server".into()))
        );
        assert_eq!(validate_tag("tag:"), Err(TagError::Empty("tag:".into())));
        let long = format!("tag:{}", "a".repeat(MAX_TAG_NAME + 1));
        assert_eq!(validate_tag(&long), Err(TagError::TooLong(long.clone())));
        assert_eq!(
            validate_tag("tag:Server"),
            Err(TagError::BadChar {
                tag: "tag:Server".into(),
                bad: 'S'
            })
        );
        assert!(matches!(
            validate_tag("tag:-x"),
            Err(TagError::BadChar { bad: '-', .. })
        ));
        assert!(matches!(
            validate_tag("tag:a b"),
            Err(TagError::BadChar { bad: ' ', .. })
        ));
        assert!(matches!(
            validate_tag("tag:é"),
            Err(TagError::BadChar { bad: 'é', .. })
        ));
        let msg = validate_tag("server").unwrap_err().to_string();
        assert!(msg.contains("must start with \"tag:\""), "{msg}");
    }

    #[test]
    fn lists_are_sorted_deduplicated_and_bounded() {
        assert_eq!(
            parse_tag_list("tag:web, tag:db,tag:web").unwrap(),
            vec!["tag:db".to_string(), "tag:web".to_string()]
        );
        assert_eq!(parse_tag_list("").unwrap(), Vec::<String>::new());
        assert!(matches!(
            parse_tag_list("tag:ok,bad"),
            Err(TagError::NoPrefix(t)) if t == "bad"
        ));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("tag:t{i}")).collect();
        assert_eq!(normalize_tags(&many), Err(TagError::TooMany(MAX_TAGS + 1)));
    }
}
