//! The live config: the current [`Config`] behind an `ArcSwap` (one atomic load per request),
//! reloads from disk (file watch, SIGHUP), and admin edits written back to the file.
//!
//! A reload validates the whole file first and swaps only if it is good; a bad file keeps
//! the last good config and is reported (`last_error`). In-flight requests keep the snapshot
//! they loaded. The proxy remembers the hash of what it wrote itself, so the watcher's echo
//! of an admin edit is not a reload; a later manual edit (another hash) wins as usual.

use super::{Config, ConfigError};
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What `/api/budget/config` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigInfo {
    /// The file.
    pub path: String,
    /// When the running config was loaded (RFC 3339).
    pub loaded_at: String,
    /// sha256 of the running config's file text.
    pub sha256: String,
    /// The last refused reload, if it came after the last good one.
    pub last_error: Option<LastError>,
    /// Reloads that were applied.
    pub reloads_ok: u64,
    /// Reloads that were refused.
    pub reloads_failed: u64,
}

/// A refused reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    /// What was wrong (file, field or line and column).
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

#[derive(Debug)]
struct State {
    loaded_at: DateTime<Utc>,
    sha256: [u8; 32],
    last_error: Option<LastError>,
}

/// Why an admin update was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The patch is not a JSON object of budget fields.
    #[error("{0}")]
    BadPatch(String),
    /// The patched file would not be valid.
    #[error("{0}")]
    Invalid(ConfigError),
    /// Reading or writing the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The reason.
        source: std::io::Error,
    },
}

/// The live config.
pub struct LiveConfig {
    current: Arc<ArcSwap<Config>>,
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises read-modify-write of the file by admin updates.
    write_lock: Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for LiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConfig")
            .field("path", &self.path)
            .finish()
    }
}

fn sha(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl LiveConfig {
    /// Load `path`; an error here stops start-up.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let config = Config::parse(&text, &path.display().to_string())?;
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(config)),
            path: path.to_path_buf(),
            state: Mutex::new(State {
                loaded_at: Utc::now(),
                sha256: sha(text.as_bytes()),
                last_error: None,
            }),
            write_lock: Mutex::new(()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            changed: watch::channel(0).0,
        })
    }

    /// The swappable snapshot, shared with the proxy.
    pub fn snapshot(&self) -> Arc<ArcSwap<Config>> {
        self.current.clone()
    }

    /// The current config.
    pub fn get(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ticks on every applied change (reload or admin update): queued requests re-check.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `config` live; `count`: the counter this change adds one to (a reload), bumped
    /// under the lock that [`LiveConfig::info`] reads with, together with `last_error`, so
    /// that no reader sees the count without the state it counts.
    fn swap(&self, config: Config, digest: [u8; 32], count: Option<&AtomicU64>) {
        self.current.store(Arc::new(config));
        let mut st = self.lock();
        st.sha256 = digest;
        st.loaded_at = Utc::now();
        st.last_error = None;
        if let Some(c) = count {
            c.fetch_add(1, Ordering::Relaxed);
        }
        drop(st);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Re-read the file. `Ok(true)`: a new config is live; `Ok(false)`: the file is what is
    /// running already (e.g. our own write); `Err`: refused, the last good config stays.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let result = read(&self.path).and_then(|text| {
            let digest = sha(text.as_bytes());
            if digest == self.lock().sha256 {
                return Ok(None);
            }
            Config::parse(&text, &self.path.display().to_string()).map(|c| Some((c, digest)))
        });
        match result {
            Ok(None) => Ok(false),
            Ok(Some((config, digest))) => {
                self.swap(config, digest, Some(&self.reloads_ok));
                tracing::info!(target: "config", path = %self.path.display(), "budgets reloaded");
                Ok(true)
            }
            Err(e) => {
                {
                    // The error and its count together (see `swap`).
                    let mut st = self.lock();
                    st.last_error = Some(LastError {
                        message: e.to_string(),
                        at: rfc3339(Utc::now()),
                    });
                    self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                }
                tracing::error!(target: "config", error = %e, "reload refused; the last good config stays in force");
                Err(e)
            }
        }
    }

    /// Apply a partial update of one agent's budget to the file (creating the agent if it is
    /// not there), validate the whole result with the same code as a hand-written file,
    /// write it atomically (temp file + rename, other entries and key order kept) and make
    /// it live. `null` removes a key (the agent inherits it from `default` again).
    /// Returns whether the agent was created.
    pub fn update_agent(&self, agent: &str, patch: &Value) -> Result<bool, UpdateError> {
        let Some(patch) = patch.as_object() else {
            return Err(UpdateError::BadPatch(
                "the body must be a JSON object of budget fields, e.g. {\"max_tokens\": 4000000}"
                    .into(),
            ));
        };
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path_s = self.path.display().to_string();
        let text = read(&self.path).map_err(UpdateError::Invalid)?;
        let mut doc: Value = serde_json::from_str(&text).map_err(|e| {
            UpdateError::Invalid(ConfigError::Parse {
                path: path_s.clone(),
                message: format!(
                    "the file on disk is not valid JSON ({e}); fix it before updating"
                ),
                line: e.line(),
                column: e.column(),
            })
        })?;
        let root = doc
            .as_object_mut()
            .ok_or_else(|| UpdateError::BadPatch(format!("{path_s} is not a JSON object")))?;
        let agents = root
            .entry("agents")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or_else(|| {
                UpdateError::BadPatch(format!("{path_s}: \"agents\" is not an object"))
            })?;
        let created = !agents.contains_key(agent);
        let entry = agents
            .entry(agent.to_string())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or_else(|| {
                UpdateError::BadPatch(format!("{path_s}: agents.{agent} is not an object"))
            })?;
        for (k, v) in patch {
            if v.is_null() {
                entry.remove(k);
            } else {
                entry.insert(k.clone(), v.clone());
            }
        }
        let mut new_text = serde_json::to_string_pretty(&doc)
            .map_err(|e| UpdateError::BadPatch(format!("cannot serialise the file: {e}")))?;
        new_text.push('\n');
        let config = Config::parse(&new_text, &path_s).map_err(UpdateError::Invalid)?;
        write_atomically(&self.path, new_text.as_bytes()).map_err(|source| UpdateError::Io {
            path: path_s.clone(),
            source,
        })?;
        self.swap(config, sha(new_text.as_bytes()), None);
        tracing::info!(target: "config", agent, created, "budget updated through the admin API");
        Ok(created)
    }

    /// What `/api/budget/config` shows.
    pub fn info(&self) -> ConfigInfo {
        let st = self.lock();
        ConfigInfo {
            path: self.path.display().to_string(),
            loaded_at: rfc3339(st.loaded_at),
            sha256: hex::encode(st.sha256),
            last_error: st.last_error.clone(),
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
        }
    }

    /// Applied and refused reloads so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }
}

/// Write via a temp file in the same directory and rename over the target, so a reader
/// (or a crash) never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Watch the file (its directory, so delete-and-recreate by editors is seen) and reload on
/// change, debounced: the first event starts a quiet period of `debounce`, after which the
/// file is read once. Only writes, creations, removals and renames count: the reload's own
/// read of the file must not trigger another. Returns the watcher, which must be kept alive.
pub fn watch(
    live: Arc<LiveConfig>,
    debounce: std::time::Duration,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = live.path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) && event
            .paths
            .iter()
            .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name);
        if relevant {
            let _ = tx.send(());
        }
    })?;
    let dir = live
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Quiet period: editors write in several steps.
            tokio::time::sleep(debounce).await;
            while rx.try_recv().is_ok() {}
            let l = live.clone();
            let _ = tokio::task::spawn_blocking(move || l.reload()).await;
        }
    });
    Ok(watcher)
}

/// Reload on each SIGHUP that `hup` receives (the binary takes the signal over, see
/// `app::run`: a signal handler is process-wide).
#[cfg(unix)]
pub fn reload_on_sighup(live: Arc<LiveConfig>, mut hup: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(target: "config", "SIGHUP: reloading budgets");
            let l = live.clone();
            let _ = tokio::task::spawn_blocking(move || l.reload()).await;
        }
    });
}
