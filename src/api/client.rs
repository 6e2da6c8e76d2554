//! The CLI side of the local API: one blocking request per connection.
//!
//! Blocking std IO on purpose: a CLI command makes one round trip, and a
//! tokio runtime would only add start-up time. Socket errors are turned into
//! the two sentences a person needs: the daemon is not running (and how to
//! start it), or they lack permission (and how to get it).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{ApiError, Reply, Request};

/// Bound on a whole round trip; the daemon answers from memory.
/// Longer than the daemon's own deadline for `up` and `netcheck`.
const TIMEOUT: Duration = Duration::from_secs(35);
/// Longest reply accepted: a status with thousands of peers fits.
const MAX_REPLY: u64 = 64 * 1024 * 1024;

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("warren is not running (start it with: systemctl start warren)")]
    NotRunning { socket: PathBuf },
    #[error("permission denied: run as root or join group warren")]
    PermissionDenied { socket: PathBuf },
    #[error("talking to the daemon on {socket}")]
    Io { socket: PathBuf, source: io::Error },
    #[error("the daemon sent an answer this CLI cannot read: {0}")]
    Protocol(#[source] serde_json::Error),
    #[error("the daemon closed the connection without answering")]
    NoAnswer,
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl ClientError {
    /// The typed error from the daemon, when that is what this is.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// Sends `request` to the daemon on `socket` and decodes the answer as `T`.
pub fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T, ClientError> {
    let value = call_raw(socket, request)?;
    serde_json::from_value(value).map_err(ClientError::Protocol)
}

/// Sends `request` and returns the `ok` payload as JSON.
pub fn call_raw(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let io_err = |source: io::Error| ClientError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_string(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(stream.take(MAX_REPLY));
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io_err)?;
    if answer.is_empty() {
        return Err(ClientError::NoAnswer);
    }
    match serde_json::from_str::<Reply>(&answer) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Error(e)) => Err(ClientError::Api(e)),
        Err(e) => Err(ClientError::Protocol(e)),
    }
}

fn connect_error(socket: &Path, e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            socket: socket.to_owned(),
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_owned(),
        },
        _ => ClientError::Io {
            socket: socket.to_owned(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_means_not_running_and_names_the_unit() {
        let dir = tempfile::tempdir().unwrap();
        let e = call_raw(&dir.path().join("nope.sock"), &Request::Status).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "warren is not running (start it with: systemctl start warren)"
        );
    }

    #[test]
    fn stale_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let e = call_raw(&path, &Request::Status).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
    }

    #[test]
    fn garbage_answer_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"hello\n").unwrap();
        });
        let e = call_raw(&path, &Request::Version).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
    }
}
