//! The client commands: one tarpc call each, printed as a table or JSON.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use factum_env::{rpc, Env};
use factum_proto::guest_config::parse_env_var;
use factum_proto::{
    CapabilityGrant, ControlPlaneClient, ErrorResponse, GuestConfig, InstanceMetadata, PolicyType, RestartPolicy,
    StartRequest,
};
use serde::Serialize;

use crate::{ClientOpts, Command, Output};

/// How long a client command waits for the control plane.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(opts: &ClientOpts) -> Result<(Env, ControlPlaneClient)> {
    let credentials = match &opts.tls {
        None => rpc::Credentials::claim(opts.identity.clone()),
        Some(dir) => rpc::Credentials::tls(opts.identity.clone(), rpc::tls::Tls::from_dir(dir, &opts.identity)?),
    };
    let env = Env::tokio().with_credentials(credentials);
    let stream = env
        .timeout(CLIENT_TIMEOUT, rpc::dial(&env, &opts.control_plane, &factum_proto::Principal::ControlPlane))
        .await
        .ok_or_else(|| anyhow!("COMMUNICATION_FAILURE: connecting to {} timed out", opts.control_plane))?
        .map_err(|e| {
            use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
            let addr = &opts.control_plane;
            match e.kind() {
                PermissionDenied => anyhow!("PERMISSION_DENIED: {e}"),
                ConnectionRefused | NotFound => {
                    anyhow!("COMMUNICATION_FAILURE: cannot reach the control plane at {addr} (is `factum up` running?): {e}")
                }
                _ => anyhow!("COMMUNICATION_FAILURE: the control plane at {addr} could not be called: {e}"),
            }
        })?;
    let client =
        rpc::start_client(&env, ControlPlaneClient::new(tarpc::client::Config::default(), rpc::transport(stream)));
    Ok((env, client))
}

/// Awaits one call with the client timeout, flattening transport and API errors.
async fn call<T>(env: &Env, fut: impl std::future::Future<Output = Result<T, tarpc::client::RpcError>>) -> Result<T> {
    match env.timeout(CLIENT_TIMEOUT, fut).await {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => bail!("COMMUNICATION_FAILURE: {}", rpc::describe(&e)),
        None => bail!("COMMUNICATION_FAILURE: the control plane did not answer within {CLIENT_TIMEOUT:?}"),
    }
}

/// How many times `start` sends one start whose answer does not arrive.
const START_ATTEMPTS: u32 = 3;

/// Sends `request` (which names its instance id) and, while the answer is lost, sends it again on a new
/// connection after a pause: the control plane answers a repeated start with the same id without starting it
/// twice. The error is the last communication failure; the answer, success or API error, is final.
async fn start_retrying(
    opts: &ClientOpts,
    (mut env, mut cp): (Env, ControlPlaneClient),
    request: StartRequest,
) -> Result<Result<String, ErrorResponse>> {
    let mut attempt = 1;
    let ctx = rpc::traced_context(&env); // every attempt under one correlation id
    loop {
        match call(&env, cp.start_instance(ctx, request.clone())).await {
            Ok(answer) => return Ok(answer),
            Err(e) if attempt < START_ATTEMPTS => {
                eprintln!("{e}; sending the same start again");
                env.clock.sleep(Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
                (env, cp) = connect(opts).await?;
            }
            Err(e) => return Err(e),
        }
    }
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

/// How often `logs --follow` asks for new lines.
const LOG_POLL: Duration = Duration::from_millis(500);

/// One line of `factum logs`: time, run, stream and text, or one JSON object per line. `false` once nobody
/// reads stdout any more.
fn print_log_line(output: Output, line: &factum_proto::logs::LogLine) -> Result<bool> {
    let text = match output {
        Output::Json => serde_json::to_string(line)?,
        Output::Table => {
            let time = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(line.time_ms));
            format!("{time} run={} {} {}", line.run, line.stream, line.text)
        }
    };
    emit(&(text + "\n"))
}

/// Runs one client command.
pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Start { module, caps, restart, max_retries, backoff, id, env, args, client } => {
            let policy_type: PolicyType = restart.parse().map_err(|e: ErrorResponse| anyhow!("{e}"))?;
            let restart_policy = RestartPolicy {
                policy_type,
                max_retries,
                backoff_seconds: backoff.as_deref().map(parse_backoff).transpose()?,
            };
            let capabilities = caps.iter().map(|c| parse_cap(c)).collect::<Result<Vec<_>>>()?;
            let config = GuestConfig {
                program: module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                args,
                env: env
                    .iter()
                    .map(|e| parse_env_var(e))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow!("--env: {e}"))?,
            };
            config.validate().map_err(|e| anyhow!("{e}"))?;
            let module_bytes = read_module(&module)?;
            let (env, cp) = connect(&client).await?;
            // Drawn here rather than by the control plane, so the same start can be sent again.
            let id = id.unwrap_or_else(|| env.random_id("i-"));
            let request =
                StartRequest { instance_id: Some(id.clone()), module_bytes, capabilities, restart_policy, config };
            let answer = start_retrying(&client, (env, cp), request).await.map_err(|e| {
                anyhow!(
                    "{e}\ninstance {id} may or may not have started: `factum inspect {id}` tells, and the same \
                     `factum start --id {id}` is safe to repeat"
                )
            })?;
            let instance_id = api(answer)?;
            print(client.output, &serde_json::json!({ "instance_id": instance_id }), |_| format!("{instance_id}\n"))
        }
        Command::Stop { instance_id, client } => {
            let (env, cp) = connect(&client).await?;
            api(call(&env, cp.stop_instance(rpc::traced_context(&env), instance_id.clone())).await?)?;
            print(client.output, &serde_json::json!({ "stopped": instance_id }), |_| format!("stopped {instance_id}\n"))
        }
        Command::Restart { instance_id, client } => {
            let (env, cp) = connect(&client).await?;
            api(call(&env, cp.restart_instance(rpc::traced_context(&env), instance_id.clone())).await?)?;
            print(client.output, &serde_json::json!({ "restarted": instance_id }), |_| {
                format!("restarted {instance_id}\n")
            })
        }
        Command::Logs { instance_id, follow, since, client } => {
            let since = since
                .map(|s| humantime::parse_duration(&s).map_err(|e| anyhow!("INVALID_REQUEST: --since {s:?}: {e}")))
                .transpose()?;
            let (env, cp) = connect(&client).await?;
            let from_ms = since.map(|d| env.wall_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
            let mut after = 0;
            loop {
                let page =
                    api(call(&env, cp.instance_logs(rpc::traced_context(&env), instance_id.clone(), after)).await?)?;
                if page.evicted > 0 && from_ms.is_none() {
                    eprintln!("({} earlier lines are no longer kept)", page.evicted);
                }
                for line in page.lines.iter().filter(|l| from_ms.is_none_or(|from| l.time_ms >= from)) {
                    if !print_log_line(client.output, line)? {
                        return Ok(());
                    }
                }
                after = page.next;
                if page.lines.len() == factum_proto::logs::MAX_LOG_PAGE {
                    continue; // more are waiting
                }
                if !follow {
                    return Ok(());
                }
                env.clock.sleep(LOG_POLL).await;
            }
        }
        Command::Rm { instance_id, force, client } => {
            let (env, cp) = connect(&client).await?;
            if force {
                api(call(&env, cp.stop_instance(rpc::traced_context(&env), instance_id.clone())).await?)?;
            }
            api(call(&env, cp.remove_instance(rpc::traced_context(&env), instance_id.clone())).await?)?;
            print(client.output, &serde_json::json!({ "removed": instance_id }), |_| format!("removed {instance_id}\n"))
        }
        Command::Ps { client } => {
            let (env, cp) = connect(&client).await?;
            let instances = api(call(&env, cp.list_instances(rpc::traced_context(&env))).await?)?;
            print(client.output, &instances, |i| instances_table(i))
        }
        Command::Inspect { instance_id, client } => {
            let (env, cp) = connect(&client).await?;
            let details = api(call(&env, cp.query_instance(rpc::traced_context(&env), instance_id)).await?)?;
            print(client.output, &details, |d| {
                let mut out = instances_table(std::slice::from_ref(&d.metadata));
                out.push_str(&format!("restart policy: {}\n", d.restart_policy));
                out.push_str(&format!("argv: {:?}\n", d.config.argv(&d.metadata.instance_id).collect::<Vec<_>>()));
                for (name, value) in &d.config.env {
                    out.push_str(&format!("env {name}={value:?}\n"));
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
            let (env, cp) = connect(&client).await?;
            let call_ = cp.assign_capability(
                rpc::traced_context(&env),
                instance_id.clone(),
                capability_id.clone(),
                split_perms(&permissions),
            );
            api(call(&env, call_).await?)?;
            print(client.output, &serde_json::json!({ "granted": capability_id, "instance_id": instance_id }), |_| {
                format!("granted {capability_id} to {instance_id}\n")
            })
        }
        Command::Revoke { instance_id, capability_id, client } => {
            let (env, cp) = connect(&client).await?;
            api(call(
                &env,
                cp.revoke_capability(rpc::traced_context(&env), instance_id.clone(), capability_id.clone()),
            )
            .await?)?;
            print(client.output, &serde_json::json!({ "revoked": capability_id, "instance_id": instance_id }), |_| {
                format!("revoked {capability_id} from {instance_id}\n")
            })
        }
        Command::Nodes { client } => {
            let (env, cp) = connect(&client).await?;
            let nodes = api(call(&env, cp.list_nodes(rpc::traced_context(&env))).await?)?;
            print(client.output, &nodes, |nodes| {
                let rows = nodes.iter().map(|n| {
                    let load = format!("{}/{}", n.instances, n.max_instances);
                    [n.node_id.clone(), n.agent_addr.clone(), n.available.to_string(), load]
                });
                table(["NODE", "ADDRESS", "AVAILABLE", "INSTANCES"], rows)
            })
        }
        Command::Kv { capability_id, prefix, client } => {
            let (env, cp) = connect(&client).await?;
            let entries = api(call(&env, cp.inspect_kv(rpc::traced_context(&env), capability_id, prefix)).await?)?;
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
