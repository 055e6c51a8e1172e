//! End to end: the real `factum` binary. `factum up` on free ports, the example guest started with a KV
//! capability, its write visible, then stopped; bad input gets the design's error codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn up_start_kv_stop() {
    let up = up();
    let started: serde_json::Value =
        serde_json::from_str(&ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write", "-o", "json"]))
            .unwrap();
    let id = started["instance_id"].as_str().unwrap().to_string();
    wait_for_status(&up, &id, "running");

    let ps: serde_json::Value = serde_json::from_str(&ok(&up, &["ps", "-o", "json"])).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 1);
    assert_eq!(ps[0]["instance_id"], id.as_str());

    let kv: serde_json::Value = serde_json::from_str(&ok(&up, &["kv", "kv", "-o", "json"])).unwrap();
    assert_eq!(kv[0]["key"], "greeting");
    assert_eq!(kv[0]["value"], "hello from factum");

    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &id, "-o", "json"])).unwrap();
    assert_eq!(inspect["capabilities"][0]["permissions"][0], "kv:write");

    ok(&up, &["stop", &id]);
    assert_eq!(status_of(&up, &id), "stopped");
    let nodes: serde_json::Value = serde_json::from_str(&ok(&up, &["nodes", "-o", "json"])).unwrap();
    assert_eq!(nodes[0]["available"], true);
}

#[test]
fn revoking_mid_run_crashes_the_greeter_through_its_own_error_path() {
    let up = up();
    let id = ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write"]).trim().to_string();
    wait_for_status(&up, &id, "running");
    ok(&up, &["revoke", &id, "kv"]);
    wait_for_status(&up, &id, "crashed");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &id, "-o", "json"])).unwrap();
    assert_eq!(inspect["metadata"]["last_error"], "exited with code 1");
    assert!(inspect["capabilities"].as_array().unwrap().is_empty());
}

#[test]
fn bad_input_gets_error_codes_and_the_orchestrator_survives() {
    let up = up();
    let garbage = std::env::temp_dir().join(format!("factum-garbage-{}.wasm", std::process::id()));
    std::fs::write(&garbage, b"\0asm\x01\0\0\0\xff\xff\xff").unwrap();
    fails_with(&up, &["start", garbage.to_str().unwrap()], "INVALID_REQUEST");
    std::fs::remove_file(&garbage).unwrap();
    fails_with(&up, &["start", &fixture("sleeper"), "--cap", "kv=kv:sideways"], "INVALID_REQUEST");
    fails_with(&up, &["start", &fixture("sleeper"), "--restart", "sometimes"], "INVALID_REQUEST");
    fails_with(&up, &["inspect", "no-such-instance"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["stop", "no-such-instance"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["grant", "no-such-instance", "kv", "kv:read"], "INSTANCE_NOT_FOUND");
    // Still serving after all that.
    let id = ok(&up, &["start", &fixture("exit_clean")]).trim().to_string();
    wait_for_status(&up, &id, "stopped");
    let trap =
        ok(&up, &["start", &fixture("trap"), "--restart", "on_failure", "--max-retries", "2"]).trim().to_string();
    wait_for_status(&up, &trap, "crashed");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &trap, "-o", "json"])).unwrap();
    assert_eq!(inspect["metadata"]["restarts"], 2);
    // A start sent again under its id is answered, not run twice; another start under that id is refused.
    let sleeper = fixture("sleeper");
    for _ in 0..2 {
        assert_eq!(ok(&up, &["start", &sleeper, "--id", "web-1", "--cap", "kv=kv:read"]).trim(), "web-1");
    }
    fails_with(&up, &["start", &sleeper, "--id", "web-1", "--cap", "kv=kv:write"], "already used by another start");
    // Removing: an ended instance goes; a running one needs --force (stop, then remove).
    fails_with(&up, &["rm", "web-1"], "stop it before removing it");
    assert_eq!(ok(&up, &["rm", "--force", "web-1"]).trim(), "removed web-1");
    fails_with(&up, &["inspect", "web-1"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["rm", "web-1"], "INSTANCE_NOT_FOUND");
    assert_eq!(ok(&up, &["rm", &id]).trim(), format!("removed {id}"));
    let human = ok(&up, &["inspect", &trap]);
    assert!(
        human.contains("restart policy: on_failure, at most 2 restarts, backoff 100 ms doubling (at most 300 s)"),
        "{human}"
    );
}

#[test]
fn client_without_a_control_plane_is_communication_failure() {
    let out = Command::new(FACTUM).args(["ps", "--control-plane", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COMMUNICATION_FAILURE"));
}

/// A SIGTERM that comes while `factum up` is still starting (its control plane listens, its node is not yet
/// ready) stops it cleanly with status 0, as one that comes later does: CI once saw status 143 there, the
/// default action of a signal nobody had taken yet.
#[test]
fn sigterm_during_start_up_is_a_clean_stop() {
    for _ in 0..5 {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut up = Command::new(FACTUM)
            .args(["up", "--listen", &listen, "--agent-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "the control plane never listened on {listen}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let kill = Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let status = up.wait().unwrap();
        assert!(status.success(), "factum up stopped with {status} on a SIGTERM during start-up");
    }
}

/// The example guest's KV write lands in a real Redis when the agent is told to keep KV there.
#[test]
fn kv_in_redis() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "redis-server is not installed, but CI must run the Redis tests");
        eprintln!("skipping: no redis-server (apt install redis-server)");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis://127.0.0.1:{port}");
    {
        let up = up_with(&["--kv-redis", &url, "--kv-namespace", "clitest"]);
        let id = ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write"]).trim().to_string();
        wait_for_status(&up, &id, "running");
        let kv: serde_json::Value = serde_json::from_str(&ok(&up, &["kv", "kv", "-o", "json"])).unwrap();
        assert_eq!(kv[0]["value"], "hello from factum");
    }
    let stored = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "HGET", "clitest:kv:kv", "greeting"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&stored.stdout).trim(), "hello from factum", "the value is in Redis itself");
    let _ = redis.kill();
    let _ = redis.wait();
}

/// Audit events, as JSON: a refused call and an operator's start each leave a line under `factum::audit`,
/// naming the principal, the action, the result and the CLI's correlation id.
#[test]
fn refused_and_operator_calls_are_audited_as_json() {
    let log_path = std::env::temp_dir().join(format!("factum-audit-{}.log", std::process::id()));
    let up = up_logging(&["--log-format", "json"], std::fs::File::create(&log_path).unwrap());
    fails_with(&up, &["start", &fixture("sleeper"), "--as", "reader/bob"], "PERMISSION_DENIED");
    ok(&up, &["start", &fixture("sleeper"), "--id", "audited"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let audit = loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        let events: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["target"] == "factum::audit")
            .collect();
        let started = events.iter().any(|e| e["fields"]["target"] == "audited" && e["fields"]["result"] == "ok");
        if started || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let refused = audit.iter().find(|e| e["fields"]["result"] == "PERMISSION_DENIED").expect("the refusal");
    assert_eq!(refused["fields"]["principal"], "reader/bob", "{refused}");
    assert_eq!(refused["fields"]["action"], "start_instance");
    // The CLI's start goes by module hash first, which a control plane that holds no such module refuses (an
    // audited INSTANCE_NOT_FOUND), then with the bytes.
    let started =
        audit.iter().find(|e| e["fields"]["target"] == "audited" && e["fields"]["result"] == "ok").expect("the start");
    assert_eq!(
        (&started["fields"]["principal"], &started["fields"]["result"]),
        (&"operator/local".into(), &"ok".into())
    );
    assert_ne!(started["fields"]["correlation"], "00", "the CLI sends a correlation id");
    let _ = std::fs::remove_file(&log_path);
}

/// A program of the public WASI test suite (see `runtime-adapters/wasm/tests/wasi-testsuite/`).
fn wasi_suite(name: &str) -> String {
    format!("{}/runtime-adapters/wasm/tests/wasi-testsuite/{name}.wasm", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn guests_get_their_arguments_and_environment() {
    let up = up();
    // Each program asserts what it reads (argv[0] then three arguments; three variables) and exits 0 only if
    // it got exactly that; a missing or garbled one is an assertion failure, a crash.
    let args = ok(
        &up,
        &[
            "start",
            &wasi_suite("args_get-multiple-arguments"),
            "--arg",
            "first",
            "--arg",
            "the \"second\" arg",
            "--arg",
            "3",
        ],
    );
    let env = ok(
        &up,
        &[
            "start",
            &wasi_suite("environ_get-multiple-variables"),
            "--env",
            "a=text",
            "--env",
            "b=escap \" ing",
            "--env",
            "c=new\nline",
        ],
    );
    let unconfigured = ok(&up, &["start", &wasi_suite("environ_get-multiple-variables")]);
    for id in [&args, &env] {
        wait_for_status(&up, id.trim(), "stopped");
    }
    wait_for_status(&up, unconfigured.trim(), "crashed");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", args.trim(), "-o", "json"])).unwrap();
    assert_eq!(inspect["config"]["program"], "args_get-multiple-arguments.wasm");
    assert_eq!(inspect["config"]["args"][1], "the \"second\" arg");
    let human = ok(&up, &["inspect", env.trim()]);
    assert!(human.contains("env c=\"new\\nline\""), "{human}");

    // What a guest cannot be given is refused before anything starts.
    let program = wasi_suite("args_sizes_get-no-arguments");
    let huge = format!("A={}", "x".repeat(20_000));
    for (bad, why) in [("NOEQUALS", "is not NAME=value"), ("=x", "is not NAME=value"), (huge.as_str(), "bytes")] {
        let out = factum(&up, &["start", &program, "--env", bad]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "--env {bad:?}: {stderr}");
    }
    fails_with(&up, &["start", &program, "--env", "A=1", "--env", "A=2"], "INVALID_REQUEST");
    let ps: serde_json::Value = serde_json::from_str(&ok(&up, &["ps", "-o", "json"])).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 3);
}

#[test]
fn shell_completions_name_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_factum")).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for command in ["start", "stop", "rm", "inspect", "certs", "completions"] {
        assert!(script.contains(command), "bash completions lack {command}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_factum")).args(["completions", "cmd.exe"]).output().unwrap();
    assert!(!bad.status.success());
}

/// `--compact-memory`: each instance reserves only its memory budget of address space, in a pool too, and
/// guests run as before; with wasmi, which reserves nothing, the flag is refused and says why.
#[test]
fn compact_memory_runs_guests_and_is_refused_with_wasmi() {
    let up = up_with(&["--pooled", "--compact-memory", "--max-instances", "64"]);
    let sleeper = ok(&up, &["start", &fixture("sleeper")]).trim().to_string();
    wait_for_status(&up, &sleeper, "running");
    let out = Command::new(FACTUM)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--engine",
            "wasmi",
            "--compact-memory",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not with --engine wasmi"), "{stderr}");
}

#[test]
fn restart_runs_an_instance_again_with_fresh_memory() {
    let up = up();
    let done = ok(&up, &["start", &fixture("exit_clean")]).trim().to_string();
    wait_for_status(&up, &done, "stopped");
    let sleeper = ok(&up, &["start", &fixture("sleeper")]).trim().to_string();
    wait_for_status(&up, &sleeper, "running");
    for id in [&done, &sleeper] {
        assert_eq!(ok(&up, &["restart", id]).trim(), format!("restarted {id}"));
    }
    // The one that exits does so again; the sleeper runs again; each counts one restart.
    wait_for_status(&up, &sleeper, "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in [&done, &sleeper] {
        loop {
            let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", id, "-o", "json"])).unwrap();
            if inspect["metadata"]["restarts"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "{id}: {inspect}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    wait_for_status(&up, &done, "stopped");
    fails_with(&up, &["restart", "no-such-instance"], "INSTANCE_NOT_FOUND");
}

#[test]
fn logs_show_each_runs_output_and_follow_keeps_printing() {
    use std::io::BufRead;
    let up = up();
    // Prints "hello" and exits 0; `always` runs it three times in all.
    let args = ["start", &wasi_suite("fd_write-to-stdout"), "--restart", "always", "--max-retries", "2"];
    let id = ok(&up, &args).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let out = ok(&up, &["logs", &id, "-o", "json"]);
        let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() == 3 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for (run, line) in lines.iter().enumerate() {
        assert_eq!(
            (line["text"].as_str(), line["stream"].as_str(), line["run"].as_u64()),
            (Some("hello"), Some("stdout"), Some(run as u64))
        );
    }
    let human = ok(&up, &["logs", &id]);
    assert!(human.lines().nth(2).is_some_and(|l| l.ends_with(" run=2 stdout hello")), "{human}");
    assert_eq!(ok(&up, &["logs", &id, "--since", "1h"]).lines().count(), 3);

    // Following prints what is there, then keeps asking until interrupted.
    let mut follower = Command::new(FACTUM)
        .args(["logs", "-f", &id, "--control-plane", up.addr()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open: a follower whose reader went away ends quietly at its next line.
    let mut follower_out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut first = String::new();
    follower_out.read_line(&mut first).unwrap();
    assert!(first.ends_with(" run=0 stdout hello\n"), "{first}");
    std::thread::sleep(Duration::from_millis(700));
    assert!(follower.try_wait().unwrap().is_none(), "--follow must keep running");
    follower.kill().unwrap();
    follower.wait().unwrap();

    fails_with(&up, &["logs", "no-such-instance"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["logs", &id, "--since", "a while"], "INVALID_REQUEST");
    // Guest output is the instance's data: a reader may list instances but not read it.
    fails_with(&up, &["logs", &id, "--as", "reader/bob"], "PERMISSION_DENIED");
}

#[test]
fn events_show_what_changed_and_follow_new_ones() {
    use std::io::BufRead;
    let up = up();
    let mut follower = Command::new(FACTUM)
        .args(["events", "--control-plane", up.addr(), "--as", "reader/bob"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower_out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut first = String::new();
    follower_out.read_line(&mut first).unwrap();
    assert!(first.contains(" #1 node ") && first.contains(" joined at "), "{first}");
    let mut watcher = Command::new(FACTUM)
        .args(["ps", "--watch", "-o", "json", "--control-plane", up.addr()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watcher_out = std::io::BufReader::new(watcher.stdout.take().unwrap());
    let mut table = String::new();
    watcher_out.read_line(&mut table).unwrap();
    assert_eq!(table, "[]\n");

    let id = ok(&up, &["start", &wasi_suite("fd_write-to-stdout"), "--id", "hello"]).trim().to_string();
    wait_for_status(&up, &id, "stopped");
    let events: Vec<serde_json::Value> =
        ok(&up, &["events", "--once", "-o", "json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let statuses: Vec<&str> = events.iter().filter_map(|e| e["kind"]["instance"]["status"].as_str()).collect();
    assert_eq!(statuses.first(), Some(&"starting"), "{events:?}");
    assert_eq!(statuses.last(), Some(&"stopped"), "{events:?}");
    assert!(events.iter().all(|e| e["time_ms"].as_u64().is_some_and(|t| t > 1_700_000_000_000)), "{events:?}");

    // The follower, started before, saw the same instance go by.
    let mut line = String::new();
    while !line.contains("instance hello stopped on ") {
        line.clear();
        assert!(follower_out.read_line(&mut line).unwrap() > 0, "the follower ended");
    }
    assert!(follower.try_wait().unwrap().is_none(), "events keeps following");
    // `ps --watch` printed the list again as it changed, down to the instance's end.
    loop {
        table.clear();
        assert!(watcher_out.read_line(&mut table).unwrap() > 0, "the watcher ended");
        let instances: serde_json::Value = serde_json::from_str(&table).unwrap();
        if instances[0]["status"] == "stopped" {
            break;
        }
    }
    for mut child in [follower, watcher] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    fails_with(&up, &["events", "--once", "--as", "node/n1"], "PERMISSION_DENIED");
}

#[test]
fn replicas_and_app_files_are_batches_of_checked_starts() {
    let up = up();
    let out = ok(&up, &["start", &fixture("sleeper"), "--replicas", "3", "--id", "web", "-o", "json"]);
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(started["instance_ids"], serde_json::json!(["web-0", "web-1", "web-2"]));
    // Scale down removes the highest; scale up copies the lowest, given its module.
    assert_eq!(ok(&up, &["scale", "web", "1"]), "removed web-2\nremoved web-1\n");
    fails_with(&up, &["scale", "web", "3"], "needs the module");
    fails_with(&up, &["scale", "web", "3", &fixture("trap")], "is not the module web-0 runs");
    fails_with(&up, &["scale", "nothing", "2", &fixture("sleeper")], "INSTANCE_NOT_FOUND");
    assert_eq!(ok(&up, &["scale", "web", "3", &fixture("sleeper")]), "started web-1\nstarted web-2\n");
    assert_eq!(ok(&up, &["scale", "web", "3"]), "web has 3 replicas\n");
    wait_for_status(&up, "web-2", "running");

    let dir = std::env::temp_dir().join(format!("factum-app-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("app.toml");
    let text = format!(
        "[instances.greeter]\nmodule = {:?}\ncaps = [\"kv=kv:write\"]\nrestart = \"on_failure\"\nreplicas = 2\n\n\
         [instances.once]\nmodule = {:?}\nenv = [\"MODE=test\"]\n",
        fixture("kv_greeter"),
        fixture("exit_clean")
    );
    std::fs::write(&app, text).unwrap();
    let app = app.to_str().unwrap();
    assert_eq!(ok(&up, &["start", "-f", app]), "greeter-0\ngreeter-1\nonce\n");
    // The same file again starts nothing new: each start is answered as the one already run.
    assert_eq!(ok(&up, &["start", "-f", app]), "greeter-0\ngreeter-1\nonce\n");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ok(&up, &["ps", "-o", "json"])).unwrap();
    assert_eq!(listed.len(), 6, "{listed:?}");
    let greeter: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", "greeter-1", "-o", "json"])).unwrap();
    assert_eq!(greeter["capabilities"][0]["capability_id"], "kv");

    // Bad input is refused before anything starts.
    let bad = dir.join("bad.toml");
    let text = format!("[instances.a]\nmodule = {:?}\n\n[instances.b]\nmodule = \"nowhere.wat\"\n", fixture("sleeper"));
    std::fs::write(&bad, text).unwrap();
    fails_with(&up, &["start", "-f", bad.to_str().unwrap()], "cannot read");
    fails_with(&up, &["start", &fixture("sleeper"), "--replicas", "0"], "INVALID_REQUEST");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ok(&up, &["ps", "-o", "json"])).unwrap();
    assert_eq!(listed.len(), 6, "a refused batch started something: {listed:?}");
    let both = factum(&up, &["start", &fixture("sleeper"), "-f", app]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"), "{both:?}");
}

#[test]
fn constraints_place_on_labelled_nodes_only() {
    let (_control_plane, cp) = control_plane();
    let _agents =
        [agent("n1", &cp, &["--label", "zone=a", "--label", "tier=web"]), agent("n2", &cp, &["--label", "zone=b"])];
    wait_for_nodes(&cp, 2);
    let nodes = ok(&cp, &["nodes"]);
    assert!(nodes.contains("LABELS") && nodes.contains("tier=web,zone=a") && nodes.contains("zone=b"), "{nodes}");

    let node_of = |id: &str| {
        let inspect: serde_json::Value = serde_json::from_str(&ok(&cp, &["inspect", id, "-o", "json"])).unwrap();
        inspect["metadata"]["node_id"].as_str().unwrap().to_string()
    };
    ok(&cp, &["start", &fixture("sleeper"), "--replicas", "3", "--id", "pinned", "--constraint", "zone=b"]);
    for id in ["pinned-0", "pinned-1", "pinned-2"] {
        assert_eq!(node_of(id), "n2", "{id} ignored its constraint");
    }
    assert!(ok(&cp, &["inspect", "pinned-0"]).contains("constraints: zone=b"));
    // Unconstrained replicas spread: n1 holds fewer, so it takes them.
    ok(&cp, &["start", &fixture("sleeper"), "--replicas", "2", "--id", "free"]);
    assert_eq!((node_of("free-0"), node_of("free-1")), ("n1".into(), "n1".into()));
    // Both constraints must hold.
    ok(&cp, &["start", &fixture("sleeper"), "--id", "both", "--constraint", "zone=a", "--constraint", "tier=web"]);
    assert_eq!(node_of("both"), "n1");

    let out = factum(&cp, &["start", &fixture("sleeper"), "--id", "nowhere", "--constraint", "zone=c"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("RESOURCE_EXHAUSTED") && stderr.contains("zone=c"), "{stderr}");
    fails_with(&cp, &["inspect", "nowhere"], "INSTANCE_NOT_FOUND");
    fails_with(&cp, &["start", &fixture("sleeper"), "--constraint", "zone"], "INVALID_REQUEST");
    fails_with(&cp, &["start", &fixture("sleeper"), "--constraint", "zone=a", "--constraint", "zone=b"], "given twice");

    // An agent with a malformed label does not start.
    let bad = std::process::Command::new(FACTUM)
        .args(["agent", "--control-plane", &cp, "--agent-listen", "127.0.0.1:0", "--label", "zone=a b"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad label"), "{bad:?}");
}

#[test]
fn drain_moves_what_may_run_again_and_places_nothing_new_there() {
    let (_control_plane, cp) = control_plane();
    let _agents = [agent("n1", &cp, &[]), agent("n2", &cp, &[])];
    wait_for_nodes(&cp, 2);
    let node_of = |id: &str| {
        let inspect: serde_json::Value = serde_json::from_str(&ok(&cp, &["inspect", id, "-o", "json"])).unwrap();
        inspect["metadata"]["node_id"].as_str().unwrap().to_string()
    };
    ok(&cp, &["start", &fixture("sleeper"), "--replicas", "4", "--id", "keep", "--restart", "always"]);
    ok(&cp, &["start", &fixture("sleeper"), "--id", "once"]);
    assert_eq!(node_of("keep-0"), "n1");
    assert_eq!(node_of("once"), "n1");
    for id in ["keep-0", "keep-1", "keep-2", "keep-3", "once"] {
        wait_for_status(&cp, id, "running");
    }

    let drained = ok(&cp, &["drain", "n1"]);
    assert_eq!(
        drained,
        "drained n1\nmoved keep-0 to n2\nmoved keep-2 to n2\n\
         kept once on n1: its restart policy is never: it runs here until it ends\n"
    );
    for id in ["keep-0", "keep-2"] {
        assert_eq!(node_of(id), "n2");
        wait_for_status(&cp, id, "running");
    }
    assert_eq!(node_of("once"), "n1");
    let nodes: serde_json::Value = serde_json::from_str(&ok(&cp, &["nodes", "-o", "json"])).unwrap();
    assert_eq!(nodes[0]["drained"], true, "{nodes}");
    // n1 holds one instance and n2 five, but n1 takes nothing new.
    ok(&cp, &["start", &fixture("sleeper"), "--id", "fresh"]);
    assert_eq!(node_of("fresh"), "n2");
    let events = ok(&cp, &["events", "--once"]);
    assert!(events.contains("node n1 drained") && events.contains("keep-0 rescheduled from n1 to n2"), "{events}");
    // Again: nothing left to move.
    assert_eq!(
        ok(&cp, &["drain", "n1"]),
        "drained n1\nkept once on n1: its restart policy is never: it runs here until it ends\n"
    );

    assert_eq!(ok(&cp, &["drain", "n1", "--undo"]), "n1 takes new instances again\n");
    ok(&cp, &["start", &fixture("sleeper"), "--id", "back"]);
    assert_eq!(node_of("back"), "n1");
    fails_with(&cp, &["drain", "n9"], "INVALID_REQUEST");
}

#[test]
fn a_start_without_an_answer_is_sent_again_and_says_so() {
    let (_control_plane, cp) = control_plane();
    let mut node = agent("n1", &cp, &[]);
    wait_for_nodes(&cp, 1);
    // The control plane still counts the node in until it misses its heartbeats: the start reaches no agent.
    node.kill();
    let out = factum(&cp, &["start", &fixture("sleeper"), "--id", "lost"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sending the same start again") && stderr.contains("instance_id=lost"), "{stderr}");
}

#[test]
fn metrics_count_what_the_daemons_do() {
    let up = up_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = up.metrics.clone().expect("up says where its metrics are");
    let id = ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write", "--id", "greeter"]).trim().to_string();
    wait_for_status(&up, &id, "running");
    fails_with(&up, &["stop", "nobody"], "INSTANCE_NOT_FOUND");
    ok(&up, &["revoke", &id, "kv"]); // the greeter's next call is denied, and it exits 1
    wait_for_status(&up, &id, "crashed");

    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{metrics}");
    let at = |family: &str, labels: &[&str]| {
        sample(&metrics, family, labels).unwrap_or_else(|| panic!("no {family} {labels:?} in\n{metrics}"))
    };
    // The control plane: its maps, its API calls, what it announced.
    assert_eq!(at("factum_control_plane_instances", &[r#"status="crashed""#]), 1.0);
    assert_eq!(at("factum_control_plane_instances", &[r#"status="running""#]), 0.0);
    assert_eq!(at("factum_control_plane_nodes", &[r#"state="available""#]), 1.0);
    assert_eq!(at("factum_control_plane_rpc_requests_total", &[r#"method="start_instance""#, r#"outcome="ok""#]), 1.0);
    assert_eq!(
        at(
            "factum_control_plane_rpc_requests_total",
            &[r#"method="stop_instance""#, r#"outcome="INSTANCE_NOT_FOUND""#]
        ),
        1.0
    );
    assert!(at("factum_control_plane_rpc_duration_seconds_count", &[r#"method="start_instance""#]) >= 1.0);
    assert_eq!(at("factum_control_plane_events_total", &[r#"event="node_joined""#]), 1.0);
    assert_eq!(at("factum_control_plane_events_total", &[r#"event="instance_crashed""#]), 1.0);
    assert_eq!(at("factum_control_plane_events_total", &[r#"event="revoked""#]), 1.0);
    // The agent: its instances, their status changes, their calls by outcome, its latency histogram.
    let node = r#"node="node-1""#;
    assert_eq!(at("factum_agent_instances", &[node, r#"status="crashed""#]), 1.0);
    assert_eq!(at("factum_agent_instance_transitions_total", &[node, r#"status="running""#]), 1.0);
    assert!(at("factum_agent_capability_calls_total", &[node, r#"provider="kv""#, r#"outcome="ok""#]) >= 1.0);
    assert_eq!(at("factum_agent_capability_calls_total", &[node, r#"outcome="PERMISSION_DENIED""#]), 1.0);
    assert!(at("factum_agent_capability_call_duration_seconds_count", &[node, r#"provider="kv""#]) >= 1.0);
    assert!(at("factum_agent_capability_call_duration_seconds_bucket", &[node, r#"le="+Inf""#]) >= 1.0);
    assert_eq!(http_get(&addr, "/").0, "HTTP/1.1 404 Not Found");
    // Asked for no endpoint, a daemon serves none.
    assert!(up_with(&[]).metrics.is_none());
}
