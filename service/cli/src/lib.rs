//! The `factum` command line: run the orchestrator (`up`, `control-plane`, `agent`) and talk to it (`start`,
//! `stop`, `ps`, `inspect`, `grant`, `revoke`, `nodes`, `kv`).

mod app;
pub mod certs;
mod client;
mod daemon;
mod metrics;
mod scale;
mod supervisor;

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
    /// How the daemons (`up`, `control-plane`, `agent`) write their log to stderr: `text` for people, `json`
    /// (one object per line) for log shippers. Audit events are under the target `factum::audit` in either.
    #[arg(long, value_enum, env = "FACTUM_LOG_FORMAT", default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How daemons log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    Text,
    /// One JSON object per line.
    Json,
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
    /// Who to call as: `operator/NAME` (every call) or `reader/NAME` (ps, inspect, nodes). Over plaintext the
    /// control plane takes this as claimed, so plaintext belongs on loopback only.
    #[arg(long = "as", env = "FACTUM_IDENTITY", default_value = "operator/local", global = true,
          value_parser = parse_principal)]
    pub identity: factum_proto::Principal,
    /// Call over mutual TLS with the certificate of `--as` from this directory (see `factum certs`).
    #[arg(long, env = "FACTUM_TLS", global = true)]
    pub tls: Option<std::path::PathBuf>,
}

/// Transport security of a daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsOpts {
    /// Serve and call over mutual TLS with the certificates in this directory (`factum certs init` makes
    /// them): every peer must show a certificate of its CA naming who it says it is. Unset: plaintext, where
    /// peers are who they claim to be; keep that to loopback.
    #[arg(long, env = "FACTUM_TLS")]
    pub tls: Option<std::path::PathBuf>,
}

/// Where a daemon serves its Prometheus metrics.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsOpts {
    /// Serve Prometheus metrics at `http://ADDR/metrics` (plaintext HTTP, counts and latencies only), e.g.
    /// `127.0.0.1:9100`; port 0 picks a free port. Unset: no metrics endpoint.
    #[arg(long, env = "FACTUM_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

fn parse_principal(s: &str) -> Result<factum_proto::Principal, String> {
    s.parse().map_err(|e: factum_proto::ErrorResponse| e.message)
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
    /// Wasmtime only: take instances' memories, tables and stacks from a pool of `--max-instances`
    /// preallocated slots (wasmtime's pooling allocator) instead of mapping them per start: starts are about a
    /// fifth faster (`cargo bench --bench start`), at the cost of reserving every slot's address space up
    /// front (about 4 GiB of virtual memory per slot, so above ~30,000 slots add `--compact-memory`).
    #[arg(long)]
    pub pooled: bool,
    /// Wasmtime only: reserve for each instance's memory only its budget (`--max-memory-mib`) of address space
    /// instead of 4 GiB with guard pages. Guest loads and stores then check their bounds (a load-heavy hash
    /// loop runs ~1.6x slower: `cargo bench --bench limits`), and the node can hold far more than the ~30,000
    /// instances that 4 GiB each allows in a 128 TiB address space (`cargo bench --bench density`). Past
    /// ~10,000 instances Linux also needs `vm.max_map_count` raised (each instance maps 3 to 6 regions; the
    /// default is 65,530).
    #[arg(long)]
    pub compact_memory: bool,
    /// Node label `NAME=VALUE`, e.g. `zone=a`; repeatable. A start with `--constraint zone=a` is placed only
    /// on nodes labelled so. Names and values take `[A-Za-z0-9._/-]`.
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,
    /// Memory budget per instance, in MiB: all its linear memories and tables together (a table element
    /// counts 8 bytes). A growth beyond fails; a module that does not fit is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_memory_mib: usize,
    /// Memory budget of the whole node, in MiB: every instance's memories and tables draw on it as well as on
    /// their own budget, so a start whose memory does not fit is RESOURCE_EXHAUSTED and a growth beyond fails.
    /// Default: three quarters of the host's memory.
    #[arg(long)]
    pub node_memory_mib: Option<usize>,
    /// Most table elements per instance, across all its tables.
    #[arg(long, default_value_t = factum_wasm::Limits::default().max_table_elements)]
    pub max_table_elements: usize,
    /// Fuel budget per run (roughly Wasm instructions); a run that uses it up crashes. Unlimited if unset.
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Modules compiled at once (off the async runtime, on blocking threads); more starts wait their turn.
    #[arg(long, default_value_t = factum_node_agent::CompileLimits::default().concurrency)]
    pub compile_concurrency: usize,
    /// Longest one module may take to compile, e.g. `60s`; longer is RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub compile_budget: std::time::Duration,
    /// TTL of the node's registry lease (with `--etcd`), e.g. `5s`. A node that cannot renew it for 4/5 of
    /// this stops its reschedulable instances; the control plane reschedules them once the lease expires.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: std::time::Duration,
    /// Where the node's own KV provider keeps its data.
    #[command(flatten)]
    pub kv: KvOpts,
    /// Send the calls of one capability kind to a provider host instead of this agent's own provider:
    /// `KIND=ID@ADDR`, e.g. `kv=kv-1@10.0.0.5:7801`, where KIND is kv or http and `factum provider KIND --id
    /// ID` runs at ADDR. The host checks each call's grant against the control plane's seal; over TLS its
    /// certificate must name `provider/ID`. Repeatable; several hosts of one kind share its calls by store
    /// (see `--provider-from-registry`).
    #[arg(long = "provider-host", value_name = "KIND=ID@ADDR")]
    pub provider_hosts: Vec<String>,
    /// Send the calls of one capability kind (kv or http) to the provider hosts registered in etcd (`factum
    /// provider --etcd …`), following them as they come and go; needs `--etcd`. A call goes to a host on this
    /// node first, else to the host that ranks first for its store (rendezvous hashing: every node agrees);
    /// KV reads go on to the next host when one is unavailable, writes do not. Repeatable.
    #[arg(long = "provider-from-registry", value_name = "KIND")]
    pub provider_from_registry: Vec<ProviderKind>,
    /// Run a provider host as a child process of this agent and send the calls of its kind to it:
    /// `KIND=ID@ADDR` starts `factum provider KIND --id ID --listen ADDR` (with this agent's `--tls` and KV
    /// options). It is started again whenever it exits (after 0.1 s, doubling to 5 s while it keeps failing)
    /// and stops with the agent. Repeatable.
    #[arg(long = "run-provider", value_name = "KIND=ID@ADDR")]
    pub run_providers: Vec<String>,
    /// Carry messages through the NATS server at this URL (e.g. `nats://127.0.0.1:4222`), so instances on
    /// different nodes hear each other. Unset: an in-process bus (this node only).
    #[arg(long, env = "FACTUM_MSG_NATS")]
    pub msg_nats: Option<String>,
    /// Subject prefix of this cluster's topics in NATS (clusters sharing a server must differ).
    #[arg(long, default_value = "factum")]
    pub msg_prefix: String,
    /// Reach NATS over TLS, trusting this CA (PEM) for the server's certificate (`factum certs host` makes one
    /// from the cluster's CA). User and password go in the URL: `nats://user:password@host:4222`.
    #[arg(long, env = "FACTUM_MSG_NATS_CA")]
    pub msg_nats_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) to show a NATS server that verifies its clients; with `--msg-nats-key`.
    #[arg(long, requires = "msg_nats_key")]
    pub msg_nats_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--msg-nats-cert`.
    #[arg(long, requires = "msg_nats_cert")]
    pub msg_nats_key: Option<std::path::PathBuf>,
}

/// Where a KV provider keeps its data.
#[derive(Debug, Clone, clap::Args)]
pub struct KvOpts {
    /// Keep KV data in Redis at this URL (e.g. `redis://127.0.0.1:6379`) instead of in memory.
    #[arg(long, env = "FACTUM_KV_REDIS")]
    pub kv_redis: Option<String>,
    /// Namespace of this cluster's keys in Redis (clusters sharing a Redis must differ).
    #[arg(long, default_value = "factum")]
    pub kv_namespace: String,
    /// Reach Redis over TLS (a `rediss://` URL), trusting this CA (PEM) for the server's certificate. User and
    /// password go in the URL: `rediss://user:password@host:6380`.
    #[arg(long, env = "FACTUM_KV_REDIS_CA")]
    pub kv_redis_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) to show a Redis server that verifies its clients; with `--kv-redis-key`.
    #[arg(long, requires = "kv_redis_key")]
    pub kv_redis_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--kv-redis-cert`.
    #[arg(long, requires = "kv_redis_cert")]
    pub kv_redis_key: Option<std::path::PathBuf>,
}

/// The capability providers `factum provider` runs as a process of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// Key-value (in memory, or Redis with `--kv-redis`).
    Kv,
    /// Outbound HTTP.
    Http,
}

/// What `factum provider` runs, where, and how agents find it.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderOpts {
    /// Which provider.
    #[arg(value_enum)]
    pub kind: ProviderKind,
    /// Its id, unique in the cluster: its identity is `provider/ID`.
    #[arg(long, default_value = "kv-1")]
    pub id: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7801")]
    pub listen: String,
    /// Address agents reach it at, as registered in etcd. Default: the address it listens on.
    #[arg(long)]
    pub advertise: Option<String>,
    /// The node it runs on, as registered in etcd: that node's agent sends it its calls first.
    #[arg(long)]
    pub node: Option<String>,
    /// TTL of its registry lease (with `--etcd`), e.g. `5s`: how long agents may still route to it after it
    /// died.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: std::time::Duration,
    /// Stop when standard input closes: how a supervising agent's children never outlive it.
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
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
    /// Reach etcd over TLS (endpoints are dialled `https://`), trusting this CA (PEM) for its certificate.
    #[arg(long, env = "FACTUM_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) to show an etcd that verifies its clients (`--client-cert-auth`); with
    /// `--etcd-key`.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user, for an etcd with authentication on; the password comes from `FACTUM_ETCD_PASSWORD`, so it
    /// stays out of the process list.
    #[arg(long, env = "FACTUM_ETCD_USER")]
    pub etcd_user: Option<String>,
}

/// A `--grant-ttl`: a duration of at least a second.
fn grant_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < std::time::Duration::from_secs(1) {
        return Err(format!("{text} is too short: a grant seal must last at least 1s"));
    }
    Ok(ttl)
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a control plane and one agent in this process, with in-memory defaults.
    Up {
        /// Address the control plane listens on (port 0 picks a free port).
        #[arg(long, default_value = DEFAULT_CONTROL_PLANE)]
        listen: String,
        /// How long instances that ended for good are kept (then removed, as `factum rm` does), e.g. `1h`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        retention: std::time::Duration,
        /// Agent options.
        #[command(flatten)]
        agent: AgentOpts,
        /// TLS options.
        #[command(flatten)]
        tls: TlsOpts,
        /// Metrics options.
        #[command(flatten)]
        metrics: MetricsOpts,
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
        /// How long instances that ended for good are kept (then removed, as `factum rm` does), e.g. `1h`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        retention: std::time::Duration,
        /// How long a grant's seal lasts at provider hosts (at least 1s). Seals are renewed while nodes report
        /// here, so this is how long a revoked grant can still be used at a provider host by a node that kept
        /// its seal, and how long nodes cut off from this control plane keep their remote providers.
        #[arg(long, default_value = "10m", value_parser = grant_ttl)]
        grant_ttl: std::time::Duration,
        /// Registry options.
        #[command(flatten)]
        registry: RegistryOpts,
        /// TLS options.
        #[command(flatten)]
        tls: TlsOpts,
        /// Metrics options.
        #[command(flatten)]
        metrics: MetricsOpts,
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
        /// TLS options.
        #[command(flatten)]
        tls: TlsOpts,
        /// Metrics options.
        #[command(flatten)]
        metrics: MetricsOpts,
    },
    /// Run one capability provider as a process of its own, for agents started with `--provider-host
    /// KIND=ID@ADDR` or `--provider-from-registry KIND`. It serves node agents only and checks every call's
    /// grant against the control plane's seal before it runs it (over TLS with the `grant.key` that `factum
    /// certs issue provider/ID` writes). With `--etcd` it registers itself under a lease of its own, so agents
    /// find it, and drop it once it stops renewing.
    Provider {
        /// The provider.
        #[command(flatten)]
        provider: ProviderOpts,
        /// Where a KV provider keeps its data.
        #[command(flatten)]
        kv: KvOpts,
        /// Registry options.
        #[command(flatten)]
        registry: RegistryOpts,
        /// TLS options.
        #[command(flatten)]
        tls: TlsOpts,
    },
    /// Make the cluster's certificates: a CA, then one certificate per component and operator.
    Certs {
        /// What to make.
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Print a shell completion script, e.g. `factum completions bash > /etc/bash_completion.d/factum`.
    Completions {
        /// Which shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Start an instance of a module (.wasm, or .wat text), N replicas of it, or the instances of an app file;
    /// prints each id.
    Start {
        /// Path to the module (a `.wasm` binary or `.wat` text).
        #[arg(required_unless_present = "file")]
        module: Option<std::path::PathBuf>,
        /// Start every instance of an app file instead: `[instances.ID]` tables with `module` (relative to the
        /// file), and optionally `caps`, `restart`, `max_retries`, `backoff`, `env`, `args` and `replicas`, as
        /// the flags take them. Everything is checked before anything starts; the ids come from the file, so
        /// the same file is safe to start again.
        #[arg(long, short = 'f', value_name = "APP.toml", conflicts_with_all = [
            "module", "caps", "max_retries", "backoff", "id", "env", "args", "replicas", "constraints"
        ])]
        file: Option<std::path::PathBuf>,
        /// Start this many instances of the module, with ids ID-0 … ID-(N-1) (ID: `--id`, or generated). The
        /// control plane spreads them over the nodes with the fewest instances.
        #[arg(long, default_value_t = 1, value_name = "N")]
        replicas: u32,
        /// Capability grant `ID=PERM[,PERM...]`, e.g. `kv=kv:read,kv:write`; repeatable.
        #[arg(long = "cap", value_name = "ID=PERMS")]
        caps: Vec<String>,
        /// Restart policy: never, always or on_failure.
        #[arg(long, default_value = "never")]
        restart: String,
        /// Most restarts (unlimited if unset).
        #[arg(long)]
        max_retries: Option<u32>,
        /// Base backoff before a restart, in whole seconds (`2s` or `2`); doubles per restart in a row after a
        /// run under 10 s, at least 100 ms and at most 5 min (or the base), plus up to 10 % jitter.
        #[arg(long)]
        backoff: Option<String>,
        /// Instance id to use; generated here if unset. A start whose answer is lost is sent again with the
        /// same id (twice at most), and the control plane answers a repeated start instead of starting twice.
        #[arg(long)]
        id: Option<String>,
        /// Environment variable `NAME=VALUE` for the guest; repeatable.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Argument for the guest, after `argv[0]` (the module's file name); repeatable, in order.
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Place only on a node labelled `NAME=VALUE` (see `agent --label`); repeatable, all must hold. Kept
        /// when the instance is rescheduled. No such node: RESOURCE_EXHAUSTED naming the constraint.
        #[arg(long = "constraint", value_name = "NAME=VALUE")]
        constraints: Vec<String>,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Set how many replicas of BASE run: its replicas are BASE-0, BASE-1, … (as `start --replicas N --id BASE`
    /// names them), and afterwards exactly BASE-0 … BASE-(N-1) exist. The highest-numbered above N are stopped
    /// and removed; missing ones are started as copies of the lowest-numbered replica (its capabilities,
    /// restart policy, arguments, environment and constraints) from MODULE, which must be the module it runs.
    Scale {
        /// The replicas' base id.
        base: String,
        /// How many replicas to keep (0 removes them all).
        replicas: u32,
        /// The module the replicas run (`.wasm` or `.wat`); needed only to start more.
        module: Option<std::path::PathBuf>,
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
    /// Restart an instance on its node: end its run, if any, and start it again with fresh memory (a stopped or
    /// crashed instance runs again). Counts as a restart.
    Restart {
        /// Instance id.
        instance_id: String,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print an instance's output (stdout and stderr), each line with its time, run number and stream, from the
    /// buffer its node keeps (the last 1,000 lines or 128 KiB).
    Logs {
        /// Instance id.
        instance_id: String,
        /// Keep printing new lines as they come, until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only lines from this far back, e.g. `5m` or `1h 30m`.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print what changed in the cluster, as the control plane saw it: instances placed, running, stopped,
    /// crashed (with why), rescheduled or removed; grants and revocations; nodes joining, leaving, going silent
    /// and coming back. Keeps printing new events until interrupted. The control plane keeps the last 10,000 in
    /// memory; a restarted one starts a new journal.
    Events {
        /// Print the events held now and exit.
        #[arg(long)]
        once: bool,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove an ended instance (stopped, or crashed for good) from its node and the control plane, with its
    /// grants. Ended instances are removed by themselves after the control plane's retention (1 h).
    Rm {
        /// Instance id.
        instance_id: String,
        /// Stop it first if it is still running or waiting to restart.
        #[arg(long, short)]
        force: bool,
        /// Client options.
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List instances.
    Ps {
        /// Print the table again each time an instance changes (with `-o json`, one array per line), until
        /// interrupted.
        #[arg(long, short)]
        watch: bool,
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
    /// Drain a node: it takes no new instances, and each of its instances whose restart policy is `always` or
    /// `on_failure` (with retries left) is stopped there, then started on another node (one at a time, never
    /// running twice; a move counts as a restart). Instances under `never` run on where they are until they
    /// end. Safe to repeat. The agent keeps the mark until `--undo` or until it restarts.
    Drain {
        /// Node id.
        node_id: String,
        /// Undrain: the node takes new instances again.
        #[arg(long)]
        undo: bool,
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

/// `factum certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Create a cluster CA in DIR, and certificates for the control plane, node/node-1 and operator/local
    /// (what `factum up --tls DIR` and the CLI's default identity need), and the control plane's placement key
    /// (`placement.key`: it seals the placements it issues; keep it with the control plane and never replace it).
    Init {
        /// Directory to write into (created if missing); refuses one that already holds a CA.
        #[arg(long, default_value = "certs")]
        dir: std::path::PathBuf,
    },
    /// Issue certificates signed by the CA in DIR: `control-plane`, `node/ID`, `operator/NAME`, `reader/NAME`,
    /// `provider/ID` (`control-plane` also writes `placement.key` if DIR has none, and `provider/ID` writes
    /// `grant.key`, derived from it, which provider hosts check grants with).
    Issue {
        /// The identities, e.g. `node/n2 operator/alice reader/ci`.
        #[arg(required = true, value_parser = parse_principal)]
        identities: Vec<factum_proto::Principal>,
        /// Directory holding the CA (`ca.pem`, `ca.key`).
        #[arg(long, default_value = "certs")]
        dir: std::path::PathBuf,
    },
    /// Issue a server certificate for a backend (etcd, Redis, NATS) signed by the CA in DIR, as
    /// `host-NAME.pem` and `host-NAME.key`, so the cluster's CA is the one its agents trust there too.
    Host {
        /// A name for the files, e.g. `nats`.
        name: String,
        /// A host name or IP address its clients dial; repeatable, e.g. `--san localhost --san 127.0.0.1`.
        #[arg(long = "san", required = true)]
        names: Vec<String>,
        /// Directory holding the CA (`ca.pem`, `ca.key`).
        #[arg(long, default_value = "certs")]
        dir: std::path::PathBuf,
    },
}

/// Writes the completion script for `shell` to stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "factum", &mut std::io::stdout());
    Ok(())
}

fn certs_command(action: CertsAction) -> anyhow::Result<()> {
    let (dir, written) = match action {
        CertsAction::Init { dir } => {
            let written = certs::init(&dir, &certs::initial_identities())?;
            (dir, written)
        }
        CertsAction::Issue { identities, dir } => {
            let written = certs::issue(&dir, &identities)?;
            (dir, written)
        }
        CertsAction::Host { name, names, dir } => {
            let written = certs::issue_host(&dir, &name, &names)?;
            (dir, written)
        }
    };
    for file in written {
        println!("{}", dir.join(file).display());
    }
    Ok(())
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
    if matches!(
        cli.command,
        Command::Up { .. } | Command::ControlPlane { .. } | Command::Agent { .. } | Command::Provider { .. }
    ) {
        daemon::init_logging(cli.log_format);
    } else {
        client::init_logging();
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up { listen, retention, agent, tls, metrics } => {
                daemon::up(listen, retention, agent, tls, metrics).await
            }
            Command::ControlPlane { listen, no_reschedule, retention, grant_ttl, registry, tls, metrics } => {
                let lifetimes = daemon::Lifetimes { retention, grant_ttl };
                daemon::control_plane(listen, !no_reschedule, lifetimes, registry, tls, metrics).await
            }
            Command::Agent { control_plane, agent, registry, tls, metrics } => {
                daemon::agent(control_plane, agent, registry, tls, metrics).await
            }
            Command::Provider { provider, kv, registry, tls } => daemon::provider(provider, kv, registry, tls).await,
            Command::Certs { action } => certs_command(action),
            Command::Completions { shell } => completions(shell),
            other => client::run(other).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
