//! What `factum start` starts: one module from flags, its replicas, or the instances of an app file
//! (`factum start -f app.toml`). Every instance becomes one start request, built and checked here before any
//! is sent: a batch of starts, not a desired state that something keeps reconciling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use factum_proto::guest_config::parse_env_var;
use factum_proto::{ErrorResponse, GuestConfig, PolicyType, RestartPolicy, StartRequest};
use serde::Deserialize;

use crate::client::{parse_backoff, parse_cap, read_module};

/// Most replicas of one instance.
pub const MAX_REPLICAS: u32 = 1_000;

/// One instance to start, as `factum start` flags or an app-file entry give it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The module (a `.wasm` binary or `.wat` text); in an app file, relative to the file.
    pub module: PathBuf,
    /// Grants `ID=PERM[,PERM...]`.
    #[serde(default)]
    pub caps: Vec<String>,
    /// never, always or on_failure.
    #[serde(default = "never")]
    pub restart: String,
    /// Most restarts.
    pub max_retries: Option<u32>,
    /// Base backoff before a restart (`2s`, `2`).
    pub backoff: Option<String>,
    /// `NAME=VALUE` for the guest.
    #[serde(default)]
    pub env: Vec<String>,
    /// Arguments after `argv[0]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// How many instances: ids `ID-0` … `ID-(N-1)` when more than one.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Placement constraints `NAME=VALUE`: only nodes with these labels.
    #[serde(default)]
    pub constraints: Vec<String>,
}

fn never() -> String {
    "never".into()
}

fn one() -> u32 {
    1
}

/// An app file: instances by id (the base of their replicas' ids), started in the order of their ids.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    instances: BTreeMap<String, Spec>,
}

/// The start requests of an app file, in order, each with its instance id. Ids come from the file, so the
/// same file is safe to start again: the control plane answers a start it already ran.
pub fn requests_from_file(path: &Path) -> Result<Vec<StartRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let app: AppFile = toml::from_str(&text)
        .map_err(|e| anyhow!("INVALID_REQUEST: {} is not a valid app file: {e}", path.display()))?;
    if app.instances.is_empty() {
        bail!("INVALID_REQUEST: {} names no instances ([instances.ID] tables)", path.display());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut all = Vec::new();
    for (id, mut spec) in app.instances {
        spec.module = dir.join(&spec.module);
        all.extend(requests(&spec, &id).map_err(|e| anyhow!("{e} (instance {id:?} in {})", path.display()))?);
    }
    Ok(all)
}

/// The start requests of one spec: one per replica, ids derived from `base`.
pub fn requests(spec: &Spec, base: &str) -> Result<Vec<StartRequest>> {
    if !(1..=MAX_REPLICAS).contains(&spec.replicas) {
        bail!("INVALID_REQUEST: replicas must be 1 to {MAX_REPLICAS}, got {}", spec.replicas);
    }
    factum_proto::validate_id("instance_id", base).map_err(|e| anyhow!("{e}"))?;
    let template = request(spec)?;
    let ids: Vec<String> = match spec.replicas {
        1 => vec![base.to_string()],
        n => (0..n).map(|i| format!("{base}-{i}")).collect(),
    };
    ids.into_iter()
        .map(|id| {
            factum_proto::validate_id("instance_id", &id).map_err(|e| anyhow!("{e}"))?;
            Ok(StartRequest { instance_id: Some(id), ..template.clone() })
        })
        .collect()
}

/// One start request without its id, every part checked as the control plane will check it.
fn request(spec: &Spec) -> Result<StartRequest> {
    let policy_type: PolicyType = spec.restart.parse().map_err(|e: ErrorResponse| anyhow!("{e}"))?;
    let restart_policy = RestartPolicy {
        policy_type,
        max_retries: spec.max_retries,
        backoff_seconds: spec.backoff.as_deref().map(parse_backoff).transpose()?,
    };
    restart_policy.validate().map_err(|e| anyhow!("{e}"))?;
    let capabilities = spec.caps.iter().map(|c| parse_cap(c)).collect::<Result<Vec<_>>>()?;
    let config = GuestConfig {
        program: spec.module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        args: spec.args.clone(),
        env: spec.env.iter().map(|e| parse_env_var(e)).collect::<Result<_, _>>().map_err(|e| anyhow!("env: {e}"))?,
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    let constraints = factum_proto::labels::parse_labels("constraint", spec.constraints.iter().map(String::as_str))
        .map_err(|e| anyhow!("{e}"))?;
    let module_bytes = read_module(&spec.module)?;
    Ok(StartRequest {
        instance_id: None,
        module_bytes,
        module_hash: None,
        capabilities,
        restart_policy,
        config,
        constraints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("factum-app-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_app_file_becomes_one_checked_request_per_replica() {
        let dir = temp_dir("ok");
        write(&dir, "noop.wat", r#"(module (memory (export "memory") 1) (func (export "_start")))"#);
        let app = write(
            &dir,
            "app.toml",
            r#"
            [instances.web]
            module = "noop.wat"
            caps = ["kv=kv:read"]
            restart = "always"
            replicas = 3
            env = ["MODE=prod"]
            args = ["--port", "80"]

            [instances.batch]
            module = "noop.wat"
            "#,
        );
        let requests = requests_from_file(&app).unwrap();
        let ids: Vec<_> = requests.iter().map(|r| r.instance_id.clone().unwrap()).collect();
        assert_eq!(ids, ["batch", "web-0", "web-1", "web-2"]);
        let web = &requests[1];
        assert_eq!(web.restart_policy.policy_type, PolicyType::Always);
        assert_eq!(web.capabilities[0].capability_id, "kv");
        assert_eq!(web.config.env, [("MODE".to_string(), "prod".to_string())]);
        assert_eq!(web.config.args, ["--port", "80"]);
        assert_eq!(web.config.program, "noop.wat");
        assert!(web.module_bytes.starts_with(b"\0asm"));
        assert_eq!(requests[0].restart_policy.policy_type, PolicyType::Never);
    }

    #[test]
    fn the_example_app_file_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/app.toml");
        let ids: Vec<_> = requests_from_file(&example).unwrap().into_iter().filter_map(|r| r.instance_id).collect();
        assert_eq!(ids, ["greeter-0", "greeter-1", "hello"]);
    }

    #[test]
    fn a_bad_app_file_is_refused_naming_what_is_wrong() {
        let dir = temp_dir("bad");
        write(&dir, "noop.wat", r#"(module (memory (export "memory") 1) (func (export "_start")))"#);
        let cases = [
            ("[instances.web]\nmodule = \"noop.wat\"\nreplica = 2\n", "unknown field `replica`"),
            ("[instances.web]\nmodule = \"noop.wat\"\nreplicas = 0\n", "replicas must be 1 to 1000"),
            ("[instances.web]\nmodule = \"missing.wat\"\n", "cannot read"),
            ("[instances.web]\nmodule = \"noop.wat\"\nrestart = \"sometimes\"\n", "sometimes"),
            ("[instances.web]\nmodule = \"noop.wat\"\ncaps = [\"kv\"]\n", "bad --cap"),
            ("[instances.web]\nmodule = \"noop.wat\"\nenv = [\"=x\"]\n", "not NAME=value"),
            ("[instances.\"bad id\"]\nmodule = \"noop.wat\"\n", "instance_id"),
            ("instances = {}\n", "names no instances"),
            ("[instances.web\n", "not a valid app file"),
        ];
        for (text, said) in cases {
            let e = requests_from_file(&write(&dir, "app.toml", text)).unwrap_err();
            assert!(format!("{e:#}").contains(said), "{text:?}: {e:#}");
        }
    }
}
