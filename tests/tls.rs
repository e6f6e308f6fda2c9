//! TLS on both sides, with certificates generated here (a CA and leaves signed by it):
//! the mock upstream over TLS (HTTP/2 by ALPN, multiplexed), the proxy's TLS listeners
//! verified against the CA, SSE end to end over h2 on both hops, an untrusted upstream
//! certificate (502 naming the reason), start-up errors naming the file, certificate
//! rotation without restart, and `budget-proxy gen-cert`.
#![allow(clippy::unwrap_used)]

mod common;

use budget_proxy::app::{self, Options, Running};
use budget_proxy::tls::CertFiles;
use common::mock_gemini::{Behavior, MockGemini};
use common::{hello, options, CONFIG};
use futures_util::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A test CA: its PEM certificate and what it needs to sign leaves.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
    fn leaf(&self) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).unwrap();
        path.to_path_buf()
    }
}

/// Write a leaf to `dir/cert.pem` and `dir/key.pem`.
fn write_leaf(dir: &Path, (cert, key): &(String, String)) -> CertFiles {
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

/// A client that trusts only `ca_pem` (no built-in roots). ALPN offers h2 and http/1.1.
fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

struct Setup {
    mock: MockGemini,
    app: Running,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// The proxy in front of `mock`, with `tweak` applied to its options (the directory
    /// holds budgets.json and is where the tweak may write files).
    async fn start(mock: MockGemini, tweak: impl FnOnce(&Path, &mut Options)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let opts = Self::options(dir.path(), &mock, tweak);
        let app = app::start(opts).await.unwrap();
        Setup {
            mock,
            app,
            _dir: dir,
        }
    }

    fn options(dir: &Path, mock: &MockGemini, tweak: impl FnOnce(&Path, &mut Options)) -> Options {
        let config_path = dir.join("budgets.json");
        std::fs::write(&config_path, CONFIG).unwrap();
        let mut opts = options(&dir.join("state"), config_path, &mock.url);
        tweak(dir, &mut opts);
        opts
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.app.proxy_addr)
    }

    async fn used(&self, agent: &str) -> u64 {
        let r = reqwest::Client::new()
            .get(format!(
                "http://{}/api/budget/status/{agent}",
                self.app.admin_addr
            ))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["used_tokens"]
            .as_u64()
            .unwrap()
    }
}

/// A mock upstream over TLS with a leaf of `ca`.
async fn tls_mock(ca: &Ca) -> MockGemini {
    let (cert, key) = ca.leaf();
    MockGemini::start_tls(&cert, &key).await
}

const GENERATE: &str = "/agents/sage/v1beta/models/gemini-2.5-flash:generateContent";
const STREAM: &str = "/agents/sage/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upstream_over_tls_with_private_ca_uses_one_multiplexed_h2_connection() {
    let ca = Ca::new("upstream test CA");
    let mock = tls_mock(&ca).await;
    let s = Setup::start(mock, |dir, o| {
        o.upstream_ca = Some(ca.write(&dir.join("upstream-ca.pem")));
    })
    .await;
    let http = reqwest::Client::new();
    // One request first: the pool then knows the connection speaks h2 and shares it.
    let r = http
        .post(s.url("http", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    s.mock.set_behavior(
        Behavior::new()
            .chunks(2)
            .chunk_delay(Duration::from_millis(50)),
    );
    let concurrent = (0..8).map(|_| {
        let http = http.clone();
        let url = s.url("http", STREAM);
        async move {
            let r = http.post(url).json(&hello()).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    });
    for body in futures_util::future::join_all(concurrent).await {
        assert_eq!(body.matches("data: ").count(), 2, "{body}");
    }
    let received = s.mock.received();
    assert_eq!(received.len(), 9);
    assert!(
        received.iter().all(|r| r.version == http::Version::HTTP_2),
        "versions: {:?}",
        received.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    assert_eq!(
        s.mock.tls_connections(),
        1,
        "9 requests, 8 of them concurrent, should share one HTTP/2 connection"
    );
    assert_eq!(s.used("sage").await, 9 * 30);
}

#[tokio::test]
async fn proxy_and_admin_listeners_serve_tls_verified_against_the_ca() {
    let ca = Ca::new("listener test CA");
    let admin_ca = Ca::new("admin test CA");
    let s = Setup::start(MockGemini::start().await, |dir, o| {
        let proxy_dir = dir.join("proxy");
        let admin_dir = dir.join("admin");
        std::fs::create_dir_all(&proxy_dir).unwrap();
        std::fs::create_dir_all(&admin_dir).unwrap();
        o.tls.listener = Some(write_leaf(&proxy_dir, &ca.leaf()));
        o.tls.admin = Some(write_leaf(&admin_dir, &admin_ca.leaf()));
    })
    .await;

    // HTTP/2 by ALPN.
    let h2 = client(&ca.pem);
    let r = h2
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.headers()["x-budget-agent"], "sage");

    // HTTP/1.1 (the request URI has no scheme): the upload URL still points at https.
    let h1 = reqwest::Client::builder()
        .http1_only()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = h1
        .post(s.url("https", "/agents/sage/upload/v1beta/files"))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_11);
    let upload_url = r.headers()["x-goog-upload-url"].to_str().unwrap();
    assert!(
        upload_url.starts_with(&s.url("https", "/agents/sage/upload/v1beta/files?upload_id=")),
        "{upload_url}"
    );

    // A client that does not trust the CA is refused at the handshake.
    let stranger = client(&Ca::new("another CA").pem);
    let e = stranger
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");

    // The admin port speaks TLS with its own certificate.
    let admin = client(&admin_ca.pem);
    let r = admin
        .get(format!("https://{}/healthz", s.app.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", s.app.admin_addr))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP on the TLS admin port must not work"
    );
}

#[tokio::test]
async fn sse_streams_chunk_by_chunk_over_h2_on_both_hops() {
    let upstream_ca = Ca::new("upstream test CA");
    let listener_ca = Ca::new("listener test CA");
    let mock = tls_mock(&upstream_ca).await;
    let n = 4;
    mock.set_behavior(
        Behavior::new()
            .usage(10, 40, 0)
            .chunks(n)
            .chunk_delay(Duration::from_millis(150)),
    );
    let s = Setup::start(mock, |dir, o| {
        o.upstream_ca = Some(upstream_ca.write(&dir.join("upstream-ca.pem")));
        o.tls.listener = Some(write_leaf(dir, &listener_ca.leaf()));
    })
    .await;
    let r = client(&listener_ca.pem)
        .post(s.url("https", STREAM))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2, "client hop");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let mut frames = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if frames.is_empty() {
            // The first chunk is here while the upstream has not sent its last one yet:
            // nothing is buffered on the way.
            let sent = s.mock.last_sent_usages()[0].unwrap();
            assert!(
                sent.candidates < 40,
                "the first chunk arrived only after the whole stream was sent: {sent:?}"
            );
        }
        frames.push(chunk);
    }
    let text = String::from_utf8(frames.concat()).unwrap();
    assert_eq!(text.matches("data: ").count(), n);
    assert!(
        frames.len() >= n,
        "chunks were coalesced: {} frames",
        frames.len()
    );
    assert_eq!(
        s.mock.received()[0].version,
        http::Version::HTTP_2,
        "upstream hop"
    );
    assert_eq!(s.used("sage").await, 50);
}

#[tokio::test]
async fn untrusted_upstream_certificate_gives_502_naming_the_reason() {
    let real_ca = Ca::new("the CA that signed the upstream");
    let other_ca = Ca::new("a CA the proxy trusts");
    let s = Setup::start(tls_mock(&real_ca).await, |dir, o| {
        o.upstream_ca = Some(other_ca.write(&dir.join("upstream-ca.pem")));
    })
    .await;
    let r = reqwest::Client::new()
        .post(s.url("http", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], 502);
    assert_eq!(body["error"]["status"], "UNAVAILABLE");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("invalid peer certificate") && message.contains("UnknownIssuer"),
        "{message}"
    );
    assert!(message.contains("--upstream-ca"), "{message}");
    assert_eq!(s.mock.request_count(), 0);
    assert_eq!(s.used("sage").await, 0);
}

#[tokio::test]
async fn an_upstream_that_never_finishes_the_handshake_is_bounded_by_connect_timeout() {
    // Accepts TCP connections and never answers the ClientHello.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("budgets.json");
    std::fs::write(&config_path, CONFIG).unwrap();
    let mut opts = options(
        &dir.path().join("state"),
        config_path,
        &format!("https://{addr}"),
    );
    opts.connect_timeout = Duration::from_millis(300);
    let app = app::start(opts).await.unwrap();
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("http://{}{GENERATE}", app.proxy_addr))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--connect-timeout"), "{message}");
    held.abort();
}

#[tokio::test]
async fn unusable_certificate_files_stop_startup_naming_the_file_and_reason() {
    let mock = MockGemini::start().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-cert.pem");

    let opts = Setup::options(dir.path(), &mock, |d, o| {
        o.tls.listener = Some(CertFiles {
            cert: missing.clone(),
            key: d.join("key.pem"),
        });
    });
    let e = format!("{:#}", app::start(opts).await.err().unwrap());
    assert!(
        e.contains(&format!("--tls-cert {}", missing.display()))
            && e.contains("No such file or directory"),
        "{e}"
    );

    // A key that belongs to another certificate.
    let ca = Ca::new("test CA");
    let (cert, _) = ca.leaf();
    let (_, other_key) = ca.leaf();
    let sub = dir.path().join("mismatch");
    std::fs::create_dir_all(&sub).unwrap();
    let files = write_leaf(&sub, &(cert, other_key));
    let opts = Setup::options(dir.path(), &mock, |_, o| o.tls.admin = Some(files.clone()));
    let e = format!("{:#}", app::start(opts).await.err().unwrap());
    assert!(
        e.contains(&format!("--admin-tls-key {}", files.key.display()))
            && e.contains("does not belong"),
        "{e}"
    );

    // Not PEM at all.
    std::fs::write(&files.cert, "hello").unwrap();
    let opts = Setup::options(dir.path(), &mock, |_, o| {
        o.tls.listener = Some(files.clone())
    });
    let e = format!("{:#}", app::start(opts).await.err().unwrap());
    assert!(
        e.contains(&format!("--tls-cert {}", files.cert.display()))
            && e.contains("no certificate found"),
        "{e}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_restart_or_dropped_connections() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let mock = MockGemini::start().await;
    mock.set_behavior(
        Behavior::new()
            .chunks(3)
            .chunk_delay(Duration::from_millis(200)),
    );
    let cert_dir = tempfile::tempdir().unwrap();
    let files = write_leaf(cert_dir.path(), &old_ca.leaf());
    let s = Setup::start(mock, |_, o| {
        o.tls.listener = Some(files.clone());
        o.tls.reload_interval = Duration::from_millis(50);
    })
    .await;

    // A client of the old certificate, with a stream in flight across the renewal.
    let old_client = client(&old_ca.pem);
    let r = old_client
        .post(s.url("https", STREAM))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut in_flight = r.bytes_stream();
    let first = in_flight.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // Renew in place: same paths, a new key, signed by another CA. Written one file after
    // the other, so the proxy may briefly see the new certificate with the old key.
    let (cert, key) = new_ca.leaf();
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();

    // Bounded polling: the files are checked every 50 ms.
    let new_client = client(&new_ca.pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match new_client.get(s.url("https", "/healthz-none")).send().await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "renewal not picked up: {e:?}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
    let r = new_client
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The stream that started before the renewal finishes on its connection.
    let mut rest = Vec::new();
    while let Some(chunk) = in_flight.next().await {
        rest.push(chunk.unwrap());
    }
    let text = String::from_utf8([first.to_vec(), rest.concat()].concat()).unwrap();
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    // The old client's pooled connection is still open and usable.
    let r = old_client
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // New handshakes get the new certificate only.
    let e = client(&old_ca.pem)
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
}

#[tokio::test]
async fn shutdown_lets_a_stream_on_a_tls_connection_finish() {
    let ca = Ca::new("listener test CA");
    let mock = MockGemini::start().await;
    mock.set_behavior(
        Behavior::new()
            .chunks(4)
            .chunk_delay(Duration::from_millis(100)),
    );
    let s = Setup::start(mock, |dir, o| {
        o.tls.listener = Some(write_leaf(dir, &ca.leaf()));
    })
    .await;
    let url = s.url("https", STREAM);
    let r = client(&ca.pem)
        .post(&url)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let Setup { app, _dir, .. } = s;
    let stopping = tokio::spawn(app.shutdown());
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    // The listener is closed: new connections are refused.
    assert!(client(&ca.pem).get(&url).send().await.is_err());
}

#[tokio::test]
async fn gen_cert_writes_a_dev_certificate_the_proxy_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_budget-proxy"));
        cmd.args(["gen-cert", "--host", "localhost", "--host", "127.0.0.1"])
            .arg("--out-dir")
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let o = run(false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = run(false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let cert_pem = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let files = CertFiles {
        cert: out.join("cert.pem"),
        key: out.join("key.pem"),
    };
    let s = Setup::start(MockGemini::start().await, |_, o| {
        o.tls.listener = Some(files.clone());
    })
    .await;
    // The self-signed certificate is its own trust anchor.
    let r = client(&cert_pem)
        .post(s.url("https", GENERATE))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn serve_refuses_unreadable_certificate_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("cert.pem");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_budget-proxy"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .env_remove("BUDGET_PROXY_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("--tls-cert {}", missing.display()))
            && stderr.contains("No such file or directory"),
        "{stderr}"
    );

    // One flag without the other is refused by the command line.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_budget-proxy"))
        .args(["serve", "--tls-cert", "x.pem"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--tls-key"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
