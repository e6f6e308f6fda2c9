//! Wiring: load the config, open the store, seed the ledger, start the writer, bind both
//! listeners, and shut down in order (stop accepting → drain → flush the store).

use crate::admin::{self, AdminDeps, AdminState};
use crate::budget::alerts::AlertCenter;
use crate::budget::ledger::Ledger;
use crate::budget::queue::Queues;
use crate::clock::{Clock, SystemClock};
use crate::config::live::LiveConfig;
use crate::metrics::Metrics;
use crate::proxy::{self, upstream, ProxySettings, Shared};
use crate::server;
use crate::store::redis_sync::{Gate, RedisSettings, RedisSync};
use crate::store::ALERTS_KEPT;
use crate::store::{LocalStore, Store, Writer};
use crate::webhook::{WebhookSettings, Webhooks};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Everything `serve` needs, from flags and the environment.
#[derive(Debug, Clone)]
pub struct Options {
    /// budgets.json.
    pub config_path: PathBuf,
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Upstream base URL.
    pub upstream: String,
    /// Extra CA for the upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Embedded store directory.
    pub state_dir: PathBuf,
    /// Longest wait for upstream response headers.
    pub upstream_timeout: Duration,
    /// Upstream connect timeout (TCP and TLS).
    pub connect_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub upstream_idle_timeout: Duration,
    /// TLS on the proxy and admin listeners.
    pub tls: crate::tls::TlsOptions,
    /// Longest drain of an upstream body after the client left.
    pub drain_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_timeout: Duration,
    /// Store write-behind interval.
    pub flush_interval: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest body of a deferred request (`Prefer: respond-async`).
    pub max_deferred_body_bytes: usize,
    /// How long a finished deferred job's response is kept.
    pub job_ttl: Duration,
    /// Output estimate when a request has no maxOutputTokens.
    pub default_output_tokens: u64,
    /// `BUDGET_PROXY_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// Watch budgets.json (and SIGHUP) with this debounce; `None`: no hot reload.
    pub watch_config: Option<Duration>,
    /// `GEMINI_API_KEY`.
    pub gemini_api_key: Option<String>,
    /// Shared counters across replicas (`--redis-url`); `None`: this process alone.
    pub redis_url: Option<String>,
}

/// A running proxy.
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Live counters (for tests and tools in-process).
    pub ledger: Arc<Ledger>,
    /// The live config.
    pub live: Arc<LiveConfig>,
    /// Budget alerts (listing, webhook counters).
    pub alerts: Arc<AlertCenter>,
    queues: Arc<Queues>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stop accepting, drain, flush the store; returns when all is written.
    pub async fn shutdown(self) {
        // Parked requests answer 503 at once instead of holding their connection.
        self.queues.shut_down();
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

/// Start with the system clock.
pub async fn start(opts: Options) -> anyhow::Result<Running> {
    start_with_clock(opts, Arc::new(SystemClock)).await
}

/// Start with an injected clock.
pub async fn start_with_clock(opts: Options, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let live = Arc::new(LiveConfig::load(&opts.config_path).map_err(|e| anyhow::anyhow!("{e}"))?);
    let config = live.get();
    if opts.admin_token.is_none() && !opts.admin_listen.ip().is_loopback() {
        anyhow::bail!(
            "--admin-listen {} is not a loopback address and BUDGET_PROXY_ADMIN_TOKEN is not set: set a token or bind the admin port to 127.0.0.1",
            opts.admin_listen
        );
    }
    if opts.admin_token.is_none() {
        tracing::warn!(target: "admin", "BUDGET_PROXY_ADMIN_TOKEN is not set: the admin API on loopback answers without a token");
    }
    let local_store =
        Arc::new(LocalStore::open(&opts.state_dir).with_context(|| {
            format!("opening the embedded store in {}", opts.state_dir.display())
        })?);
    let store: Arc<dyn Store> = local_store.clone();
    let (writer, writer_task) = Writer::start(store.clone(), opts.flush_interval);
    // With Redis the counters live there (read back by the sync layer below); the embedded
    // store keeps this replica's history and alerts.
    let (remote_tx, remote_rx) = tokio::sync::mpsc::unbounded_channel();
    let ledger = Arc::new(match &opts.redis_url {
        Some(_) => Ledger::with_remote(Some(writer.clone()), remote_tx),
        None => Ledger::new(Some(writer.clone())),
    });
    if opts.redis_url.is_none() {
        let rows = store
            .load_latest()
            .context("reading counters from the embedded store")?;
        ledger.seed(
            rows,
            |a| config.agent(a).unwrap_or(&config.default),
            clock.now(),
        );
    }

    let upstream = upstream::Upstream::parse(&opts.upstream)?;
    let client = upstream::client(
        &upstream,
        opts.upstream_ca.as_deref(),
        upstream::Timeouts {
            connect: opts.connect_timeout,
            idle: opts.upstream_idle_timeout,
            response: opts.upstream_timeout,
        },
    )?;
    let gemini_api_key = match &opts.gemini_api_key {
        Some(k) => Some(
            http::HeaderValue::from_str(k)
                .context("GEMINI_API_KEY has characters that cannot go in a header")?,
        ),
        None => None,
    };
    let alerts = Arc::new(AlertCenter::new(
        Some(writer.clone()),
        store
            .load_alerts(ALERTS_KEPT)
            .context("reading alerts from the embedded store")?,
        Some(Webhooks::start(
            live.snapshot(),
            WebhookSettings::default(),
        )?),
    ));
    let metrics = Arc::new(Metrics::default());
    let queues = Arc::new(Queues::default());
    let redis_sync = match &opts.redis_url {
        Some(url) => Some(
            RedisSync::start(
                RedisSettings::new(url, opts.state_dir.clone()),
                remote_rx,
                ledger.clone(),
                live.clone(),
                queues.clone(),
                &alerts,
                clock.clone(),
                Duration::from_secs(3),
            )
            .await?,
        ),
        None => None,
    };
    let drains = tokio_util::task::TaskTracker::new();
    let shared = Arc::new(Shared {
        config: live.snapshot(),
        metrics: metrics.clone(),
        queues: queues.clone(),
        ledger: ledger.clone(),
        alerts: alerts.clone(),
        clock: clock.clone(),
        upstream,
        client,
        drains: drains.clone(),
        settings: ProxySettings {
            upstream_timeout: opts.upstream_timeout,
            drain_timeout: opts.drain_timeout,
            max_body_bytes: opts.max_body_bytes,
            peek_bytes: 64 * 1024,
            default_output_tokens: opts.default_output_tokens,
            gemini_api_key,
            max_deferred_body_bytes: opts.max_deferred_body_bytes,
            job_ttl: opts.job_ttl,
        },
        jobs: local_store.clone(),
    });
    let admin_state = AdminState::new(AdminDeps {
        live: live.clone(),
        ledger: ledger.clone(),
        store: store.clone(),
        clock: clock.clone(),
        token: opts.admin_token.clone(),
        metrics,
        queues: queues.clone(),
        alerts: Some(alerts.clone() as Arc<dyn admin::AlertSource>),
        jobs: Some(local_store.clone()),
        redis: redis_sync.clone(),
    });
    // A config change (reload or admin update) may raise a limit: release parked requests.
    // It may also put an agent past a threshold without a request: alert it now.
    {
        let (live, ledger, queues, clock, alerts) = (
            live.clone(),
            ledger.clone(),
            queues.clone(),
            clock.clone(),
            alerts.clone(),
        );
        let mut changed = live.subscribe();
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                let (config, now) = (live.get(), clock.now());
                queues.release_all(&ledger, &config, now);
                alerts.check_standing(&ledger, &config, now);
            }
        });
    }
    let watcher = match opts.watch_config {
        Some(debounce) => Some(crate::config::live::watch(live.clone(), debounce)?),
        None => None,
    };

    let reload = opts.tls.reload_interval;
    let proxy_tls = match &opts.tls.listener {
        Some(files) => Some(crate::tls::acceptor(files, "tls", reload).await?),
        None => None,
    };
    let admin_tls = match &opts.tls.admin {
        Some(files) => Some(crate::tls::acceptor(files, "admin-tls", reload).await?),
        None => None,
    };
    let proxy_listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", opts.listen))?;
    let admin_listener = TcpListener::bind(opts.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", opts.admin_listen))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    tracing::info!(target: "server", proxy = %proxy_addr, admin = %admin_addr, upstream = %opts.upstream,
        proxy_tls = proxy_tls.is_some(), admin_tls = admin_tls.is_some(), "budget-proxy listening");

    let (stop, stop_rx) = watch::channel(false);
    let drain = opts.shutdown_timeout;
    proxy::jobs::recover(&shared).context("reading deferred jobs from the embedded store")?;
    let jobs_task = tokio::spawn(proxy::jobs::run(shared.clone(), stop_rx.clone()));
    let redis_sync_gate = redis_sync.clone();
    let proxy_task = tokio::spawn(server::serve(
        proxy_listener,
        proxy_tls,
        move |req| gated(redis_sync_gate.clone(), shared.clone(), req),
        stop_rx.clone(),
        drain,
        "proxy",
    ));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        admin_tls,
        move |req: server::ClientRequest| {
            Box::pin(admin::handle(admin_state.clone(), req.into_http()))
        },
        stop_rx,
        drain,
        "admin",
    ));
    let alerts_stop = alerts.clone();
    let done = tokio::spawn(async move {
        let _watcher = watcher;
        let _ = proxy_task.await;
        let _ = jobs_task.await;
        let _ = admin_task.await;
        // Bodies whose client left are still being drained: wait for them to settle.
        drains.close();
        if tokio::time::timeout(drain, drains.wait()).await.is_err() {
            tracing::warn!(target: "server", "drain deadline reached with upstream bodies still being read");
        }
        // The last settles: to Redis (or its outbox file) first, then the embedded store.
        if let Some(sync) = &redis_sync {
            sync.shutdown(drain).await;
        }
        // The last settles' alerts: to the store, and to the webhooks within the deadline.
        tokio::join!(writer.flush(), alerts_stop.shutdown(drain));
        writer_task.abort();
        tracing::info!(target: "server", "stopped; counters flushed");
    });
    Ok(Running {
        proxy_addr,
        admin_addr,
        ledger,
        live,
        alerts,
        queues,
        stop,
        done,
    })
}

/// The proxy behind the replica gate: with Redis, a budgeted request whose agent has no
/// lease left waits for one sync round first (or gets 503 in `closed` mode while Redis is
/// down); without Redis, straight to the proxy. Not an `async fn`, so that the request is
/// not kept twice while it is handled (see `proxy::handle`).
fn gated(
    sync: Option<RedisSync>,
    shared: Arc<Shared>,
    req: server::ClientRequest,
) -> server::BoxFuture<http::Response<proxy::body::ResponseBody>> {
    let Some(sync) = sync else {
        return proxy::handle(shared, req);
    };
    match sync.gate(&req) {
        Gate::Pass => proxy::handle(shared, req),
        Gate::Reply(resp) => Box::pin(std::future::ready(resp)),
        Gate::Wait(rx, limit) => crate::boxed!(async move {
            match sync.wait(rx, limit).await {
                Some(resp) => resp,
                None => proxy::handle(shared, req).await,
            }
        }),
    }
}

/// Run until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    // The signals are taken over before the listeners open. Once the proxy has said where it
    // listens, a SIGTERM must drain and flush, and a SIGHUP must reload: their default
    // actions end the process (and lose the usage not yet flushed). Taken over after
    // `start`, a SIGTERM sent right after the first answer could still meet the default.
    let signals = Signals::take_over()?;
    let running = start(opts).await?;
    signals.wait(running.live.clone()).await;
    tracing::info!(target: "server", "shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP, handled by the binary (a signal handler is process-wide).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn take_over() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let handle = |kind: SignalKind, name: &str| {
                signal(kind).with_context(|| format!("cannot handle {name}"))
            };
            Ok(Self {
                term: handle(SignalKind::terminate(), "SIGTERM")?,
                int: handle(SignalKind::interrupt(), "SIGINT")?,
                hup: handle(SignalKind::hangup(), "SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Reload `live` on each SIGHUP until SIGTERM or SIGINT arrives.
    async fn wait(self, live: Arc<LiveConfig>) {
        #[cfg(unix)]
        {
            let Self {
                mut term,
                mut int,
                hup,
            } = self;
            crate::config::live::reload_on_sighup(live, hup);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = live;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
