//! Provider hosts an agent runs as its own children (`factum agent --run-provider KIND=ID@ADDR`, P17): each is
//! a `factum provider` process, started again whenever it exits, so a provider that crashed comes back
//! without an operator (wasmCloud #3990: a killed external provider was never restarted). A child exits when
//! its standard input closes, which the kernel does when the agent ends, however it ends: children never
//! outlive their agent.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use factum_env::Env;

use crate::{KvOpts, ProviderKind, TlsOpts};

/// The first wait before a restart; it doubles while the child keeps failing fast.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A child that ran this long was healthy: its next restart waits [`FIRST_BACKOFF`] again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// One provider host to run as a child.
#[derive(Debug, Clone)]
pub struct Child {
    /// What it provides.
    pub kind: ProviderKind,
    /// Its id: it proves `provider/<id>`.
    pub id: String,
    /// Where it listens.
    pub addr: String,
}

impl Child {
    /// The command line of `factum provider` for this child, with the agent's TLS directory and KV options.
    /// A Redis URL (it may hold a password) goes in the environment, out of the process list.
    fn command(&self, program: &PathBuf, kv: &KvOpts, tls: &TlsOpts) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        let kind = match self.kind {
            ProviderKind::Kv => "kv",
            ProviderKind::Http => "http",
        };
        command.args(["provider", kind, "--id", &self.id, "--listen", &self.addr, "--exit-with-stdin"]);
        if let Some(dir) = &tls.tls {
            command.arg("--tls").arg(dir);
        }
        command.args(["--kv-namespace", &kv.kv_namespace]);
        match &kv.kv_redis {
            Some(url) => command.env("FACTUM_KV_REDIS", url),
            None => command.env_remove("FACTUM_KV_REDIS"),
        };
        for (flag, path) in [
            ("--kv-redis-ca", &kv.kv_redis_ca),
            ("--kv-redis-cert", &kv.kv_redis_cert),
            ("--kv-redis-key", &kv.kv_redis_key),
        ] {
            if let Some(path) = path {
                command.arg(flag).arg(path);
            }
        }
        // Its stdout would mix its status lines into the agent's; its log goes to the agent's stderr.
        command.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
        command
    }
}

/// Runs `child` (this program, `factum provider …`) for as long as the caller's runtime lives, starting it
/// again after every exit.
pub async fn supervise(env: Env, child: Child, kv: KvOpts, tls: TlsOpts) {
    let what = format!("provider/{} ({:?} at {})", child.id, child.kind, child.addr);
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => {
            tracing::error!(error = %e, "cannot find this program to run {what}");
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = env.clock.now();
        match child.command(&program, &kv, &tls).spawn() {
            Ok(mut process) => {
                // Held until the child exits: dropping it is what tells the child to stop.
                let _stdin = process.stdin.take();
                let pid = process.id().unwrap_or_default();
                crate::daemon::say(format!("{what} running as pid {pid}"));
                let status = process.wait().await;
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::warn!(pid, %status, "{what} exited; starting it again in {backoff:?}");
            }
            Err(e) => tracing::error!(error = %e, "cannot start {what}; trying again in {backoff:?}"),
        }
        if env.clock.now().saturating_sub(started) >= HEALTHY_AFTER {
            backoff = FIRST_BACKOFF;
        }
        env.clock.sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
