//! Grant seals for providers on other hosts (P17): what the control plane seals for a node, how long a seal
//! lasts, and the renewals it hands a node in answer to its reports. A grant the control plane no longer holds
//! (revoked, or its instance gone or moved) is not renewed, so its last seal expires at the provider host
//! within one TTL, whatever the node does with it.

use std::collections::BTreeMap;
use std::time::Duration;

use factum_proto::{CapabilityAssignment, GrantKey, GrantSeal};

/// Seals grants under the control plane's [`GrantKey`] for `ttl` from the moment of sealing.
#[derive(Debug, Clone)]
pub(crate) struct GrantSealer {
    key: GrantKey,
    ttl: Duration,
}

impl Default for GrantSealer {
    fn default() -> Self {
        GrantSealer::new(GrantKey::plaintext(), crate::DEFAULT_GRANT_TTL)
    }
}

impl GrantSealer {
    pub(crate) fn new(key: GrantKey, ttl: Duration) -> Self {
        GrantSealer { key, ttl }
    }

    /// The seal of `assignment` for its instance on `node_id`, made at wall-clock `now_ms`.
    pub(crate) fn seal(&self, assignment: &CapabilityAssignment, node_id: &str, now_ms: u64) -> GrantSeal {
        self.key.seal(assignment, node_id, self.expiry(now_ms)).seal
    }

    /// The seal of each of `capabilities` for `node_id`, by capability id (see
    /// [`factum_proto::StartInstanceRequest::grant_seals`]).
    pub(crate) fn seals<'a>(
        &self,
        node_id: &str,
        capabilities: impl IntoIterator<Item = &'a CapabilityAssignment>,
        now_ms: u64,
    ) -> BTreeMap<String, GrantSeal> {
        capabilities.into_iter().map(|a| (a.capability_id.clone(), self.seal(a, node_id, now_ms))).collect()
    }

    /// Fresh seals of `grants` (what the control plane holds for `node_id`'s instances) if the node's are due
    /// (`due_ms`, pushed half a TTL on when they are renewed), else none.
    pub(crate) fn renewal<'a>(
        &self,
        node_id: &str,
        grants: impl IntoIterator<Item = &'a CapabilityAssignment>,
        due_ms: &mut u64,
        now_ms: u64,
    ) -> Vec<(CapabilityAssignment, GrantSeal)> {
        if now_ms < *due_ms {
            return Vec::new();
        }
        *due_ms = now_ms.saturating_add(half(self.ttl));
        grants.into_iter().map(|a| (a.clone(), self.seal(a, node_id, now_ms))).collect()
    }

    fn expiry(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Half of `ttl`, in milliseconds: a node's seals are renewed when half their life is gone, so one lost or late
/// heartbeat never lets them lapse.
fn half(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis() / 2).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_node_gets_fresh_seals_once_half_their_life_is_gone() {
        let sealer = GrantSealer::new(GrantKey::plaintext(), Duration::from_secs(60));
        let grant = CapabilityAssignment::new("i1", "store", &["kv:read".into()]).unwrap();
        let mut due = 0;
        let first = sealer.renewal("n1", [&grant], &mut due, 1_000);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.expires_ms, 61_000);
        assert_eq!(due, 31_000);
        assert!(sealer.renewal("n1", [&grant], &mut due, 30_999).is_empty());
        let second = sealer.renewal("n1", [&grant], &mut due, 31_000);
        assert_eq!(second[0].1.expires_ms, 91_000);
        assert_eq!(second[0].1, sealer.seal(&grant, "n1", 31_000));
    }
}
