//! A mock Gemini upstream for local runs of the proxy.
//!
//! `cargo run --example mock-gemini -- [--port 9090] [--chunks N] [--chunk-delay-ms MS]
//! [--tls-cert PEM --tls-key PEM]` serves on 127.0.0.1 with the default behaviour (see
//! `tests/support/mock_gemini.rs`) until Ctrl-C. `--chunks` sets the number of stream
//! chunks (default 3) and `--chunk-delay-ms` the pause between them (default 0);
//! `benches/proxy_bench.sh` uses them for its streaming run (20 chunks, 5 ms apart). With
//! `--tls-cert` and `--tls-key` it serves HTTPS (ALPN `h2`, then `http/1.1`), as Google
//! does: `scripts/build-pgo.sh` trains the proxy's HTTPS upstream path against it.

#[path = "../tests/support/mock_gemini.rs"]
mod mock_gemini;

use std::net::SocketAddr;
use std::time::Duration;

const USAGE: &str =
    "usage: mock-gemini [--port N] [--chunks N] [--chunk-delay-ms MS] [--tls-cert PEM --tls-key PEM]";

fn value<T: std::str::FromStr>(
    args: &mut impl Iterator<Item = String>,
    flag: &str,
) -> Result<T, String> {
    let v = args
        .next()
        .ok_or(format!("{flag} needs a value ({USAGE})"))?;
    v.parse().map_err(|_| format!("{flag}: bad value {v:?}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port: u16 = 9090;
    let mut behavior = mock_gemini::Behavior::default();
    let (mut cert, mut key) = (None::<String>, None::<String>);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = value(&mut args, "--port")?,
            "--chunks" => behavior.chunks = value(&mut args, "--chunks")?,
            "--chunk-delay-ms" => {
                behavior.chunk_delay = Duration::from_millis(value(&mut args, "--chunk-delay-ms")?)
            }
            "--tls-cert" => cert = Some(value(&mut args, "--tls-cert")?),
            "--tls-key" => key = Some(value(&mut args, "--tls-key")?),
            other => return Err(format!("unknown argument: {other} ({USAGE})").into()),
        }
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mock = match (cert, key) {
        (None, None) => mock_gemini::MockGemini::bind(addr).await?,
        (Some(cert), Some(key)) => {
            let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
            mock_gemini::MockGemini::bind_tls(addr, &read(&cert)?, &read(&key)?)
                .await
                .map_err(|e| e.to_string())?
        }
        _ => return Err(format!("--tls-cert and --tls-key go together ({USAGE})").into()),
    };
    mock.set_behavior(behavior);
    mock.forget_requests();
    println!("mock Gemini listening on {}", mock.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
