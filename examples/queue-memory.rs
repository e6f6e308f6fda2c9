//! Benchmark (not a test): the memory cost of parked requests. Starts the mock upstream
//! in-process and the release binary as a child, exhausts a queue agent, parks N requests
//! on N connections, and prints the child's RSS before and after.
//!
//! Run with `benches/queue_memory.sh` (raises the open-file limit, builds release).

#[path = "../tests/support/mock_gemini.rs"]
mod mock_gemini;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mock = mock_gemini::MockGemini::start().await;
    let dir = tempfile_dir()?;
    let config = format!(
        r#"{{"default": {{"max_tokens": 1000000, "period": "monthly", "action_on_limit": "warn"}},
            "agents": {{"spark": {{"max_tokens": 10, "period": "monthly", "action_on_limit": "queue",
                                  "queue": {{"max_wait_seconds": 600, "max_depth": {}}}}}}}}}"#,
        n + 10
    );
    std::fs::write(dir.join("budgets.json"), config)?;
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/budget-proxy");
    // `QUEUE_MEMORY_WRAP="heaptrack -o /tmp/parked"` runs the proxy under a profiler (the
    // RSS figures are then the wrapper's, not the proxy's; read the profile instead).
    let wrap: Vec<String> = std::env::var("QUEUE_MEMORY_WRAP")
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut cmd = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(dir.join("budgets.json"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(["--upstream", &mock.url, "--shutdown-timeout", "1"])
        .env_remove("BUDGET_PROXY_ADMIN_TOKEN")
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (run benches/queue_memory.sh, which builds it)",
                bin.display()
            )
        })?;
    let pid = child.id();
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let (proxy, admin) = loop {
        let line = lines.next().ok_or("proxy exited")??;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let (Some(p), Some(a)) = (v["fields"]["proxy"].as_str(), v["fields"]["admin"].as_str()) {
            break (p.to_string(), a.to_string());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let http = reqwest::Client::new();
    let url = format!("http://{proxy}/agents/spark/v1beta/models/gemini-2.5-flash:generateContent");
    let body = r#"{"contents":[{"parts":[{"text":"park me"}]}]}"#;
    http.post(&url).body(body).send().await?.bytes().await?; // 30 tokens > 10: exhausted
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let request = format!(
        "POST /agents/spark/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nhost: {proxy}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Phase 1: N open connections that have sent nothing yet (the cost of a connection).
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = tokio::net::TcpStream::connect(&proxy).await.map_err(|e| {
            format!("connection {i}: {e} (raise the open-file limit: ulimit -n 65536)")
        })?;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = rss_kib(pid);
    // Phase 2: each connection sends a request, which parks.
    for s in conns.iter_mut() {
        s.write_all(request.as_bytes()).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let v: serde_json::Value = http
            .get(format!("http://{admin}/api/budget/status/spark"))
            .send()
            .await?
            .json()
            .await?;
        if v["queued"].as_u64() == Some(n as u64) {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("only {} of {n} parked", v["queued"]).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = rss_kib(pid);
    let kib_each = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
    let mib = |k: u64| k as f64 / 1024.0;
    println!("parked requests:             {n}");
    println!("proxy RSS idle:              {:.1} MiB", mib(before));
    println!(
        "  + {n} open connections:    {:.1} MiB ({:.2} KiB each)",
        mib(connected),
        kib_each(connected, before)
    );
    println!(
        "  + a parked request on each: {:.1} MiB ({:.2} KiB each on top of its connection)",
        mib(after),
        kib_each(after, connected)
    );
    let total = mib(after.saturating_sub(before));
    let parked_only = mib(after.saturating_sub(connected));
    let target = 64.0 * n as f64 / 10_000.0;
    // The target is the cost of the requests: their connections cost the same idle.
    println!("{}: parked requests cost {parked_only:.1} MiB beyond their connections (target <= {target:.0} MiB)", if parked_only <= target { "PASS" } else { "FAIL" });
    println!(
        "info: with their connections' own RSS: {total:.1} MiB ({})",
        if total <= target {
            "also within the target"
        } else {
            "over the target's figure: the connections cost that much idle"
        }
    );
    // `QUEUE_MEMORY_HOLD=SECS` keeps everything parked a while, to look at the proxy
    // (e.g. `/proc/PID/smaps`) before it is stopped.
    if let Some(secs) = std::env::var("QUEUE_MEMORY_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        println!("holding for {secs} s: proxy pid {pid}");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("queue-memory-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
