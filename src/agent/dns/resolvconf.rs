//! The host's DNS through `/etc/resolv.conf` itself, when no
//! systemd-resolved manages it (README, "Names and DNS").
//!
//! Before the first write the file's bytes go to a backup in the state
//! directory; ours then names the resolver (`nameserver 100.100.100.100`),
//! puts the network's domain first in `search` and keeps the host's own
//! search domains and `options` after it. Stopping writes the backup back
//! byte for byte and deletes it; a backup found at start means the last
//! run was killed, and it is restored then (only if the file is still
//! ours: a file someone rewrote since is theirs). The host's own
//! nameservers from the backup are where the resolver forwards.
//!
//! Another program that rewrites the file (DHCP, NetworkManager) wins the
//! content: its version becomes the new backup and ours is written again.
//! After [`MAX_FIGHTS`] such rewrites within [`FIGHT_WINDOW`] warren stops
//! writing, leaves their file, and says so in `status` instead of looping.
//!
//! A write goes to a temporary file renamed over the original; where the
//! file is a mount point (a container's, or `ip netns exec`'s per-namespace
//! file) a rename cannot replace it, so it is rewritten in place. The
//! watching (inotify) is the caller's (`agent::dns`); this module is plain
//! file logic, tested on temporary directories.

use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The first line of the file warren writes.
pub const MARKER: &str = "# written by warren";
/// The backup's name in the state directory.
pub const BACKUP: &str = "resolv.conf.warren-backup";
/// Rewrites by others tolerated within [`FIGHT_WINDOW`].
pub const MAX_FIGHTS: usize = 5;
pub const FIGHT_WINDOW: Duration = Duration::from_secs(60);

/// What a resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Reads the `nameserver`, `search`/`domain` and `options` lines.
pub fn parse(text: &str) -> Parsed {
    let mut p = Parsed::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // `fe80::1%eth0`: the zone is dropped (link-local servers
                // are rare; an address without its zone still parses).
                if let Some(ip) = words
                    .next()
                    .and_then(|w| w.split('%').next())
                    .and_then(|w| w.parse().ok())
                {
                    p.nameservers.push(ip);
                }
            }
            // The last `search` or `domain` line wins, as in libc.
            Some("search") | Some("domain") => p.search = words.map(str::to_owned).collect(),
            Some("options") => p.options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    p
}

/// The file warren writes over `original`.
pub fn render(original: &Parsed, resolvers: &[IpAddr], domains: &[String]) -> String {
    let mut search: Vec<String> = domains.to_vec();
    for d in &original.search {
        if !search.iter().any(|s| s.eq_ignore_ascii_case(d)) {
            search.push(d.clone());
        }
    }
    let mut out = format!(
        "{MARKER} (its resolver answers the network's names and forwards the rest);\n\
         # the host's own file is kept in warren's state directory and put back when warren stops.\n"
    );
    for r in resolvers {
        out.push_str(&format!("nameserver {r}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !original.options.is_empty() {
        out.push_str(&format!("options {}\n", original.options.join(" ")));
    }
    out
}

/// Writes `bytes` to `path`: a renamed temporary file, or in place when
/// `path` is a mount point or a rename is not allowed.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(".resolv.conf.warren-{}", std::process::id()));
    let renamed = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // The mode of the original (0644 as a rule), not the umask's.
        if let Ok(meta) = std::fs::metadata(path) {
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
        }
        std::fs::rename(&tmp, path)
    })();
    match renamed {
        Ok(()) => Ok(()),
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .create(true)
                .open(path)?;
            f.write_all(bytes)?;
            f.sync_all()
        }
    }
}

/// The file under warren's management.
#[derive(Debug)]
pub struct ResolvConf {
    path: PathBuf,
    backup: PathBuf,
    /// The host's bytes while ours are in place.
    original: Option<Vec<u8>>,
    /// What we wrote last.
    written: Option<Vec<u8>>,
    /// When others rewrote the file, within the window.
    fights: Vec<Instant>,
    /// Set once warren gave up the fight.
    pub gave_up: bool,
}

/// What a change to the file was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Our own write (or nothing changed).
    Ours,
    /// Another program's: ours was written again over it.
    Reapplied,
    /// Too many rewrites: warren stopped writing.
    GaveUp,
}

impl ResolvConf {
    pub fn new(path: impl Into<PathBuf>, state_dir: &Path) -> ResolvConf {
        ResolvConf {
            path: path.into(),
            backup: state_dir.join(BACKUP),
            original: None,
            written: None,
            fights: Vec::new(),
            gave_up: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether ours is in place.
    pub fn active(&self) -> bool {
        self.original.is_some()
    }

    /// At start: puts back the host's file a killed run left ours over.
    /// True when it did.
    pub fn recover(&mut self) -> io::Result<bool> {
        let Ok(saved) = std::fs::read(&self.backup) else {
            return Ok(false);
        };
        let current = std::fs::read(&self.path).unwrap_or_default();
        let ours = current.starts_with(MARKER.as_bytes());
        if ours {
            write_file(&self.path, &saved)?;
        }
        std::fs::remove_file(&self.backup)?;
        Ok(ours)
    }

    /// The host's own settings: from the backup while ours is in place,
    /// else from the file.
    pub fn host(&self) -> Parsed {
        let bytes = match &self.original {
            Some(b) => b.clone(),
            None => std::fs::read(&self.path).unwrap_or_default(),
        };
        let mut p = parse(&String::from_utf8_lossy(&bytes));
        // A file of ours (a stale one) names our own resolver: never an
        // upstream of itself.
        if bytes.starts_with(MARKER.as_bytes()) {
            p.nameservers.clear();
        }
        p
    }

    /// Writes ours (resolver `resolver`, `domains` first in `search`),
    /// backing up the host's file first.
    pub fn apply(&mut self, resolvers: &[IpAddr], domains: &[String]) -> io::Result<()> {
        if self.gave_up {
            return Ok(());
        }
        let current = std::fs::read(&self.path).unwrap_or_default();
        let theirs = !current.starts_with(MARKER.as_bytes());
        if self.original.is_none() {
            if theirs {
                write_file(&self.backup, &current)?;
                self.original = Some(current.clone());
            } else {
                // Ours already, without a backup: nothing to keep.
                self.original = Some(Vec::new());
            }
        } else if theirs && self.written.as_ref().is_some_and(|w| *w != current) {
            // Another program rewrote the file after our last write and
            // its inotify event is not handled yet: its content is the
            // host's now, as in `changed`, and not lost under ours.
            write_file(&self.backup, &current)?;
            self.original = Some(current.clone());
        }
        let host = self.host();
        let text = render(&host, resolvers, domains).into_bytes();
        if self.written.as_deref() != Some(&text) || current != text {
            write_file(&self.path, &text)?;
        }
        self.written = Some(text);
        Ok(())
    }

    /// The file changed (inotify): our write, or another program's, whose
    /// content becomes the host's and is written over again, until
    /// [`MAX_FIGHTS`] in [`FIGHT_WINDOW`].
    pub fn changed(
        &mut self,
        now: Instant,
        resolvers: &[IpAddr],
        domains: &[String],
    ) -> io::Result<Change> {
        if !self.active() || self.gave_up {
            return Ok(Change::Ours);
        }
        let current = std::fs::read(&self.path).unwrap_or_default();
        if Some(&current) == self.written.as_ref() {
            return Ok(Change::Ours);
        }
        self.fights
            .retain(|t| now.saturating_duration_since(*t) < FIGHT_WINDOW);
        self.fights.push(now);
        // Their content is the host's now.
        if !current.starts_with(MARKER.as_bytes()) {
            write_file(&self.backup, &current)?;
            self.original = Some(current);
        }
        if self.fights.len() > MAX_FIGHTS {
            self.gave_up = true;
            self.written = None;
            // Their file stays; ours is no longer in place.
            self.original = None;
            let _ = std::fs::remove_file(&self.backup);
            return Ok(Change::GaveUp);
        }
        self.written = None;
        self.apply(resolvers, domains)?;
        Ok(Change::Reapplied)
    }

    /// Puts the host's file back, byte for byte, and deletes the backup.
    pub fn restore(&mut self) -> io::Result<()> {
        if let Some(original) = self.original.take() {
            let current = std::fs::read(&self.path).unwrap_or_default();
            // Only over ours: a file another program wrote since is theirs.
            if current.starts_with(MARKER.as_bytes()) && !original.is_empty() {
                write_file(&self.path, &original)?;
            }
            let _ = std::fs::remove_file(&self.backup);
        }
        self.written = None;
        self.fights.clear();
        self.gave_up = false;
        Ok(())
    }
}

#[cfg(test)]
#[path = "resolvconf_tests.rs"]
mod tests;
