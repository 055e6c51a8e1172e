//! The client commands: one tarpc call each, printed as a table or JSON.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use factum_client::{Client, Credentials, Tls};
use factum_proto::{CapabilityGrant, ErrorCode, ErrorResponse, InstanceMetadata};
use serde::Serialize;

use crate::{ClientOpts, Command, Output};

/// Client commands print the client library's warnings (a start sent again after a lost answer) to stderr as
/// plain lines; `RUST_LOG` widens or narrows what is shown.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "factum_client=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

async fn connect(opts: &ClientOpts) -> Result<Client> {
    let credentials = match &opts.tls {
        None => Credentials::claim(opts.identity.clone()),
        Some(dir) => Credentials::tls(opts.identity.clone(), Tls::from_dir(dir, &opts.identity)?),
    };
    api(Client::connect(opts.control_plane.clone(), credentials).await)
}

fn api<T>(result: Result<T, ErrorResponse>) -> Result<T> {
    result.map_err(|e| anyhow!("{e}"))
}

fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Table => table(value),
    };
    emit(&text).map(|_| ())
}

/// Writes to stdout. A reader that went away (`factum logs -f | head -1`) is not an error: the answer is
/// `false`, and the command ends quietly, as Unix tools do.
fn emit(text: &str) -> Result<bool> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

/// Reads a module file; `.wat` text (or anything not starting with the Wasm magic) is parsed as WAT.
pub fn read_module(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes);
    }
    wat::parse_bytes(&bytes)
        .map(|b| b.into_owned())
        .map_err(|e| anyhow!("INVALID_REQUEST: {} is neither a Wasm binary nor valid WAT: {e}", path.display()))
}

/// Parses `ID=PERM,PERM`.
pub fn parse_cap(spec: &str) -> Result<CapabilityGrant> {
    let (id, perms) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("INVALID_REQUEST: bad --cap {spec:?}: expected ID=PERM[,PERM...]"))?;
    Ok(CapabilityGrant { capability_id: id.to_string(), permissions: split_perms(perms) })
}

fn split_perms(perms: &str) -> Vec<String> {
    perms.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect()
}

/// Parses `--backoff`: whole seconds, with or without a unit (`2`, `2s`, `1m`).
pub fn parse_backoff(text: &str) -> Result<u32> {
    if let Ok(secs) = text.parse::<u32>() {
        return Ok(secs);
    }
    let d = humantime::parse_duration(text).map_err(|e| anyhow!("INVALID_REQUEST: bad --backoff {text:?}: {e}"))?;
    if d.subsec_nanos() != 0 {
        bail!("INVALID_REQUEST: --backoff must be whole seconds, got {text:?}");
    }
    u32::try_from(d.as_secs()).map_err(|_| anyhow!("INVALID_REQUEST: --backoff {text:?} is too long"))
}

/// A plain table (no borders, like `kubectl get`) whose columns are as wide as their longest cell, so long
/// ids never push the other columns out of line.
fn table<const N: usize>(header: [&str; N], rows: impl IntoIterator<Item = [String; N]>) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING).set_header(header);
    for row in rows {
        table.add_row(row);
    }
    // comfy-table pads every cell, the last one too; a line ends where its text does.
    let lines: Vec<String> = table.lines().map(|l| l.trim().to_string()).collect();
    lines.join("\n") + "\n"
}

fn instances_table(instances: &[InstanceMetadata]) -> String {
    let rows = instances.iter().map(|m| {
        // Kubernetes' CrashLoopBackOff: the status alone would flicker between crashed, starting and running.
        let status = if m.in_crash_loop() { "crash-loop".to_string() } else { m.status.to_string() };
        let mut last_error = m.last_error.clone().unwrap_or_default();
        if let Some(ms) = m.backoff_ms {
            let wait = humantime::format_duration(std::time::Duration::from_millis(ms));
            last_error = format!("restarts after {wait} ({} in a row): {last_error}", m.restart_streak);
        }
        [
            m.instance_id.clone(),
            m.node_id.clone(),
            status,
            m.restarts.to_string(),
            m.module_hash.get(..12).unwrap_or(&m.module_hash).to_string(),
            last_error,
        ]
    });
    table(["INSTANCE", "NODE", "STATUS", "RESTARTS", "MODULE", "LAST ERROR"], rows)
}

/// A start that failed, with what to do about it and what the same command started before it.
pub(crate) fn start_failed(e: ErrorResponse, started: &[String]) -> anyhow::Error {
    let mut message = e.to_string();
    if let Some(id) = e.details.as_ref().and_then(|d| d.get("instance_id")) {
        if e.error_code == ErrorCode::CommunicationFailure {
            message += &format!("\n`factum inspect {id}` tells, and the same `factum start` is safe to repeat");
        }
    }
    if !started.is_empty() {
        message += &format!("\nstarted before it: {}", started.join(", "));
    }
    anyhow!(message)
}

/// Prints the entries of `pages` (from [`Client::follow_events`] or [`Client::follow_logs`]) until they end or
/// `print` returns `false` (nobody reads stdout any more). `evicted` hears how many entries were no longer
/// held when asked for.
async fn print_pages<T>(
    pages: impl futures::Stream<Item = Result<factum_proto::journal::Page<T>, ErrorResponse>>,
    mut evicted: impl FnMut(u64),
    mut print: impl FnMut(&T) -> Result<bool>,
) -> Result<()> {
    use futures::StreamExt as _;
    let mut pages = std::pin::pin!(pages);
    while let Some(page) = pages.next().await {
        let page = api(page)?;
        if page.evicted > 0 {
            evicted(page.evicted);
        }
        for entry in &page.entries {
            if !print(entry)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Time as RFC 3339 with milliseconds.
fn timestamp(time_ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(time_ms)).to_string()
}

/// One line of `factum logs`: time, run, stream and text, or one JSON object per line.
fn print_log_line(output: Output, line: &factum_proto::logs::LogLine) -> Result<bool> {
    let text = match output {
        Output::Json => serde_json::to_string(line)?,
        Output::Table => format!("{} run={} {} {}", timestamp(line.time_ms), line.run, line.stream, line.text),
    };
    emit(&(text + "\n"))
}

/// One line of `factum events`: time, number and what changed, or one JSON object per line.
fn print_event(output: Output, event: &factum_proto::events::Event) -> Result<bool> {
    let text = match output {
        Output::Json => serde_json::to_string(event)?,
        Output::Table => format!("{} #{} {}", timestamp(event.time_ms), event.seq, event.kind),
    };
    emit(&(text + "\n"))
}

/// Runs one client command.
pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Start {
            module,
            file,
            replicas,
            caps,
            restart,
            max_retries,
            backoff,
            id,
            env,
            args,
            constraints,
            client,
        } => {
            // Every request is built and checked before the first is sent.
            let requests = match (file, module) {
                (Some(file), _) => crate::app::requests_from_file(&file)?,
                (None, Some(module)) => {
                    let spec = crate::app::Spec {
                        module,
                        caps,
                        restart,
                        max_retries,
                        backoff,
                        env,
                        args,
                        replicas,
                        constraints,
                    };
                    // Drawn here rather than by the control plane, so the same start can be sent again.
                    let base = id.unwrap_or_else(|| factum_env::Env::tokio().random_id("i-"));
                    crate::app::requests(&spec, &base)?
                }
                (None, None) => bail!("INVALID_REQUEST: name a module, or an app file with -f"),
            };
            let cp = connect(&client).await?;
            let mut started = Vec::new();
            for request in requests {
                let instance_id = cp.start(request).await.map_err(|e| start_failed(e, &started))?;
                if client.output == Output::Table && !emit(&format!("{instance_id}\n"))? {
                    return Ok(());
                }
                started.push(instance_id);
            }
            match (client.output, started.as_slice()) {
                (Output::Table, _) => Ok(()),
                (Output::Json, [one]) => {
                    print(client.output, &serde_json::json!({ "instance_id": one }), |_| String::new())
                }
                (Output::Json, all) => {
                    print(client.output, &serde_json::json!({ "instance_ids": all }), |_| String::new())
                }
            }
        }
        Command::Scale { base, replicas, module, client } => {
            let cp = connect(&client).await?;
            let done = crate::scale::scale(&cp, &base, replicas, module.as_deref()).await?;
            print(client.output, &done, |done| {
                let mut out = String::new();
                for id in &done.started {
                    out += &format!("started {id}\n");
                }
                for id in &done.removed {
                    out += &format!("removed {id}\n");
                }
                if out.is_empty() {
                    out = format!("{base} has {replicas} replicas\n");
                }
                out
            })
        }
        Command::Stop { instance_id, client } => {
            api(connect(&client).await?.stop(&instance_id).await)?;
            print(client.output, &serde_json::json!({ "stopped": instance_id }), |_| format!("stopped {instance_id}\n"))
        }
        Command::Restart { instance_id, client } => {
            api(connect(&client).await?.restart(&instance_id).await)?;
            print(client.output, &serde_json::json!({ "restarted": instance_id }), |_| {
                format!("restarted {instance_id}\n")
            })
        }
        Command::Logs { instance_id, follow, since, client } => {
            let since = since
                .map(|s| humantime::parse_duration(&s).map_err(|e| anyhow!("INVALID_REQUEST: --since {s:?}: {e}")))
                .transpose()?;
            let cp = connect(&client).await?;
            let now_ms = factum_env::Env::tokio().wall_ms();
            let from_ms = since.map(|d| now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
            let evicted = |n| {
                if from_ms.is_none() {
                    eprintln!("({n} earlier lines are no longer kept)");
                }
            };
            print_pages(cp.follow_logs(&instance_id, 0, follow), evicted, |line| {
                if from_ms.is_some_and(|from| line.time_ms < from) {
                    return Ok(true);
                }
                print_log_line(client.output, line)
            })
            .await
        }
        Command::Events { once, client } => {
            let cp = connect(&client).await?;
            let evicted = |n| eprintln!("({n} earlier events are no longer kept)");
            print_pages(cp.follow_events(0, !once), evicted, |event| print_event(client.output, event)).await
        }
        Command::Rm { instance_id, force, client } => {
            let cp = connect(&client).await?;
            if force {
                api(cp.stop(&instance_id).await)?;
            }
            api(cp.remove(&instance_id).await)?;
            print(client.output, &serde_json::json!({ "removed": instance_id }), |_| format!("removed {instance_id}\n"))
        }
        Command::Ps { watch: false, client } => {
            let instances = api(connect(&client).await?.list().await)?;
            print(client.output, &instances, |i| instances_table(i))
        }
        Command::Ps { watch: true, client } => {
            let cp = connect(&client).await?;
            let print_list = |instances: &[InstanceMetadata]| -> Result<bool> {
                emit(&match client.output {
                    Output::Json => serde_json::to_string(instances)? + "\n",
                    Output::Table => instances_table(instances) + "\n",
                })
            };
            // The list, then again after each event about an instance: the events say when it changed.
            let after = api(cp.last_event().await)?;
            if !print_list(&api(cp.list().await)?)? {
                return Ok(());
            }
            let mut pages = std::pin::pin!(cp.follow_events(after, true));
            while let Some(page) = futures::StreamExt::next(&mut pages).await {
                let page = api(page)?;
                if (page.evicted > 0 || page.entries.iter().any(|e| e.kind.instance_id().is_some()))
                    && !print_list(&api(cp.list().await)?)?
                {
                    return Ok(());
                }
            }
            Ok(())
        }
        Command::Inspect { instance_id, client } => {
            let details = api(connect(&client).await?.query(&instance_id).await)?;
            print(client.output, &details, |d| {
                let mut out = instances_table(std::slice::from_ref(&d.metadata));
                out.push_str(&format!("restart policy: {}\n", d.restart_policy));
                out.push_str(&format!("argv: {:?}\n", d.config.argv(&d.metadata.instance_id).collect::<Vec<_>>()));
                for (name, value) in &d.config.env {
                    out.push_str(&format!("env {name}={value:?}\n"));
                }
                if !d.constraints.is_empty() {
                    out.push_str(&format!("constraints: {}\n", factum_proto::labels::display(&d.constraints)));
                }
                for c in &d.capabilities {
                    out.push_str(&format!(
                        "capability {} ({}): {}\n",
                        c.capability_id,
                        c.provider_type,
                        c.permissions.join(",")
                    ));
                }
                out
            })
        }
        Command::Grant { instance_id, capability_id, permissions, client } => {
            api(connect(&client).await?.assign(&instance_id, &capability_id, &split_perms(&permissions)).await)?;
            print(client.output, &serde_json::json!({ "granted": capability_id, "instance_id": instance_id }), |_| {
                format!("granted {capability_id} to {instance_id}\n")
            })
        }
        Command::Revoke { instance_id, capability_id, client } => {
            api(connect(&client).await?.revoke(&instance_id, &capability_id).await)?;
            print(client.output, &serde_json::json!({ "revoked": capability_id, "instance_id": instance_id }), |_| {
                format!("revoked {capability_id} from {instance_id}\n")
            })
        }
        Command::Drain { node_id, undo, client } => {
            let report = api(connect(&client).await?.drain(&node_id, !undo).await)?;
            print(client.output, &report, |report| {
                let mut out = if undo {
                    format!("{node_id} takes new instances again\n")
                } else {
                    format!("drained {node_id}\n")
                };
                for (id, to) in &report.moved {
                    out += &format!("moved {id} to {to}\n");
                }
                for (id, why) in &report.stayed {
                    out += &format!("kept {id} on {node_id}: {why}\n");
                }
                out
            })
        }
        Command::Nodes { client } => {
            let nodes = api(connect(&client).await?.nodes().await)?;
            print(client.output, &nodes, |nodes| {
                let rows = nodes.iter().map(|n| {
                    let load = format!("{}/{}", n.instances, n.max_instances);
                    let labels = factum_proto::labels::display(&n.labels);
                    let (available, drained) = (n.available.to_string(), n.drained.to_string());
                    [n.node_id.clone(), n.agent_addr.clone(), available, drained, load, labels]
                });
                table(["NODE", "ADDRESS", "AVAILABLE", "DRAINED", "INSTANCES", "LABELS"], rows)
            })
        }
        Command::Kv { capability_id, prefix, client } => {
            let entries = api(connect(&client).await?.inspect_kv(&capability_id, &prefix).await)?;
            let shown: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| serde_json::json!({ "node_id": e.node_id, "key": e.key, "value": String::from_utf8_lossy(&e.value) }))
                .collect();
            print(client.output, &shown, |_| {
                let rows = entries
                    .iter()
                    .map(|e| [e.node_id.clone(), e.key.clone(), String::from_utf8_lossy(&e.value).into_owned()]);
                table(["NODE", "KEY", "VALUE"], rows)
            })
        }
        Command::Up { .. }
        | Command::ControlPlane { .. }
        | Command::Agent { .. }
        | Command::Provider { .. }
        | Command::Certs { .. }
        | Command::Completions { .. } => {
            bail!("not a client command")
        }
    }
}

#[cfg(test)]
mod tests {
    use factum_proto::InstanceStatus;

    use super::*;

    #[test]
    fn ps_names_a_crash_loop_and_its_wait() {
        let looping = InstanceMetadata {
            instance_id: "i-1".into(),
            node_id: "n1".into(),
            module_hash: "0123456789abcdef".into(),
            created_at: 0,
            status: InstanceStatus::Crashed,
            restarts: 9,
            last_error: Some("trapped: unreachable".into()),
            restart_streak: 10,
            backoff_ms: Some(51_200),
        };
        let steady = InstanceMetadata {
            instance_id: "i-2".into(),
            status: InstanceStatus::Running,
            restart_streak: 1,
            backoff_ms: None,
            ..looping.clone()
        };
        let table = instances_table(&[looping, steady]);
        let rows: Vec<&str> = table.lines().collect();
        assert!(rows[1].contains("crash-loop"), "{table}");
        assert!(rows[1].contains("restarts after 51s 200ms (10 in a row): trapped: unreachable"), "{table}");
        assert!(rows[2].contains("running") && !rows[2].contains("restarts after"), "{table}");
    }

    #[test]
    fn a_long_id_widens_its_column_instead_of_shifting_the_others() {
        let short = InstanceMetadata {
            instance_id: "i-1".into(),
            node_id: "n1".into(),
            module_hash: "0123456789abcdef".into(),
            created_at: 0,
            status: InstanceStatus::Running,
            restarts: 0,
            last_error: None,
            restart_streak: 0,
            backoff_ms: None,
        };
        let long = InstanceMetadata { instance_id: "i-".to_string() + &"7".repeat(40), ..short.clone() };
        let table = instances_table(&[short, long]);
        let node_column: Vec<usize> =
            table.lines().map(|l| l.find(" n1").or_else(|| l.find(" NODE")).unwrap()).collect();
        assert!(node_column.windows(2).all(|w| w[0] == w[1]), "{table}");
        assert!(table.lines().all(|l| l == l.trim()), "no padding at either end: {table:?}");
    }
}
