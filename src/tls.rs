//! TLS on the listeners and development certificates.
//!
//! - [`acceptor`]: a rustls acceptor (ALPN `h2`, `http/1.1`) for a PEM certificate chain and
//!   private key. A missing, unreadable or inconsistent file stops start-up with the flag,
//!   the path and the reason.
//! - Renewals without restart: a background task re-reads both files every
//!   [`TlsOptions::reload_interval`] and, when their bytes changed and the new pair is
//!   valid, swaps the certificate for new handshakes. Connections already open keep theirs
//!   and are never dropped. A half-written pair (new certificate, old key) is ignored until
//!   it is consistent; the previous certificate keeps serving meanwhile.
//! - [`Secure`]: a request extension set on every request that arrived over TLS, so the
//!   proxy can build `https://` URLs (HTTP/1.1 request URIs carry no scheme).
//! - [`write_dev_cert`]: `budget-proxy gen-cert`, a self-signed certificate for given hosts.

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

/// Request extension: the request arrived on a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secure;

/// A PEM certificate chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// TLS settings of the two listeners.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// `--tls-cert`/`--tls-key`: TLS on the proxy port (plain HTTP when `None`).
    pub listener: Option<CertFiles>,
    /// `--admin-tls-cert`/`--admin-tls-key`: TLS on the admin port.
    pub admin: Option<CertFiles>,
    /// How often the certificate files are checked for a renewal.
    pub reload_interval: Duration,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            listener: None,
            admin: None,
            reload_interval: Duration::from_secs(1),
        }
    }
}

/// The crypto provider used everywhere (ring: no cmake/aws-lc build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Longest TLS handshake a listener waits for before closing the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the current certificate to every handshake; swapped by the reload task.
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Parse a certificate chain and key, and check that they belong together.
/// `flag` names the flags in messages (`tls` → `--tls-cert`, `--tls-key`).
fn certified_key(
    files: &CertFiles,
    flag: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<CertifiedKey> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--{flag}-cert {cert_path}: not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        anyhow::bail!(
            "--{flag}-cert {cert_path}: no certificate found (expected a PEM block -----BEGIN CERTIFICATE-----)"
        );
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow::anyhow!(
            "--{flag}-key {key_path}: no private key found (expected a PEM block -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
        ),
        e => anyhow::anyhow!("--{flag}-key {key_path}: not a PEM private key: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
            "--{flag}-key {key_path} does not belong to the certificate in --{flag}-cert {cert_path} ({e})"
        ),
        e => anyhow::anyhow!(
            "--{flag}-cert {cert_path} / --{flag}-key {key_path}: unusable certificate or key: {e}"
        ),
    })
}

async fn read(path: &Path, flag: &str, which: &str) -> anyhow::Result<Vec<u8>> {
    tokio::fs::read(path).await.map_err(|e| {
        anyhow::anyhow!(
            "--{flag}-{which} {}: cannot read the file: {e}",
            path.display()
        )
    })
}

/// A TLS acceptor for `files` (ALPN `h2`, `http/1.1`), with a background task that picks
/// up a renewed certificate within `reload_interval`. `flag` is `tls` or `admin-tls` (for
/// messages). The task ends by itself once the acceptor and every connection are gone.
pub async fn acceptor(
    files: &CertFiles,
    flag: &'static str,
    reload_interval: Duration,
) -> anyhow::Result<TlsAcceptor> {
    let cert_pem = read(&files.cert, flag, "cert").await?;
    let key_pem = read(&files.key, flag, "key").await?;
    let key = certified_key(files, flag, &cert_pem, &key_pem)?;
    let resolver = Arc::new(Resolver {
        current: ArcSwap::from_pointee(key),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reloader = Reloader {
        files: files.clone(),
        flag,
        resolver: Arc::downgrade(&resolver),
        seen: (cert_pem, key_pem),
        last_error: None,
    };
    tokio::spawn(reloader.run(reload_interval.max(Duration::from_millis(10))));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Watches the certificate files and swaps the resolver's certificate when they change.
struct Reloader {
    files: CertFiles,
    flag: &'static str,
    resolver: Weak<Resolver>,
    /// The bytes last looked at (loaded or rejected): each change is handled once.
    seen: (Vec<u8>, Vec<u8>),
    /// The last reason the files could not be used, so it is logged once, not every tick.
    last_error: Option<String>,
}

impl Reloader {
    async fn run(mut self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(resolver) = self.resolver.upgrade() else {
                return;
            };
            self.check(&resolver).await;
        }
    }

    async fn check(&mut self, resolver: &Resolver) {
        let files = async {
            let cert = read(&self.files.cert, self.flag, "cert").await?;
            let key = read(&self.files.key, self.flag, "key").await?;
            anyhow::Ok((cert, key))
        }
        .await;
        let (cert, key) = match files {
            Ok(f) => f,
            Err(e) => return self.failed(e),
        };
        if (&cert, &key) == (&self.seen.0, &self.seen.1) {
            return;
        }
        let loaded = certified_key(&self.files, self.flag, &cert, &key);
        self.seen = (cert, key);
        match loaded {
            Ok(k) => {
                resolver.current.store(Arc::new(k));
                self.last_error = None;
                tracing::info!(target: "tls", cert = %self.files.cert.display(), key = %self.files.key.display(),
                    "certificate reloaded: new connections use it");
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: anyhow::Error) {
        let msg = format!("{e:#}");
        if self.last_error.as_deref() != Some(&msg) {
            tracing::warn!(target: "tls", error = %msg, "certificate files changed but cannot be used; still serving the previous certificate");
            self.last_error = Some(msg);
        }
    }
}

/// A self-signed development certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// The certificate (also the trust anchor clients pin).
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// A self-signed ECDSA P-256 certificate for `hosts` (DNS names or IP addresses), valid
/// from yesterday for `days` days, for TLS servers (`serverAuth`).
pub fn self_signed(hosts: &[String], days: u32) -> anyhow::Result<DevCert> {
    use chrono::Datelike as _;
    if hosts.is_empty() {
        anyhow::bail!("give at least one --host (a DNS name or an IP address)");
    }
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .map_err(|e| anyhow::anyhow!("invalid --host in {hosts:?}: {e}"))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, hosts[0].as_str());
    dn.push(
        rcgen::DnType::OrganizationName,
        "budget-proxy development certificate",
    );
    params.distinguished_name = dn;
    // Whole days (rcgen takes a calendar date): u8 conversions of month and day cannot fail.
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    let today = chrono::Utc::now().date_naive();
    params.not_before = ymd(today - chrono::Days::new(1));
    params.not_after = ymd(today + chrono::Days::new(u64::from(days.max(1))));
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().context("generating a key pair")?;
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    Ok(DevCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// `budget-proxy gen-cert`: write `cert.pem` and `key.pem` (mode 0600) into `out_dir`
/// (created if needed). Existing files are kept unless `force`. Returns both paths.
pub fn write_dev_cert(
    out_dir: &Path,
    hosts: &[String],
    days: u32,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                anyhow::bail!(
                    "{} already exists; pass --force to overwrite it",
                    p.display()
                );
            }
        }
    }
    let dev = self_signed(hosts, days)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    write_file(&key_path, dev.key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, dev.cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        opts.mode(mode);
        let mut f = opts
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        // An existing file keeps its mode on open: set it explicitly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        let mut f = opts
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn files(dir: &Path) -> CertFiles {
        CertFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    #[test]
    fn self_signed_pair_is_consistent() {
        let dev = self_signed(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
        let f = files(Path::new("/x"));
        certified_key(&f, "tls", dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn mismatched_key_names_both_files() {
        let a = self_signed(&["localhost".into()], 30).unwrap();
        let b = self_signed(&["localhost".into()], 30).unwrap();
        let f = files(Path::new("/x"));
        let e = certified_key(&f, "tls", a.cert_pem.as_bytes(), b.key_pem.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/key.pem") && e.contains("/x/cert.pem"), "{e}");
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn empty_files_say_what_is_missing() {
        let f = files(Path::new("/x"));
        let dev = self_signed(&["localhost".into()], 30).unwrap();
        let e = certified_key(&f, "tls", b"", dev.key_pem.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-cert /x/cert.pem: no certificate found"),
            "{e}"
        );
        let e = certified_key(&f, "admin-tls", dev.cert_pem.as_bytes(), b"junk")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--admin-tls-key /x/key.pem: no private key"),
            "{e}"
        );
    }

    #[test]
    fn write_dev_cert_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_dev_cert(dir.path(), &["localhost".into()], 30, false).unwrap();
        assert!(c.exists() && k.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let e = write_dev_cert(dir.path(), &["localhost".into()], 30, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        write_dev_cert(dir.path(), &["localhost".into()], 30, true).unwrap();
    }
}
