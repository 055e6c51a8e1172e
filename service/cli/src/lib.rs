//! The `factum` command line: run the orchestrator (`up`, `control-plane`, `agent`) and talk to it (`start`,
//! `stop`, `ps`, `inspect`, `grant`, `revoke`, `nodes`, `kv`).

mod client;
mod daemon;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Default control-plane address.
pub const DEFAULT_CONTROL_PLANE: &str = "127.0.0.1:7700";

/// factum: a WebAssembly orchestrator that records execution facts, not desired state.
#[derive(Debug, Parser)]
#[command(name = "factum", version, about = "factum: a WebAssembly orchestrator that records execution facts, not desired state", long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Table,
    /// One JSON document.
    Json,
}

/// Which Wasm engine an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// Cranelift-compiled (fast execution, slower compile).
    Wasmtime,
    /// Interpreter (fast start, portable).
    Wasmi,
}

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Control plane address.
    #[arg(long, env = "FACTUM_CONTROL_PLANE", default_value = DEFAULT_CONTROL_PLANE, global = true)]
    pub control_plane: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// Options of an agent.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOpts {
    /// Node id, unique in the cluster.
    #[arg(long, default_value = "node-1")]
    pub node_id: String,
    /// Address the agent listens on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub agent_listen: String,
    /// Wasm engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Wasmtime)]
    pub engine: EngineKind,
    /// Most instances starting or running on this node at once.
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// Memory budget per instance, in MiB: all its linear memories and tables together (a table element
    /// counts 8 bytes). A growth beyond fails; a module that does not fit is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_memory_mib: usize,
    /// Most table elements per instance, across all its tables.
    #[arg(long, default_value_t = factum_wasm::Limits::default().max_table_elements)]
    pub max_table_elements: usize,
    /// Fuel budget per run (roughly Wasm instructions); a run that uses it up crashes. Unlimited if unset.
    #[arg(long)]
    pub fuel: Option<u64>,
    /// TTL of the node's registry lease (with `--etcd`), e.g. `5s`. A node that cannot renew it for 4/5 of
    /// this stops its reschedulable instances; the control plane reschedules them once the lease expires.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: std::time::Duration,
    /// Keep KV data in Redis at this URL (e.g. `redis://127.0.0.1:6379`) instead of in memory.
    #[arg(long, env = "FACTUM_KV_REDIS")]
    pub kv_redis: Option<String>,
    /// Namespace of this cluster's keys in Redis (clusters sharing a Redis must differ).
    #[arg(long, default_value = "factum")]
    pub kv_namespace: String,
    /// Carry messages through the NATS server at this URL (e.g. `nats://127.0.0.1:4222`), so instances on
    /// different nodes hear each other. Unset: an in-process bus (this node only).
    #[arg(long, env = "FACTUM_MSG_NATS")]
    pub msg_nats: Option<String>,
    /// Subject prefix of this cluster's topics in NATS (clusters sharing a server must differ).
    #[arg(long, default_value = "factum")]
    pub msg_prefix: String,
}

/// Where node membership and provider metadata live.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryOpts {
    /// etcd endpoints, comma-separated (e.g. `127.0.0.1:2379`). Unset: no registry; membership comes from
    /// agent heartbeats alone.
    #[arg(long, env = "FACTUM_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = factum_registry::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a control plane and one agent in this process, with in-memory defaults.
    Up {
        /// Address the control plane listens on (port 0 picks a free port).
        #[arg(long, default_value = DEFAULT_CONTROL_PLANE)]
        listen: String,
        /// Agent options.
        #[command(flatten)]
        agent: AgentOpts,
    },
    /// Run a control plane only. With `--etcd` it follows node membership in etcd, rebuilds from the agents
    /// it finds there after a restart, and reschedules instances of nodes whose lease expires.
    ControlPlane {
        /// Address to listen on.
        #[arg(long, default_value = DEFAULT_CONTROL_PLANE)]
        listen: String,
        /// Do not reschedule instances of a lost node (they stay `unknown` until it returns).
        #[arg(long)]
        no_reschedule: bool,
        /// Registry options.
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Run a node agent that reports to a control plane (and, with `--etcd`, registers under a lease).
    Agent {
        /// Control plane address.
        #[arg(long, default_value = DEFAULT_CONTROL_PLANE)]
        control_plane: String,
        /// Agent options.
        #[command(flatten)]
        agent: AgentOpts,
        /// Registry options.
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Start an instance of a module (.wasm, or .wat text); prints its id.
    Start {
        /// Path to the module.
        module: std::path::PathBuf,
        /// Capability grant `ID=PERM[,PERM...]`, e.g. `kv=kv:read,kv:write`; repeatable.
        #[arg(long = "cap", value_name = "ID=PERMS")]
        caps: Vec<String>,
        /// Restart policy: never, always or on_failure.
        #[arg(long, default_value = "never")]
        restart: String,
        /// Most restarts (unlimited if unset).
        #[arg(long)]
        max_retries: Option<u32>,
        /// Base backoff before a restart, in whole seconds (`2s` or `2`); doubles per restart.
        #[arg(long)]
        backoff: Option<String>,
        /// Instance id to use; generated here if unset. A start whose answer is lost is sent again with the
        /// same id (twice at most), and the control plane answers a repeated start instead of starting twice.
        #[arg(long)]
        id: Option<String>,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Stop an instance.
    Stop {
        /// Instance id.
        instance_id: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List instances.
    Ps {
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one instance with its capabilities.
    Inspect {
        /// Instance id.
        instance_id: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Grant (or replace) a capability: `factum grant ID kv kv:read,kv:write`.
    Grant {
        /// Instance id.
        instance_id: String,
        /// Capability id.
        capability_id: String,
        /// Comma-separated permissions.
        permissions: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Revoke a capability; the instance's next call on it is denied.
    Revoke {
        /// Instance id.
        instance_id: String,
        /// Capability id.
        capability_id: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List nodes.
    Nodes {
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show the entries of a KV store (operator view).
    Kv {
        /// Capability id of the store.
        capability_id: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// Runs the command line and returns the process exit code: 0 on success, 1 on a failed request.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up { listen, agent } => daemon::up(listen, agent).await,
            Command::ControlPlane { listen, no_reschedule, registry } => {
                daemon::control_plane(listen, !no_reschedule, registry).await
            }
            Command::Agent { control_plane, agent, registry } => daemon::agent(control_plane, agent, registry).await,
            other => client::run(other).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
