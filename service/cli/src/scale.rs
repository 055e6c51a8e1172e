//! `factum scale BASE N`: the replicas of `BASE` (ids `BASE-0` … as `start --replicas` names them) become
//! exactly `BASE-0` … `BASE-(N-1)`. Above N, the highest-numbered are stopped and removed; below, the missing
//! ones are started as copies of the lowest-numbered replica. Like `start --replicas`, a batch of starts and
//! stops from the client, not a count the control plane keeps reconciling.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use factum_client::Client;
use factum_proto::{CapabilityGrant, ErrorCode, StartRequest};
use serde::Serialize;

/// What a scale did.
#[derive(Debug, Default, Serialize)]
pub struct Scaled {
    /// Replicas started, in order.
    pub started: Vec<String>,
    /// Replicas stopped and removed, highest first.
    pub removed: Vec<String>,
}

/// The replica number of `id` if it is `BASE-k`.
fn replica(base: &str, id: &str) -> Option<u32> {
    let k = id.strip_prefix(base)?.strip_prefix('-')?;
    // `BASE-01` is not replica 1: only the spelling `start --replicas` uses.
    k.parse().ok().filter(|n: &u32| n.to_string() == k)
}

/// Scales the replicas of `base` to `replicas`. `module` (the module they run) is needed only to start more:
/// the control plane does not hand modules out.
pub async fn scale(cp: &Client, base: &str, replicas: u32, module: Option<&Path>) -> Result<Scaled> {
    if replicas > crate::app::MAX_REPLICAS {
        bail!("INVALID_REQUEST: replicas must be 0 to {}, got {replicas}", crate::app::MAX_REPLICAS);
    }
    factum_proto::validate_id("instance_id", base).map_err(|e| anyhow!("{e}"))?;
    let mut existing: Vec<(u32, String)> = cp
        .list()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .filter_map(|m| replica(base, &m.instance_id).map(|k| (k, m.instance_id)))
        .collect();
    existing.sort();
    let Some((_, model)) = existing.first().cloned() else {
        bail!(
            "INSTANCE_NOT_FOUND: no replicas of {base:?} (ids {base}-0, {base}-1, …); start them with \
             `factum start MODULE --replicas N --id {base}`"
        );
    };
    let mut done = Scaled::default();
    let missing: Vec<String> =
        (0..replicas).filter(|k| !existing.iter().any(|(have, _)| have == k)).map(|k| format!("{base}-{k}")).collect();
    if !missing.is_empty() {
        let Some(module) = module else {
            bail!(
                "INVALID_REQUEST: starting {} more replicas of {base:?} needs the module they run: \
                 `factum scale {base} {replicas} MODULE`",
                missing.len()
            );
        };
        let template = copy_of(cp, &model, module).await?;
        for id in missing {
            let request = StartRequest { instance_id: Some(id.clone()), ..template.clone() };
            cp.start(request).await.map_err(|e| crate::client::start_failed(e, &done.started))?;
            done.started.push(id);
        }
    }
    for (_, id) in existing.iter().rev().filter(|(k, _)| *k >= replicas) {
        cp.stop(id).await.map_err(|e| anyhow!("{e}"))?;
        match cp.remove(id).await {
            // Gone meanwhile (removed by someone else, or by the retention pass): what was wanted.
            Err(e) if e.error_code == ErrorCode::InstanceNotFound => {}
            result => result.map_err(|e| anyhow!("{e}"))?,
        }
        done.removed.push(id.clone());
    }
    Ok(done)
}

/// A start request copying `model` (capabilities as granted now, restart policy, arguments, environment,
/// constraints) with the bytes of `module`, which must be the module `model` runs.
async fn copy_of(cp: &Client, model: &str, module: &Path) -> Result<StartRequest> {
    let details = cp.query(model).await.map_err(|e| anyhow!("{e}"))?;
    let module_bytes = crate::client::read_module(module)?;
    let hash = factum_proto::module_hash(&module_bytes);
    if hash != details.metadata.module_hash {
        bail!(
            "INVALID_REQUEST: {} is not the module {model} runs (its hash is {}, {model} runs {})",
            module.display(),
            hash,
            details.metadata.module_hash
        );
    }
    let capabilities = details
        .capabilities
        .into_iter()
        .map(|c| CapabilityGrant { capability_id: c.capability_id, permissions: c.permissions })
        .collect();
    Ok(StartRequest {
        instance_id: None,
        module_bytes,
        module_hash: None,
        capabilities,
        restart_policy: details.restart_policy,
        config: details.config,
        constraints: details.constraints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_base_dash_number_is_a_replica() {
        assert_eq!(replica("web", "web-0"), Some(0));
        assert_eq!(replica("web", "web-12"), Some(12));
        for other in ["web", "web-", "web-01", "web-x", "webs-1", "web-1-2", "api-1"] {
            assert_eq!(replica("web", other), None, "{other}");
        }
    }
}
