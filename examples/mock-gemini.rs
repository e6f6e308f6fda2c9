//! A mock Gemini upstream for local runs of the proxy.
//!
//! `cargo run --example mock-gemini -- [--port 9090] [--chunks N] [--chunk-delay-ms MS]`
//! serves on 127.0.0.1 with the default behaviour (see `tests/support/mock_gemini.rs`)
//! until Ctrl-C. `--chunks` sets the number of stream chunks (default 3) and
//! `--chunk-delay-ms` the pause between them (default 0); `benches/proxy_bench.sh` uses
//! them for its streaming run (20 chunks, 5 ms apart).

#[path = "../tests/support/mock_gemini.rs"]
mod mock_gemini;

use std::net::SocketAddr;
use std::time::Duration;

const USAGE: &str = "usage: mock-gemini [--port N] [--chunks N] [--chunk-delay-ms MS]";

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
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = value(&mut args, "--port")?,
            "--chunks" => behavior.chunks = value(&mut args, "--chunks")?,
            "--chunk-delay-ms" => {
                behavior.chunk_delay = Duration::from_millis(value(&mut args, "--chunk-delay-ms")?)
            }
            other => return Err(format!("unknown argument: {other} ({USAGE})").into()),
        }
    }
    let mock = mock_gemini::MockGemini::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    mock.set_behavior(behavior);
    mock.forget_requests();
    println!("mock Gemini listening on {}", mock.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
