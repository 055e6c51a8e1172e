//! Product code must not read nondeterminism directly: the OS clock, OS randomness, timers outside the env
//! clock, `HashMap` iteration, tokio's unseeded `select!` choice, threads or tasks spawned around the env, or
//! sockets around the env's network. Only the env seam's production implementations may, and the few
//! documented exceptions below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::{Path, PathBuf};

/// Patterns that bypass the env seam.
const FORBIDDEN: [&str; 15] = [
    "SystemTime::now",
    "Instant::now",
    "thread_rng",
    "OsRng",
    "getrandom",
    "rand::",
    "HashMap",
    "HashSet",
    // Timers and sleeps on tokio's clock or the OS's: the env clock is the only one simulated time drives.
    "tokio::time",
    "std::thread::sleep",
    // Threads and the blocking pool run outside the simulated host and its schedule.
    "thread::spawn",
    "spawn_blocking",
    // Sockets that are not the env's network: the simulator never sees them, so no partition or loss applies.
    "std::net",
    // A bare tokio task is dropped, on a host crash, in an order set by process-global task ids; tarpc's
    // `NewClient::spawn` is one. Spawn through the env (`rpc::start_client` for tarpc clients).
    "tokio::spawn",
    ").spawn()",
];

/// Files allowed to use them, and why.
const ALLOWED: [(&str, &str); 8] = [
    ("runtime-adapters/env/src/lib.rs", "the production (tokio) implementation of the seam itself"),
    (
        "runtime-adapters/env/src/sim.rs",
        "the simulation implementation of the seam: tokio time inside a turmoil host is the simulated clock",
    ),
    (
        "runtime-adapters/env/src/madsim_env.rs",
        "the madsim implementation of the seam: inside a madsim node, `Instant` is the simulated clock",
    ),
    (
        "runtime-adapters/env/src/rpc.rs",
        "pushes tarpc's std-Instant deadline out of the way; never fires in simulation",
    ),
    (
        "service/cli/src/certs.rs",
        "`factum certs` makes secret keys, which must be unpredictable; run outside any cluster",
    ),
    (
        "service/cli/src/supervisor.rs",
        "runs provider hosts as OS child processes of a real agent; the simulator runs them as hosts of its own",
    ),
    ("sim/src/main.rs", "the sweep driver measures seeds per wall-clock second; not simulated code"),
    (
        "service/providers/src/http/reqwest_transport.rs",
        "the production HTTP transport on the real network (name lookup under a deadline); the simulator \
         sends through its own transport",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "tests" || n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn product_code_goes_through_the_env_seam() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["service", "runtime-adapters", "sim/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} files", files.len());
    let mut violations = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        if ALLOWED.iter().any(|(allowed, _)| rel == *allowed) {
            continue;
        }
        violations.extend(violations_in(&rel, &std::fs::read_to_string(&file).unwrap()));
    }
    assert!(violations.is_empty(), "nondeterminism outside the env seam:\n{}", violations.join("\n"));
}

/// Every forbidden use in the product part of one file's text.
fn violations_in(rel: &str, text: &str) -> Vec<String> {
    let mut violations = Vec::new();
    // Unit tests inside a file may use real time; they follow `#[cfg(test)]`.
    let product = text.split("#[cfg(test)]").next().unwrap_or("");
    let lines: Vec<&str> = product.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for pattern in FORBIDDEN {
            if code.contains(pattern) {
                violations.push(format!("{rel}:{}: {pattern}", n + 1));
            }
        }
        if code.contains("select!") && !lines.get(n + 1).is_some_and(|next| next.contains("biased;")) {
            violations.push(format!("{rel}:{}: select! without `biased;` draws from an unseeded RNG", n + 1));
        }
    }
    violations
}

#[test]
fn the_lint_fires_on_each_escape() {
    for escape in [
        "let t = std::time::SystemTime::now();",
        "std::thread::spawn(|| ());",
        "tokio::task::spawn_blocking(f);",
        "let s = std::net::TcpStream::connect(a);",
        "getrandom::fill(&mut buf);",
        "tokio::time::timeout(d, f).await;",
        "let m: HashMap<u8, u8> = HashMap::new();",
    ] {
        assert!(!violations_in("x.rs", escape).is_empty(), "{escape} not caught");
    }
    assert!(violations_in("x.rs", "// tokio::time::sleep in a comment").is_empty());
    assert!(violations_in("x.rs", "fn f() {}\n#[cfg(test)]\nfn g() { std::thread::spawn(|| ()); }").is_empty());
}
