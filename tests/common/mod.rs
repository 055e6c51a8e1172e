//! Helpers shared by the end-to-end tests: a `factum up` process on free ports and the `factum` client.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FACTUM: &str = env!("CARGO_BIN_EXE_factum");

/// A `factum up` process, killed on drop.
pub struct Up {
    pub child: Child,
    pub control_plane: String,
    /// Where it serves `/metrics`, if asked to (`--metrics-listen`).
    pub metrics: Option<String>,
    /// Kept open: if it were dropped, `factum up`'s next print would hit a closed pipe.
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whatever answers client commands: a `factum up`, or a control plane of a cluster of processes.
pub trait ControlPlane {
    /// Its address.
    fn addr(&self) -> &str;
}

impl ControlPlane for Up {
    fn addr(&self) -> &str {
        &self.control_plane
    }
}

impl ControlPlane for String {
    fn addr(&self) -> &str {
        self
    }
}

pub fn up() -> Up {
    up_with(&[])
}

pub fn up_with(extra: &[&str]) -> Up {
    up_logging(extra, Stdio::null())
}

/// `factum up` with its log (stderr) going to `log`.
pub fn up_logging(extra: &[&str], log: impl Into<Stdio>) -> Up {
    let mut child = Command::new(FACTUM)
        .args(["up", "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("factum up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut metrics = None;
    let first = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(url) = line.strip_prefix("metrics: http://") {
            metrics = url.strip_suffix("/metrics").map(str::to_string);
        }
        if line.starts_with("factum is up") {
            break line;
        }
    };
    let control_plane = first.rsplit(' ').next().unwrap().to_string();
    assert!(first.starts_with("factum is up"), "{first}");
    Up { child, control_plane, metrics, _stdout: lines }
}

pub fn factum(up: &impl ControlPlane, args: &[&str]) -> Output {
    Command::new(FACTUM).args(args).args(["--control-plane", up.addr()]).output().unwrap()
}

pub fn ok(up: &impl ControlPlane, args: &[&str]) -> String {
    let out = factum(up, args);
    assert!(out.status.success(), "factum {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn fails_with(up: &impl ControlPlane, args: &[&str], code: &str) {
    let out = factum(up, args);
    assert_eq!(out.status.code(), Some(1), "factum {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(code), "factum {args:?}: expected {code}, got {stderr}");
}

/// The instance's status; one that waits out a restart backoff is not yet `crashed` or `stopped` for good.
pub fn status_of(up: &impl ControlPlane, id: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(&ok(up, &["inspect", id, "-o", "json"])).unwrap();
    let status = json["metadata"]["status"].as_str().unwrap().to_string();
    if json["metadata"]["backoff_ms"].is_null() {
        status
    } else {
        format!("{status}, restart pending")
    }
}

pub fn wait_for_status(up: &impl ControlPlane, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_of(up, id);
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "{id} stayed {status}, wanted {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn fixture(name: &str) -> String {
    format!("{}/guests/fixtures/{name}.wat", env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    _stdout: Option<std::io::Lines<BufReader<std::process::ChildStdout>>>,
}

impl Proc {
    /// Owns `child`.
    pub fn new(child: Child) -> Self {
        Proc { child, _stdout: None }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` on `addr` over plain HTTP/1.1: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample of `family` whose labels include every one of `labels`.
pub fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        let (metric, set) = name.split_once('{').unwrap_or((name, ""));
        (metric == family && labels.iter().all(|l| set.contains(l))).then(|| value.parse().ok()).flatten()
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `factum control-plane` on a free port, and its address.
pub fn control_plane() -> (Proc, String) {
    let cp = format!("127.0.0.1:{}", free_port());
    (factum_daemon(&["control-plane", "--listen", &cp], "control plane listening"), cp)
}

/// A `factum agent` for node `node` reporting to `cp`, with `extra` flags.
pub fn agent(node: &str, cp: &str, extra: &[&str]) -> Proc {
    let args = ["agent", "--node-id", node, "--control-plane", cp, "--agent-listen", "127.0.0.1:0"];
    factum_daemon(&[&args[..], extra].concat(), "listening")
}

/// Waits until `cp` lists `n` available nodes.
pub fn wait_for_nodes(cp: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes: serde_json::Value = serde_json::from_str(&ok(&cp.to_string(), &["nodes", "-o", "json"])).unwrap();
        if nodes.as_array().unwrap().iter().filter(|n| n["available"] == true).count() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} nodes never became available: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `factum <args>` and waits for a stdout line containing `ready`.
pub fn factum_daemon(args: &[&str], ready: &str) -> Proc {
    let mut child = Command::new(FACTUM)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn factum");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("daemon exited").unwrap();
        if line.contains(ready) {
            break;
        }
    }
    Proc { child, _stdout: Some(lines) }
}

/// Whether the `etcd` binary is on PATH (apt `etcd-server`; `.ci/run` installs it). Without it a test says
/// so and passes, except under `CI=true`, where a missing etcd is a failure.
pub fn etcd_available() -> bool {
    let found = Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "etcd is not installed, but CI must run the etcd tests");
        eprintln!("skipping: no `etcd` binary on PATH (apt install etcd-server)");
    }
    found
}

/// A single-member etcd on free ports, with its data in a fresh temporary directory.
pub fn start_etcd() -> (Proc, String, tempdir::Dir) {
    let dir = tempdir::Dir::new("factum-etcd");
    let (client, peer) = (free_port(), free_port());
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path())
        .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-cluster=t=http://127.0.0.1:{peer}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    let endpoint = format!("127.0.0.1:{client}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&endpoint).is_err() {
        assert!(Instant::now() < deadline, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc::new(child), endpoint, dir)
}

/// Minimal temporary directory (removed on drop), to avoid a dependency for one use.
pub mod tempdir {
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Self {
            let unique = format!("{prefix}-{}-{}", std::process::id(), super::free_port());
            let path = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
