//! Sealed grants (design Phase 3, P17): how a provider on another host checks a capability grant itself instead
//! of taking the calling agent's word for it. The control plane seals each grant it sends a node with a
//! [`GrantKey`] it shares only with provider hosts; the agent forwards the sealed grant with every remote
//! invocation, and the provider serves the call only if the seal covers that instance, capability, node and
//! those permissions. An agent can therefore neither widen a grant nor invent one, nor use one made for an
//! instance on another node.
//!
//! A seal proves that a grant was made, and lasts only until the expiry sealed with it (wall-clock time at the
//! control plane plus its grant TTL). A revoke takes effect at the calling agent, which stops forwarding the
//! grant on the instance's next call (P4), as for local providers; the expiry bounds what a seal is worth to an
//! agent that kept it anyway (a compromised or confused one): the control plane renews the seals of every
//! grant it holds in answer to a node's heartbeats ([`crate::NodeAck`]), so a grant it no longer holds stops
//! being renewed and the host refuses it once its expiry has passed. The price is that a node cut off from the
//! control plane for longer than the TTL loses its remote providers (local ones go on), so the TTL is long
//! beside a control plane's restart and beside clock skew between the control plane and provider hosts.

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{CapabilityAssignment, CapabilityInvocation, ErrorResponse, ProviderType};

/// A grant's seal: when it expires, and the leftmost 16 bytes of an HMAC-SHA-256 under the [`GrantKey`] over
/// the grant and that expiry. The default seal is expired and matches nothing: a grant without one is served
/// only by providers on the instance's own node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GrantSeal {
    /// Wall-clock time it expires at, in milliseconds since the Unix epoch, on the control plane's clock.
    pub expires_ms: u64,
    /// The MAC.
    pub tag: [u8; 16],
}

/// One capability grant of one instance on one node, as the control plane sealed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedGrant {
    /// The instance holding it.
    pub instance_id: String,
    /// Which store / bus / client.
    pub capability_id: String,
    /// The node the instance runs on: only that node's agent may use the grant.
    pub node_id: String,
    /// Which provider serves it.
    pub provider_type: ProviderType,
    /// Permission strings, as validated by [`CapabilityAssignment::new`].
    pub permissions: Vec<String>,
    /// The control plane's seal over all of the above.
    pub seal: GrantSeal,
}

/// The secret that seals grants, shared by the control plane and provider hosts and by no agent.
#[derive(Clone)]
pub struct GrantKey([u8; 32]);

impl GrantKey {
    /// A key of these bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        GrantKey(bytes)
    }

    /// The key derived from another secret (the control plane's placement key), so that a provider host given
    /// this key cannot seal anything else with it.
    pub fn derive(secret: &[u8; 32]) -> Self {
        let mut mac = hmac(secret);
        mac.update(b"factum grant key v1");
        GrantKey(mac.finalize().into_bytes().into())
    }

    /// The well-known key of a plaintext cluster and of the simulator: there, as for placement seals, a seal
    /// guards against a confused or stale agent, not against forgery.
    pub fn plaintext() -> Self {
        GrantKey(*b"factum plaintext grant key!!!!!!")
    }

    /// A key written as [`GrantKey::to_hex`] does (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|e| format!("not a grant key ({e})"))?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("a grant key has 32 bytes, not {}", b.len()))?;
        Ok(GrantKey(bytes))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The sealed form of `assignment` for its instance on `node_id`, valid until `expires_ms` (wall-clock
    /// milliseconds since the Unix epoch).
    pub fn seal(&self, assignment: &CapabilityAssignment, node_id: &str, expires_ms: u64) -> SealedGrant {
        let mut grant = SealedGrant {
            instance_id: assignment.instance_id.clone(),
            capability_id: assignment.capability_id.clone(),
            node_id: node_id.to_string(),
            provider_type: assignment.provider_type,
            permissions: assignment.permissions.clone(),
            seal: GrantSeal { expires_ms, tag: [0; 16] },
        };
        let tag = self.mac(&grant).finalize().into_bytes();
        grant.seal.tag.iter_mut().zip(tag).for_each(|(s, t)| *s = t);
        grant
    }

    /// Whether `grant` entitles node `caller` to run `invocation` at wall-clock time `now_ms`: the seal is this
    /// key's (compared in constant time), it has not expired, and the grant names the invocation's instance and
    /// capability and the calling node. The refusal is PERMISSION_DENIED and says which part did not match.
    pub fn check(
        &self,
        grant: &SealedGrant,
        invocation: &CapabilityInvocation,
        caller: &str,
        now_ms: u64,
    ) -> Result<(), ErrorResponse> {
        let mismatch = if grant.instance_id != invocation.instance_id || grant.capability_id != invocation.capability_id
        {
            Some(format!(
                "the grant is for {}/{}, the call for {}/{}",
                grant.instance_id, grant.capability_id, invocation.instance_id, invocation.capability_id
            ))
        } else if grant.node_id != caller {
            Some(format!("the grant is for an instance on node {}, the caller is node {caller}", grant.node_id))
        } else if self.mac(grant).verify_truncated_left(&grant.seal.tag).is_err() {
            Some("the grant's seal does not match it: the control plane did not make this grant".to_string())
        } else if now_ms >= grant.seal.expires_ms {
            Some(format!(
                "the grant's seal expired {:.1}s ago; the control plane renews seals only of grants it still holds, \
                 for nodes that report to it",
                (now_ms - grant.seal.expires_ms) as f64 / 1000.0
            ))
        } else {
            None
        };
        match mismatch {
            None => Ok(()),
            Some(why) => Err(ErrorResponse::permission_denied(format!(
                "capability {:?} of instance {}: {why}",
                invocation.capability_id, invocation.instance_id
            ))),
        }
    }

    /// The MAC over every field but the seal, each length-prefixed so no two grants share an input.
    fn mac(&self, grant: &SealedGrant) -> Hmac<Sha256> {
        let mut mac = hmac(&self.0);
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_le_bytes());
            mac.update(bytes);
        };
        field(b"grant");
        field(grant.instance_id.as_bytes());
        field(grant.capability_id.as_bytes());
        field(grant.node_id.as_bytes());
        field(grant.provider_type.to_string().as_bytes());
        field(&(grant.permissions.len() as u64).to_le_bytes());
        grant.permissions.iter().for_each(|p| field(p.as_bytes()));
        field(&grant.seal.expires_ms.to_le_bytes());
        mac
    }
}

/// An HMAC-SHA-256 under `key`. A key shorter than SHA-256's block is zero-padded to it (RFC 2104), so padding
/// it here changes nothing and needs no fallible constructor.
fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = Key::<Hmac<Sha256>>::default();
    block.iter_mut().zip(key).for_each(|(b, k)| *b = *k);
    <Hmac<Sha256> as KeyInit>::new(&block)
}

impl Default for GrantKey {
    fn default() -> Self {
        GrantKey::plaintext()
    }
}

impl std::fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantKey(..)") // never the secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    /// Some wall-clock instant, in milliseconds since the Unix epoch.
    const NOW: u64 = 1_800_000_000_000;

    fn call(instance: &str, capability: &str) -> CapabilityInvocation {
        CapabilityInvocation {
            instance_id: instance.into(),
            capability_id: capability.into(),
            operation: "get".into(),
            params: Vec::new(),
        }
    }

    fn assignment(permissions: &[&str]) -> CapabilityAssignment {
        let permissions: Vec<String> = permissions.iter().map(|p| p.to_string()).collect();
        CapabilityAssignment::new("i1", "store", &permissions).unwrap()
    }

    #[test]
    fn a_sealed_grant_serves_its_own_call_and_nothing_altered() {
        let key = GrantKey::derive(&[1; 32]);
        let grant = key.seal(&assignment(&["kv:read"]), "n1", NOW + 1);
        assert!(key.check(&grant, &call("i1", "store"), "n1", NOW).is_ok());

        let refused = |grant: &SealedGrant, call: &CapabilityInvocation, caller: &str| {
            let e = key.check(grant, call, caller, NOW).unwrap_err();
            assert_eq!(e.error_code, ErrorCode::PermissionDenied);
            e.message
        };
        let mut widened = grant.clone();
        widened.permissions.push("kv:write".into());
        assert!(refused(&widened, &call("i1", "store"), "n1").contains("seal does not match"));
        let mut moved = grant.clone();
        moved.node_id = "n2".into();
        assert!(refused(&moved, &call("i1", "store"), "n2").contains("seal does not match"));
        assert!(refused(&grant, &call("i1", "store"), "n2").contains("the caller is node n2"));
        assert!(refused(&grant, &call("i2", "store"), "n1").contains("the call for i2/store"));
        assert!(refused(&grant, &call("i1", "other"), "n1").contains("the call for i1/other"));
        // Another key (another cluster, or a key the agent made up) seals nothing this one accepts.
        let forged = GrantKey::derive(&[2; 32]).seal(&assignment(&["kv:read", "kv:write"]), "n1", NOW + 1);
        assert!(refused(&forged, &call("i1", "store"), "n1").contains("seal does not match"));
        // A later expiry is a new seal: an agent cannot extend one.
        let mut extended = grant.clone();
        extended.seal.expires_ms += 60_000;
        assert!(refused(&extended, &call("i1", "store"), "n1").contains("seal does not match"));
    }

    #[test]
    fn a_seal_is_refused_from_its_expiry_on() {
        let key = GrantKey::derive(&[1; 32]);
        let grant = key.seal(&assignment(&["kv:read"]), "n1", NOW);
        assert!(key.check(&grant, &call("i1", "store"), "n1", NOW - 1).is_ok());
        for now in [NOW, NOW + 2_500] {
            let e = key.check(&grant, &call("i1", "store"), "n1", now).unwrap_err();
            assert_eq!(e.error_code, ErrorCode::PermissionDenied);
            assert!(e.message.contains("expired"), "{}", e.message);
        }
        assert!(key.check(&grant, &call("i1", "store"), "n1", NOW + 2_500).unwrap_err().message.contains("2.5s ago"));
        // The default seal (a grant the control plane never sealed) is expired and matches nothing.
        let mut unsealed = grant.clone();
        unsealed.seal = GrantSeal::default();
        assert!(key.check(&unsealed, &call("i1", "store"), "n1", NOW).is_err());
    }

    #[test]
    fn a_key_reads_back_what_it_writes() {
        let key = GrantKey::derive(&[3; 32]);
        let read = GrantKey::from_hex(&format!("{}\n", key.to_hex())).unwrap();
        assert_eq!(read.0, key.0);
        assert!(GrantKey::from_hex("abcd").unwrap_err().contains("32 bytes, not 2"));
        assert!(GrantKey::from_hex("xyz").unwrap_err().contains("not a grant key"));
    }

    #[test]
    fn field_boundaries_are_part_of_the_seal() {
        let key = GrantKey::plaintext();
        let a = key.seal(&CapabilityAssignment::new("ab", "c", &["kv:read".into()]).unwrap(), "n1", NOW + 1);
        let mut b = a.clone();
        (b.instance_id, b.capability_id) = ("a".into(), "bc".into());
        assert!(key.check(&b, &call("a", "bc"), "n1", NOW).is_err());
    }
}
