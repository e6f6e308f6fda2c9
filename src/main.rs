//! The command line: `serve` (default), `check-config`, `status`, `gen-cert`. Nothing else
//! lives here.

use budget_proxy::app::{self, Options};
use budget_proxy::config::Config;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc: see Cargo.toml for why (RSS of idle and parked connections, allocation cost).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A Gemini API gateway that meters every response and enforces per-agent token budgets.
#[derive(Parser, Debug)]
#[command(name = "budget-proxy", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

// Parsed once at start-up: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Validate a budgets.json and print the resolved per-agent table.
    CheckConfig {
        /// The file (default: config/budgets.json).
        path: Option<PathBuf>,
    },
    /// Write a self-signed development certificate and key (cert.pem, key.pem) for TLS.
    GenCert {
        /// Host name or IP address the certificate is for (repeat for several).
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
        hosts: Vec<String>,
        /// Directory to write cert.pem and key.pem into.
        #[arg(long, default_value = "certs")]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print every agent's usage from a running proxy's admin API.
    Status {
        /// Admin API base URL.
        #[arg(
            long,
            env = "BUDGET_PROXY_ADMIN_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        admin_url: String,
    },
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// budgets.json to load.
    #[arg(
        long,
        env = "BUDGET_PROXY_CONFIG",
        default_value = "config/budgets.json"
    )]
    config: PathBuf,
    /// Address of the proxy port.
    #[arg(long, env = "BUDGET_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin port (API, metrics, dashboard).
    #[arg(
        long,
        env = "BUDGET_PROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    admin_listen: SocketAddr,
    /// Base URL of the Gemini API.
    #[arg(
        long,
        env = "BUDGET_PROXY_UPSTREAM",
        default_value = "https://generativelanguage.googleapis.com"
    )]
    upstream: String,
    /// Directory of the embedded store.
    #[arg(long, env = "BUDGET_PROXY_STATE_DIR", default_value = "./data")]
    state_dir: PathBuf,
    /// Redis URL (redis://host:port[/db]) for counters shared by several replicas; unset:
    /// the embedded store.
    #[arg(long, env = "BUDGET_PROXY_REDIS_URL")]
    redis_url: Option<String>,
    /// PEM certificate chain for TLS on the proxy port (with --tls-key; reloaded on change).
    #[arg(long, env = "BUDGET_PROXY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the proxy port (with --tls-cert).
    #[arg(long, env = "BUDGET_PROXY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM certificate chain for TLS on the admin port (with --admin-tls-key).
    #[arg(long, env = "BUDGET_PROXY_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the admin port (with --admin-tls-cert).
    #[arg(long, env = "BUDGET_PROXY_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for the upstream.
    #[arg(long, env = "BUDGET_PROXY_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Seconds to wait for the upstream's response headers (then 504).
    #[arg(long, env = "BUDGET_PROXY_UPSTREAM_TIMEOUT", default_value_t = 600)]
    upstream_timeout: u64,
    /// Seconds to wait for a TCP/TLS connection to the upstream (then 502).
    #[arg(long, env = "BUDGET_PROXY_CONNECT_TIMEOUT", default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds an unused pooled upstream connection is kept open.
    #[arg(long, env = "BUDGET_PROXY_UPSTREAM_IDLE_TIMEOUT", default_value_t = 90)]
    upstream_idle_timeout: u64,
    /// Seconds to keep reading an upstream body after its client left, to record usage.
    #[arg(long, env = "BUDGET_PROXY_DRAIN_TIMEOUT", default_value_t = 60)]
    drain_timeout: u64,
    /// Seconds to wait for in-flight requests at shutdown.
    #[arg(long, env = "BUDGET_PROXY_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Milliseconds between writes of the counters to the store (what `kill -9` may lose).
    #[arg(long, env = "BUDGET_PROXY_FLUSH_INTERVAL_MS", default_value_t = 1000)]
    flush_interval_ms: u64,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "BUDGET_PROXY_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest body of a deferred request (`Prefer: respond-async`), in bytes (413 beyond).
    #[arg(long, env = "BUDGET_PROXY_MAX_DEFERRED_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_deferred_body_bytes: usize,
    /// Hours a finished deferred job's response is kept for retrieval.
    #[arg(long, env = "BUDGET_PROXY_JOB_TTL_HOURS", default_value_t = 24)]
    job_ttl_hours: u64,
    /// Output tokens reserved for a request that sets no maxOutputTokens.
    #[arg(
        long,
        env = "BUDGET_PROXY_DEFAULT_OUTPUT_TOKENS",
        default_value_t = 1024
    )]
    default_output_tokens: u64,
    /// Reload budgets.json when the file changes (SIGHUP always reloads).
    #[arg(long, env = "BUDGET_PROXY_WATCH_CONFIG", default_value_t = true, action = clap::ArgAction::Set)]
    watch_config: bool,
    /// Threads that run the proxy port's connections, each with its own single-threaded
    /// runtime and upstream pool, nginx-style; default: one per CPU. 0 runs them on the
    /// main runtime instead (25-35 % fewer requests per second at 1 and 256 connections
    /// here, see benches/README.md).
    #[arg(long, env = "BUDGET_PROXY_IO_THREADS")]
    io_threads: Option<usize>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "BUDGET_PROXY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BUDGET_PROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn env_secret(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn serve(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format == "json");
    let opts = Options {
        config_path: args.config,
        listen: args.listen,
        admin_listen: args.admin_listen,
        upstream: args.upstream,
        upstream_ca: args.upstream_ca,
        state_dir: args.state_dir,
        upstream_timeout: Duration::from_secs(args.upstream_timeout),
        connect_timeout: Duration::from_secs(args.connect_timeout),
        upstream_idle_timeout: Duration::from_secs(args.upstream_idle_timeout),
        tls: budget_proxy::tls::TlsOptions {
            listener: cert_files(args.tls_cert, args.tls_key),
            admin: cert_files(args.admin_tls_cert, args.admin_tls_key),
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(args.drain_timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        flush_interval: Duration::from_millis(args.flush_interval_ms.max(1)),
        max_body_bytes: args.max_body_bytes,
        max_deferred_body_bytes: args.max_deferred_body_bytes,
        job_ttl: Duration::from_secs(args.job_ttl_hours.saturating_mul(3600)),
        default_output_tokens: args.default_output_tokens,
        watch_config: args.watch_config.then(|| Duration::from_millis(200)),
        admin_token: env_secret("BUDGET_PROXY_ADMIN_TOKEN"),
        gemini_api_key: env_secret("GEMINI_API_KEY"),
        redis_url: args.redis_url.filter(|u| !u.is_empty()),
    };
    budget_proxy::server::set_io_threads(args.io_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(app::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Both files, or none (clap makes each flag require the other).
fn cert_files(cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<budget_proxy::tls::CertFiles> {
    Some(budget_proxy::tls::CertFiles {
        cert: cert?,
        key: key?,
    })
}

fn gen_cert(hosts: &[String], out_dir: &std::path::Path, days: u32, force: bool) -> ExitCode {
    match budget_proxy::tls::write_dev_cert(out_dir, hosts, days, force) {
        Ok((cert, key)) => {
            println!(
                "wrote {} and {} (self-signed, for {}; valid {days} days)",
                cert.display(),
                key.display(),
                hosts.join(", ")
            );
            println!(
                "serve with:  budget-proxy serve --tls-cert {} --tls-key {}",
                cert.display(),
                key.display()
            );
            println!(
                "trust it with e.g.:  curl --cacert {} https://localhost:8080/...",
                cert.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let path = path.unwrap_or_else(|| PathBuf::from("config/budgets.json"));
    match Config::load(&path) {
        Ok(c) => {
            println!("{}: OK\n", path.display());
            print!("{}", c.to_table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(admin_url: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(budget_proxy::admin::client::status_table(
        admin_url,
        env_secret("BUDGET_PROXY_ADMIN_TOKEN").as_deref(),
    )) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::CheckConfig { path }) => check_config(path),
        Some(Command::Status { admin_url }) => status(&admin_url),
        Some(Command::GenCert {
            hosts,
            out_dir,
            days,
            force,
        }) => gen_cert(&hosts, &out_dir, days, force),
    }
}
