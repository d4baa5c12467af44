//! Downloading PyTorch checkpoints into a verified on-disk cache.
//!
//! torchvision publishes its weights at URLs such as
//! `https://download.pytorch.org/models/resnet50-11ad3fa6.pth`, where the 8 hex digits after the
//! last `-` are the first 8 hex digits of the file's SHA-256 (see [`hash_prefix_from_file_name`]).
//! [`fetch`] downloads such a file once into a cache directory (see [`cache_dir`]), checks it
//! against that prefix, and afterwards serves it from the cache without touching the network.
//!
//! Guarantees of [`fetch`]:
//!
//! * the file at the final path is always complete and verified: downloads stream into a
//!   temporary file in the same directory, which is renamed into place only after its length and
//!   hash have been checked, and removed on any failure;
//! * a cached file that no longer verifies (corrupt or truncated) is reported on stderr, removed
//!   and downloaded again;
//! * HTTP error statuses, network failures, short bodies and hash mismatches are reported as
//!   distinct [`DownloadError`] variants with single-line messages.
//!
//! ```no_run
//! use resnet_import::download::{cache_dir, fetch, hash_prefix_from_file_name, DownloadOptions};
//!
//! # fn main() -> Result<(), resnet_import::download::DownloadError> {
//! let name = "resnet50-11ad3fa6.pth";
//! let url = format!("https://download.pytorch.org/models/{name}");
//! let prefix = hash_prefix_from_file_name(name).unwrap_or("");
//! let path = fetch(&url, name, prefix, &cache_dir()?, &DownloadOptions::default())?;
//! println!("checkpoint at {}", path.display());
//! # Ok(())
//! # }
//! ```

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

/// Name of the environment variable that overrides the cache directory (see [`cache_dir`]).
pub const CACHE_ENV_VAR: &str = "RESNET_CACHE";

/// Name of the sub-directory of the platform cache directory used when [`CACHE_ENV_VAR`] is unset.
const CACHE_SUBDIR: &str = "resnet-rs";

/// Size of the read buffer used when hashing and downloading.
const BUFFER_SIZE: usize = 64 * 1024;

/// Length in hex digits of a full SHA-256 digest.
const SHA256_HEX_LEN: usize = 64;

/// Errors while fetching a checkpoint.
///
/// Every message is a single line naming the URL or path involved.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The server answered with a non-success HTTP status (404, 500, ...).
    #[error("HTTP status {status} while fetching {url}")]
    Http {
        /// The requested URL.
        url: String,
        /// The HTTP status code the server answered with.
        status: u16,
    },
    /// The request could not be completed: DNS, connection, TLS, timeout or protocol failure.
    #[error("network error while fetching {url}: {message}")]
    Network {
        /// The requested URL.
        url: String,
        /// Description of the failure (single line).
        message: String,
    },
    /// Reading or writing a local file or directory failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The downloaded file's SHA-256 does not start with the expected prefix.
    #[error("SHA-256 mismatch for {url}: expected a digest starting with {expected}, got {actual}")]
    HashMismatch {
        /// The requested URL.
        url: String,
        /// The expected digest prefix (lowercase hex).
        expected: String,
        /// The full digest of the received bytes (lowercase hex).
        actual: String,
    },
    /// The body received does not have the length announced by `Content-Length`, typically
    /// because the server closed the connection early.
    #[error(
        "truncated download from {url}: expected {expected_bytes} bytes, received {received} \
         (connection closed early?)"
    )]
    Truncated {
        /// The requested URL.
        url: String,
        /// The length announced by the server's `Content-Length` header.
        expected_bytes: u64,
        /// The number of body bytes actually received.
        received: u64,
    },
    /// No cache directory could be determined.
    #[error("no cache directory found: set {CACHE_ENV_VAR} to a writable directory")]
    NoCacheDir,
    /// The file name given to [`fetch`] is not a plain file name.
    #[error("invalid cache file name {name:?}: expected a plain file name without path separators")]
    InvalidFileName {
        /// The rejected file name.
        name: String,
    },
    /// The SHA-256 prefix given to [`fetch`] is not hexadecimal or is longer than a digest.
    #[error("invalid SHA-256 prefix {prefix:?}: expected at most 64 hexadecimal digits")]
    InvalidHashPrefix {
        /// The rejected prefix.
        prefix: String,
    },
}

impl DownloadError {
    /// Builds an [`DownloadError::Io`] for `path`.
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Builds a [`DownloadError::Network`], flattening the message onto one line.
    fn network(url: &str, message: impl std::fmt::Display) -> Self {
        Self::Network {
            url: url.to_owned(),
            message: single_line(&message.to_string()),
        }
    }
}

/// Replaces line breaks (and the whitespace around them) by single spaces.
fn single_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Options for [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Show a progress bar on stderr while downloading. The bar is hidden anyway when stderr is
    /// not a terminal.
    pub progress: bool,
    /// Network timeout: the longest wait for resolving the host, connecting, receiving the
    /// response headers, and for each single read or write on the connection. It bounds stalls,
    /// not the total duration of a (possibly large) download.
    pub timeout: Duration,
}

impl Default for DownloadOptions {
    /// Progress bar enabled, 30 second timeout.
    fn default() -> Self {
        Self {
            progress: true,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Where downloads are cached: `$RESNET_CACHE` if set, else `dirs::cache_dir()/resnet-rs`.
///
/// An empty `RESNET_CACHE` counts as unset. The directory is not created here; [`fetch`] creates
/// it when needed.
///
/// # Errors
///
/// [`DownloadError::NoCacheDir`] when `RESNET_CACHE` is unset and the platform has no cache
/// directory (e.g. `HOME` is unset on Linux).
pub fn cache_dir() -> Result<PathBuf, DownloadError> {
    cache_dir_from(std::env::var_os(CACHE_ENV_VAR))
}

/// [`cache_dir`] with the value of `RESNET_CACHE` passed in, so it can be tested without
/// mutating the process environment.
fn cache_dir_from(env_value: Option<OsString>) -> Result<PathBuf, DownloadError> {
    match env_value {
        Some(value) if !value.is_empty() => Ok(PathBuf::from(value)),
        _ => dirs::cache_dir()
            .map(|dir| dir.join(CACHE_SUBDIR))
            .ok_or(DownloadError::NoCacheDir),
    }
}

/// The 8-hex SHA-256 prefix torchvision puts in file names (`resnet50-11ad3fa6.pth` -> `11ad3fa6`), if any.
///
/// The prefix is the text between the last `-` of the name and the first `.` after it; it is
/// returned when it consists of 8 to 64 hexadecimal digits (torchvision always uses 8), and
/// `None` is returned otherwise (`resnet50.pth`, `model-v2.pth`, `resnet50-11ad3fa6`).
pub fn hash_prefix_from_file_name(name: &str) -> Option<&str> {
    let (_, after_dash) = name.rsplit_once('-')?;
    let (candidate, _extension) = after_dash.split_once('.')?;
    let is_hex = candidate.bytes().all(|b| b.is_ascii_hexdigit());
    (is_hex && (8..=SHA256_HEX_LEN).contains(&candidate.len())).then_some(candidate)
}

/// SHA-256 of a file, hex lowercase (streamed, constant memory).
///
/// # Errors
///
/// [`DownloadError::Io`] when the file cannot be opened or read.
pub fn sha256_file(path: &Path) -> Result<String, DownloadError> {
    let mut file = File::open(path).map_err(|e| DownloadError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DownloadError::io(path, e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Fetch `url` into `cache_dir/file_name`, verifying that the file's SHA-256 starts with
/// `sha256_prefix` (any length of hex, 8 for torchvision; empty = no check).
///
/// - If a cached file exists and verifies, return it without network access.
/// - If it exists but does not verify (corrupt / truncated), say so on stderr, delete it and
///   download it again.
/// - The download streams into a temporary file in the same directory
///   ([`tempfile::NamedTempFile`]), hashing as it goes, with a progress bar sized by
///   `Content-Length`. The number of bytes received is then checked against `Content-Length`
///   ([`DownloadError::Truncated`]) and the digest against the prefix
///   ([`DownloadError::HashMismatch`]); only then is the file renamed atomically to the final
///   path. A failure never leaves a partial or unverified file at the final path, and the
///   temporary file is removed.
/// - HTTP error statuses (404, ...) give [`DownloadError::Http`] with the status.
///
/// The prefix is compared case-insensitively. `cache_dir` is created if missing. Deleting a
/// cached file that fails verification before downloading means that even a failed
/// re-download leaves no unverified file behind. Redirects are followed, and the usual proxy
/// environment variables (`HTTPS_PROXY`, `NO_PROXY`, ...) are honoured.
///
/// # Errors
///
/// * [`DownloadError::InvalidFileName`] / [`DownloadError::InvalidHashPrefix`] for bad arguments
///   (checked before any I/O);
/// * [`DownloadError::Http`] for a non-2xx status, [`DownloadError::Network`] for DNS, connection,
///   TLS, timeout and protocol failures;
/// * [`DownloadError::Truncated`] when the body is shorter than its `Content-Length`;
/// * [`DownloadError::HashMismatch`] when the received bytes do not match `sha256_prefix`;
/// * [`DownloadError::Io`] when the cache directory or files cannot be read or written.
pub fn fetch(
    url: &str,
    file_name: &str,
    sha256_prefix: &str,
    cache_dir: &Path,
    options: &DownloadOptions,
) -> Result<PathBuf, DownloadError> {
    validate_file_name(file_name)?;
    let expected = normalize_prefix(sha256_prefix)?;
    let final_path = cache_dir.join(file_name);

    match fs::metadata(&final_path) {
        Ok(meta) if meta.is_file() => {
            let actual = sha256_file(&final_path)?;
            if actual.starts_with(&expected) {
                return Ok(final_path);
            }
            eprintln!(
                "warning: cached file {} is corrupt or incomplete (SHA-256 {actual}, expected a \
                 digest starting with {expected}); downloading it again",
                final_path.display()
            );
            remove_if_exists(&final_path)?;
        }
        Ok(_) => {
            return Err(DownloadError::io(
                &final_path,
                io::Error::other("exists but is not a regular file"),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DownloadError::io(&final_path, e)),
    }

    fs::create_dir_all(cache_dir).map_err(|e| DownloadError::io(cache_dir, e))?;
    download(url, file_name, &expected, cache_dir, &final_path, options)?;
    Ok(final_path)
}

/// Rejects names that are empty, `.`/`..`, or contain path separators, so that
/// `cache_dir.join(name)` always stays a direct child of the cache directory.
fn validate_file_name(name: &str) -> Result<(), DownloadError> {
    let has_separator = name.contains('/') || name.contains('\\');
    if name.is_empty() || name == "." || name == ".." || has_separator || name.contains('\0') {
        return Err(DownloadError::InvalidFileName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks that `prefix` is at most 64 hex digits and lowercases it.
fn normalize_prefix(prefix: &str) -> Result<String, DownloadError> {
    if prefix.len() > SHA256_HEX_LEN || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DownloadError::InvalidHashPrefix {
            prefix: prefix.to_owned(),
        });
    }
    Ok(prefix.to_ascii_lowercase())
}

/// Removes `path`, treating "already gone" as success.
fn remove_if_exists(path: &Path) -> Result<(), DownloadError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DownloadError::io(path, e)),
    }
}

/// Builds the HTTP agent used for one download.
fn agent(options: &DownloadOptions) -> ureq::Agent {
    let timeout = Some(options.timeout);
    let config = ureq::Agent::config_builder()
        // Return 4xx/5xx as responses so that the status can be reported as `Http`.
        .http_status_as_error(false)
        // Ask for the raw bytes: the hash is over the file, and Content-Length stays meaningful.
        .accept_encoding("identity")
        .user_agent(concat!("resnet-rs/", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(timeout)
        .timeout_connect(timeout)
        .timeout_recv_response(timeout)
        .timeout_per_read(timeout)
        .timeout_per_write(timeout)
        .build();
    ureq::Agent::new_with_config(config)
}

/// Creates the progress bar for a body of `length` bytes (a spinner when unknown).
fn progress_bar(length: Option<u64>, file_name: &str, options: &DownloadOptions) -> ProgressBar {
    let target = if options.progress && io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let template = match length {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
        None => "{msg} {spinner} {bytes} ({bytes_per_sec})",
    };
    let bar = ProgressBar::with_draw_target(length, target);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(file_name.to_owned());
    bar
}

/// Downloads `url` into a temporary file in `cache_dir`, verifies it and renames it to
/// `final_path`. On error the temporary file is removed (by `NamedTempFile`'s destructor).
fn download(
    url: &str,
    file_name: &str,
    expected: &str,
    cache_dir: &Path,
    final_path: &Path,
    options: &DownloadOptions,
) -> Result<(), DownloadError> {
    let response = agent(options).get(url).call().map_err(|e| match e {
        // Not produced with `http_status_as_error(false)`, but classify it anyway.
        ureq::Error::StatusCode(status) => DownloadError::Http {
            url: url.to_owned(),
            status,
        },
        other => DownloadError::network(url, other),
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(DownloadError::Http {
            url: url.to_owned(),
            status: status.as_u16(),
        });
    }
    let content_length = response.body().content_length();
    let mut body = response.into_body().into_reader();

    let temp_prefix = format!(".{file_name}.");
    let mut temp = tempfile::Builder::new()
        .prefix(&temp_prefix)
        .suffix(".part")
        .tempfile_in(cache_dir)
        .map_err(|e| DownloadError::io(cache_dir, e))?;

    if options.progress && io::stderr().is_terminal() {
        eprintln!("Downloading {url} to {}", final_path.display());
    }
    let bar = progress_bar(content_length, file_name, options);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    let mut received: u64 = 0;
    let streamed = loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ureq reports a connection closed before `Content-Length` bytes as UnexpectedEof
            // ("Peer disconnected"); a reset mid-body is the same situation.
            Err(e)
                if content_length.is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                    ) =>
            {
                break Err(DownloadError::Truncated {
                    url: url.to_owned(),
                    expected_bytes: content_length.unwrap_or_default(),
                    received,
                });
            }
            Err(e) => {
                break Err(DownloadError::network(
                    url,
                    format_args!("reading the response body failed after {received} bytes: {e}"),
                ));
            }
        };
        let chunk = &buffer[..n];
        hasher.update(chunk);
        if let Err(e) = temp.as_file_mut().write_all(chunk) {
            break Err(DownloadError::io(temp.path(), e));
        }
        received += n as u64;
        bar.inc(n as u64);
    };
    bar.finish_and_clear();
    streamed?;

    if let Some(expected_bytes) = content_length
        && received != expected_bytes
    {
        return Err(DownloadError::Truncated {
            url: url.to_owned(),
            expected_bytes,
            received,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.starts_with(expected) {
        return Err(DownloadError::HashMismatch {
            url: url.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }

    temp.as_file_mut()
        .sync_all()
        .map_err(|e| DownloadError::io(temp.path(), e))?;
    temp.persist(final_path)
        .map_err(|e| DownloadError::io(final_path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_prefix_from_torchvision_names() {
        assert_eq!(
            hash_prefix_from_file_name("resnet50-11ad3fa6.pth"),
            Some("11ad3fa6")
        );
        assert_eq!(
            hash_prefix_from_file_name("resnet18-f37072fd.pth"),
            Some("f37072fd")
        );
        assert_eq!(
            hash_prefix_from_file_name("wide_resnet50_2-32ee1156.pth"),
            Some("32ee1156")
        );
        assert_eq!(
            hash_prefix_from_file_name("resnext101_64x4d-173b62eb.pth"),
            Some("173b62eb")
        );
        // Only the part up to the first dot after the last dash counts.
        assert_eq!(
            hash_prefix_from_file_name("resnet50-11ad3fa6.pth.tar"),
            Some("11ad3fa6")
        );
        // A full digest is accepted too.
        let full = "a".repeat(64);
        assert_eq!(
            hash_prefix_from_file_name(&format!("m-{full}.pth")),
            Some(full.as_str())
        );
    }

    #[test]
    fn hash_prefix_absent_or_invalid() {
        for name in [
            "resnet50.pth",
            "resnet50-11ad3fa6",
            "model-v2.pth",
            "resnet50-11ad3fa.pth",
            "resnet50-11ad3fa6x.pth",
            "resnet50-.pth",
            "",
            "-",
            "a-b-c.pth",
        ] {
            assert_eq!(hash_prefix_from_file_name(name), None, "{name:?}");
        }
        let too_long = "a".repeat(65);
        assert_eq!(
            hash_prefix_from_file_name(&format!("m-{too_long}.pth")),
            None
        );
    }

    #[test]
    fn cache_dir_from_env_value() {
        assert_eq!(
            cache_dir_from(Some(OsString::from("/tmp/my-cache"))).ok(),
            Some(PathBuf::from("/tmp/my-cache"))
        );
        assert_eq!(
            cache_dir_from(Some(OsString::from("relative/cache"))).ok(),
            Some(PathBuf::from("relative/cache"))
        );
        // Unset or empty: the platform cache directory, or NoCacheDir when there is none.
        let fallback = dirs::cache_dir().map(|dir| dir.join("resnet-rs"));
        for value in [None, Some(OsString::new())] {
            match (cache_dir_from(value), &fallback) {
                (Ok(dir), Some(expected)) => assert_eq!(&dir, expected),
                (Err(DownloadError::NoCacheDir), None) => {}
                (other, expected) => panic!("got {other:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn cache_dir_matches_environment() {
        // Reads (never writes) the process environment.
        let expected = cache_dir_from(std::env::var_os(CACHE_ENV_VAR)).ok();
        assert_eq!(cache_dir().ok(), expected);
    }

    #[test]
    fn prefix_normalization() {
        assert_eq!(normalize_prefix("").ok().as_deref(), Some(""));
        assert_eq!(
            normalize_prefix("11AD3fa6").ok().as_deref(),
            Some("11ad3fa6")
        );
        assert!(matches!(
            normalize_prefix("xyz"),
            Err(DownloadError::InvalidHashPrefix { .. })
        ));
        assert!(matches!(
            normalize_prefix(&"0".repeat(65)),
            Err(DownloadError::InvalidHashPrefix { .. })
        ));
    }

    #[test]
    fn file_name_validation() {
        assert!(validate_file_name("resnet50-11ad3fa6.pth").is_ok());
        for bad in ["", ".", "..", "../x.pth", "a/b.pth", "a\\b.pth"] {
            assert!(
                matches!(
                    validate_file_name(bad),
                    Err(DownloadError::InvalidFileName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sha256_of_known_content() -> Result<(), DownloadError> {
        let dir = tempfile::tempdir().map_err(|e| DownloadError::io(Path::new("tmp"), e))?;
        let path = dir.path().join("abc.txt");
        fs::write(&path, b"abc").map_err(|e| DownloadError::io(&path, e))?;
        assert_eq!(
            sha256_file(&path)?,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").map_err(|e| DownloadError::io(&empty, e))?;
        assert_eq!(
            sha256_file(&empty)?,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(matches!(
            sha256_file(&dir.path().join("missing")),
            Err(DownloadError::Io { .. })
        ));
        Ok(())
    }

    #[test]
    fn messages_are_single_line() {
        let error = DownloadError::network("http://x/", "first line\n  second line\r\n");
        assert_eq!(
            error.to_string(),
            "network error while fetching http://x/: first line second line"
        );
    }
}
