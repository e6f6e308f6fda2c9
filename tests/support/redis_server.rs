//! A real `redis-server` for tests: loopback, an ephemeral port, its own temp dir, AOF with
//! `appendfsync always` (so a `kill -9` and restart keep every acknowledged write), killed
//! on drop.
//!
//! `redis-server` missing: [`RedisServer::start`] prints `SKIP: redis-server not installed`
//! and returns `None` — unless `BUDGET_PROXY_REQUIRE_REDIS=1`, then it panics (CI).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether a `PING` on `port` answers `+PONG`.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// Start one, or `None` (after a visible SKIP line) when `redis-server` is missing.
    pub fn start(test: &str) -> Option<RedisServer> {
        if !installed() {
            if std::env::var("BUDGET_PROXY_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("{test}: redis-server is not installed and BUDGET_PROXY_REQUIRE_REDIS=1 (apt-get install redis-server)");
            }
            // Straight to the file descriptor: the test harness captures println!/eprintln!.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: redis-server not installed ({test})"
            );
            return None;
        }
        let mut s = RedisServer {
            port: 0,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        // A port freed by the probe may be taken meanwhile: try a few.
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn() {
                return Some(s);
            }
        }
        panic!("{test}: redis-server did not start");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(["--protected-mode", "yes"])
            .args(["--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if ping(self.port) {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `kill -9`: no shutdown, no save (the AOF has every acknowledged write).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
