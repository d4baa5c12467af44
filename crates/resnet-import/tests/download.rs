//! Tests of `resnet_import::download::fetch` against a tiny local HTTP/1.1 server.
//!
//! No network access beyond 127.0.0.1: each test starts its own server on an ephemeral port.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use resnet_import::download::{DownloadError, DownloadOptions, fetch, sha256_file};
use sha2::{Digest, Sha256};

/// Size of the served checkpoint.
const BODY_LEN: usize = 200 * 1024;
/// Bytes actually sent for `/truncated.pth` (out of `BODY_LEN` announced).
const TRUNCATED_LEN: usize = 70 * 1024;
/// The server stops by itself after this many connections...
const MAX_CONNECTIONS: usize = 32;
/// ... or after this long.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes (xorshift64*).
fn checkpoint_bytes() -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..BODY_LEN)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A local HTTP server answering one request per connection, then closing it.
struct TestServer {
    addr: SocketAddr,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local address");
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            thread::spawn(move || serve(&listener, &requests, &stop))
        };
        Self {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Number of requests received so far for `path`.
    fn requests(&self, path: &str) -> usize {
        let map = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(path).copied().unwrap_or(0)
    }

    fn total_requests(&self) -> usize {
        let map = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().sum()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, requests: &Mutex<HashMap<String, usize>>, stop: &AtomicBool) {
    let body = checkpoint_bytes();
    let deadline = Instant::now() + SERVER_LIFETIME;
    let mut connections = 0;
    while connections < MAX_CONNECTIONS && !stop.load(Ordering::SeqCst) && Instant::now() < deadline
    {
        match listener.accept() {
            Ok((stream, _)) => {
                connections += 1;
                // Errors only affect this connection; the client sees them as network errors.
                let _ = handle(stream, &body, requests);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn handle(
    mut stream: TcpStream,
    body: &[u8],
    requests: &Mutex<HashMap<String, usize>>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;

    // Read the request head (GET requests have no body).
    let mut head = Vec::new();
    let mut buf = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned();
    *requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(path.clone())
        .or_insert(0) += 1;

    let ok_head = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    match path.as_str() {
        "/good.pth" | "/wrong.pth" => {
            stream.write_all(ok_head(body.len()).as_bytes())?;
            stream.write_all(body)?;
        }
        "/truncated.pth" => {
            // Announce the full length, send part of it, then close.
            stream.write_all(ok_head(body.len()).as_bytes())?;
            stream.write_all(&body[..TRUNCATED_LEN])?;
        }
        _ => {
            let text = b"not found\n";
            stream.write_all(
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    text.len()
                )
                .as_bytes(),
            )?;
            stream.write_all(text)?;
        }
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

fn options() -> DownloadOptions {
    DownloadOptions {
        progress: false,
        timeout: Duration::from_secs(10),
    }
}

fn cache() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary cache directory")
}

/// Names of all entries of `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read cache directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_single_line(error: &DownloadError) {
    let message = error.to_string();
    assert!(!message.contains('\n'), "multi-line message: {message:?}");
    assert!(!message.contains('\r'), "multi-line message: {message:?}");
}

#[test]
fn good_file_downloads_and_verifies() {
    let server = TestServer::start();
    let dir = cache();
    let body = checkpoint_bytes();
    let digest = sha256_hex(&body);

    let path = fetch(
        &server.url("/good.pth"),
        "good-checkpoint.pth",
        &digest[..8],
        dir.path(),
        &options(),
    )
    .expect("download succeeds");

    assert_eq!(path, dir.path().join("good-checkpoint.pth"));
    assert_eq!(fs::read(&path).expect("read download"), body);
    assert_eq!(sha256_file(&path).expect("hash download"), digest);
    assert_eq!(server.requests("/good.pth"), 1);
    assert_eq!(entries(dir.path()), ["good-checkpoint.pth"]);
}

#[test]
fn full_digest_uppercase_and_empty_prefix_are_accepted() {
    let server = TestServer::start();
    let dir = cache();
    let digest = sha256_hex(&checkpoint_bytes());

    // Full 64-digit digest, upper case: compared case-insensitively.
    let upper = digest.to_ascii_uppercase();
    fetch(
        &server.url("/good.pth"),
        "a.pth",
        &upper,
        dir.path(),
        &options(),
    )
    .expect("upper-case full digest verifies");
    // Empty prefix: no check, but still a complete download.
    let path = fetch(
        &server.url("/good.pth"),
        "b.pth",
        "",
        dir.path(),
        &options(),
    )
    .expect("no hash check");
    assert_eq!(sha256_file(&path).expect("hash"), digest);
    assert_eq!(server.requests("/good.pth"), 2);
    assert_eq!(entries(dir.path()), ["a.pth", "b.pth"]);
}

#[test]
fn second_fetch_is_a_cache_hit() {
    let server = TestServer::start();
    let dir = cache();
    let digest = sha256_hex(&checkpoint_bytes());
    let url = server.url("/good.pth");

    let first = fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("download");
    assert_eq!(server.total_requests(), 1);
    let second = fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("cache hit");
    assert_eq!(first, second);
    assert_eq!(
        server.total_requests(),
        1,
        "a verified cache hit must not touch the network"
    );

    // A cache hit works even when the server is gone.
    drop(server);
    let third = fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("offline hit");
    assert_eq!(third, first);
}

#[test]
fn corrupted_cache_is_downloaded_again() {
    let server = TestServer::start();
    let dir = cache();
    let body = checkpoint_bytes();
    let digest = sha256_hex(&body);
    let url = server.url("/good.pth");

    let path = fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("download");
    assert_eq!(server.requests("/good.pth"), 1);

    // Corrupt a few bytes in place.
    let mut corrupted = body.clone();
    for byte in &mut corrupted[1000..1016] {
        *byte ^= 0xFF;
    }
    fs::write(&path, &corrupted).expect("corrupt cache");
    let again = fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("re-download");
    assert_eq!(again, path);
    assert_eq!(server.requests("/good.pth"), 2, "exactly one new request");
    assert_eq!(fs::read(&path).expect("read"), body);

    // A truncated cache file is detected too.
    fs::write(&path, &body[..1000]).expect("truncate cache");
    fetch(&url, "good.pth", &digest[..8], dir.path(), &options()).expect("re-download");
    assert_eq!(server.requests("/good.pth"), 3);
    assert_eq!(fs::read(&path).expect("read"), body);
    assert_eq!(entries(dir.path()), ["good.pth"]);
}

#[test]
fn truncated_body_is_an_error_and_leaves_nothing() {
    let server = TestServer::start();
    let dir = cache();
    let digest = sha256_hex(&checkpoint_bytes());
    let url = server.url("/truncated.pth");

    let error = fetch(&url, "truncated.pth", &digest[..8], dir.path(), &options())
        .expect_err("short body must fail");
    match &error {
        DownloadError::Truncated {
            url: error_url,
            expected_bytes,
            received,
        } => {
            assert_eq!(error_url, &url);
            assert_eq!(*expected_bytes, BODY_LEN as u64);
            assert!(*received < BODY_LEN as u64, "received {received}");
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(error.to_string().contains(&url), "{error}");
    assert_single_line(&error);
    assert_eq!(server.requests("/truncated.pth"), 1);
    assert!(!dir.path().join("truncated.pth").exists());
    assert_eq!(
        entries(dir.path()),
        Vec::<String>::new(),
        "no temp file left"
    );

    // Also without a hash to check: the length check alone catches it.
    let error =
        fetch(&url, "truncated.pth", "", dir.path(), &options()).expect_err("short body must fail");
    assert!(
        matches!(error, DownloadError::Truncated { .. }),
        "{error:?}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn wrong_hash_is_an_error_and_leaves_nothing() {
    let server = TestServer::start();
    let dir = cache();
    let digest = sha256_hex(&checkpoint_bytes());
    let url = server.url("/wrong.pth");
    let wrong_prefix = if digest.starts_with("0000") {
        "ffff"
    } else {
        "0000"
    };

    let error = fetch(&url, "wrong.pth", wrong_prefix, dir.path(), &options())
        .expect_err("hash mismatch must fail");
    match &error {
        DownloadError::HashMismatch {
            url: error_url,
            expected,
            actual,
        } => {
            assert_eq!(error_url, &url);
            assert_eq!(expected, wrong_prefix);
            assert_eq!(actual, &digest);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(wrong_prefix), "{message}");
    assert!(message.contains(&digest), "{message}");
    assert_single_line(&error);
    assert!(!dir.path().join("wrong.pth").exists());
    assert_eq!(
        entries(dir.path()),
        Vec::<String>::new(),
        "no temp file left"
    );
}

#[test]
fn wrong_hash_on_redownload_leaves_no_stale_file() {
    let server = TestServer::start();
    let dir = cache();
    // A stale, unverifiable file at the final path is removed even if the new download fails.
    fs::write(dir.path().join("wrong.pth"), b"stale").expect("write stale file");
    let error = fetch(
        &server.url("/wrong.pth"),
        "wrong.pth",
        "0123abcd",
        dir.path(),
        &options(),
    )
    .expect_err("mismatch");
    assert!(
        matches!(error, DownloadError::HashMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn not_found_is_an_http_error_and_leaves_nothing() {
    let server = TestServer::start();
    let dir = cache();
    let url = server.url("/missing.pth");

    let error = fetch(&url, "missing.pth", "", dir.path(), &options()).expect_err("404");
    match &error {
        DownloadError::Http {
            url: error_url,
            status,
        } => {
            assert_eq!(error_url, &url);
            assert_eq!(*status, 404);
        }
        other => panic!("expected Http, got {other:?}"),
    }
    assert!(error.to_string().contains("404"), "{error}");
    assert_single_line(&error);
    assert_eq!(server.requests("/missing.pth"), 1);
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn error_messages_are_single_line() {
    let server = TestServer::start();
    let dir = cache();
    let digest = sha256_hex(&checkpoint_bytes());

    // A port nobody listens on: bind, note the port, close.
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let errors = [
        fetch(
            &server.url("/missing.pth"),
            "m.pth",
            "",
            dir.path(),
            &options(),
        ),
        fetch(
            &server.url("/truncated.pth"),
            "t.pth",
            "",
            dir.path(),
            &options(),
        ),
        fetch(
            &server.url("/wrong.pth"),
            "w.pth",
            "0000abcd",
            dir.path(),
            &options(),
        ),
        fetch(
            &format!("http://127.0.0.1:{closed_port}/good.pth"),
            "c.pth",
            &digest[..8],
            dir.path(),
            &options(),
        ),
        fetch("not a url", "u.pth", "", dir.path(), &options()),
        fetch(
            &server.url("/good.pth"),
            "../escape.pth",
            "",
            dir.path(),
            &options(),
        ),
        fetch(
            &server.url("/good.pth"),
            "x.pth",
            "not-hex",
            dir.path(),
            &options(),
        ),
    ];
    let mut kinds = Vec::new();
    for result in errors {
        let error = result.expect_err("every case fails");
        assert_single_line(&error);
        kinds.push(match error {
            DownloadError::Http { .. } => "http",
            DownloadError::Truncated { .. } => "truncated",
            DownloadError::HashMismatch { .. } => "hash",
            DownloadError::Network { ref url, .. } => {
                assert!(error.to_string().contains(url.as_str()), "{error}");
                "network"
            }
            DownloadError::InvalidFileName { .. } => "file-name",
            DownloadError::InvalidHashPrefix { .. } => "prefix",
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        kinds,
        [
            "http",
            "truncated",
            "hash",
            "network",
            "network",
            "file-name",
            "prefix"
        ]
    );
    // Invalid arguments are rejected before any request is made.
    assert_eq!(server.requests("/good.pth"), 0);
    assert_eq!(entries(dir.path()), Vec::<String>::new());

    // The cache directory lies under a regular file: creating it fails with an I/O error.
    fs::write(dir.path().join("blocker"), b"x").expect("write");
    let io_error = fetch(
        &server.url("/good.pth"),
        "good.pth",
        "",
        &dir.path().join("blocker").join("sub"),
        &options(),
    )
    .expect_err("cache dir under a file");
    assert!(matches!(io_error, DownloadError::Io { .. }), "{io_error:?}");
    assert_single_line(&io_error);
}

#[test]
fn missing_cache_directory_is_created() {
    let server = TestServer::start();
    let dir = cache();
    let nested = dir.path().join("a").join("b");
    let path = fetch(
        &server.url("/good.pth"),
        "good.pth",
        "",
        &nested,
        &options(),
    )
    .expect("download into a new directory");
    assert_eq!(path, nested.join("good.pth"));
    assert_eq!(fs::read(&path).expect("read"), checkpoint_bytes());
}

/// Documents the ureq behaviour `fetch` relies on: a body shorter than its `Content-Length`
/// makes the body reader fail with `UnexpectedEof` rather than end early with `Ok(0)`.
#[test]
fn ureq_reports_short_body_as_unexpected_eof() {
    let server = TestServer::start();
    let response = ureq::get(server.url("/truncated.pth"))
        .call()
        .expect("headers arrive");
    assert_eq!(response.body().content_length(), Some(BODY_LEN as u64));
    let mut received = Vec::new();
    let error = response
        .into_body()
        .into_reader()
        .read_to_end(&mut received)
        .expect_err("short body");
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    assert_eq!(received.len(), TRUNCATED_LEN);
}
