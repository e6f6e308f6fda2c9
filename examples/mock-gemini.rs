//! A mock Gemini upstream for local runs of the proxy.
//!
//! `cargo run --example mock-gemini -- [--port 9090]` serves on 127.0.0.1 with the
//! default behaviour (see `tests/support/mock_gemini.rs`) until Ctrl-C.

#[path = "../tests/support/mock_gemini.rs"]
mod mock_gemini;

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port: u16 = 9090;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let value = args.next().ok_or("--port needs a value")?;
                port = value.parse().map_err(|_| format!("bad port: {value}"))?;
            }
            other => {
                return Err(
                    format!("unknown argument: {other} (usage: mock-gemini [--port N])").into(),
                )
            }
        }
    }
    let mock = mock_gemini::MockGemini::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("mock Gemini listening on {}", mock.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
