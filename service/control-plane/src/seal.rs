//! Placement seals: the control plane accepts facts only about placements it issued. Each start it sends
//! carries an HMAC over (instance id, node id, epoch) under the control plane's [`PlacementKey`]; the agent sends
//! it back with every fact of that placement, and a fact whose seal does not match is refused and audited. A
//! node with a valid certificate can then report only for itself, only about placements made on it: it cannot
//! claim an epoch no one issued (an epoch of `u64::MAX` would freeze the instance's facts for good) or take over
//! another node's instance, not even while a restarted control plane rebuilds its maps from what nodes say.

use factum_proto::PlacementSeal;
use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The control plane's secret for sealing placements. It must survive control-plane restarts (a rebuilt control
/// plane checks seals issued by its predecessor), so a TLS cluster keeps it in a file beside the control plane's
/// certificate (`factum certs` writes it).
#[derive(Clone)]
pub struct PlacementKey([u8; 32]);

impl PlacementKey {
    /// Length of a key, in bytes.
    pub const LEN: usize = 32;

    /// A key of these bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        PlacementKey(bytes)
    }

    /// A key written as [`PlacementKey::to_hex`] does (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|e| format!("not a placement key ({e})"))?;
        let bytes: [u8; Self::LEN] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("a placement key has {} bytes, not {}", Self::LEN, b.len()))?;
        Ok(PlacementKey(bytes))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The well-known key of a plaintext cluster, and of the simulator. Public on purpose: over plaintext any
    /// caller may claim any identity, so a seal there guards against mistakes (a stale or confused node), not
    /// against forgery; with `--tls` the control plane uses a secret key.
    pub fn plaintext() -> Self {
        PlacementKey(*b"factum plaintext placement key!!")
    }

    /// The key that seals grants for provider hosts, derived from this one: a provider host given it cannot seal
    /// placements.
    pub fn grant_key(&self) -> factum_proto::GrantKey {
        factum_proto::GrantKey::derive(&self.0)
    }

    /// The seal of the placement of `instance_id` on `node_id` under `epoch`.
    pub fn seal(&self, instance_id: &str, node_id: &str, epoch: u64) -> PlacementSeal {
        let tag = self.mac(instance_id, node_id, epoch).finalize().into_bytes();
        let mut seal = [0; 16];
        seal.iter_mut().zip(tag).for_each(|(s, t)| *s = t); // the leftmost 16 of 32 bytes
        PlacementSeal(seal)
    }

    /// Whether `seal` is this key's seal of that placement (compared in constant time).
    pub fn verifies(&self, instance_id: &str, node_id: &str, epoch: u64, seal: PlacementSeal) -> bool {
        self.mac(instance_id, node_id, epoch).verify_truncated_left(&seal.0).is_ok()
    }

    fn mac(&self, instance_id: &str, node_id: &str, epoch: u64) -> Hmac<Sha256> {
        // A key shorter than SHA-256's block is zero-padded to it (RFC 2104), so padding it here changes nothing
        // and needs no fallible constructor.
        let mut block = Key::<Hmac<Sha256>>::default();
        block.iter_mut().zip(self.0).for_each(|(b, k)| *b = k);
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&block);
        // Length-prefixed, so no two placements make the same input.
        for part in [instance_id.as_bytes(), node_id.as_bytes()] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.update(&epoch.to_le_bytes());
        mac
    }
}

impl Default for PlacementKey {
    fn default() -> Self {
        PlacementKey::plaintext()
    }
}

impl std::fmt::Debug for PlacementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlacementKey(..)") // never print the secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_verifies_only_for_its_own_placement_and_key() {
        let key = PlacementKey::new([7; 32]);
        let seal = key.seal("i-1", "node-1", 3);
        assert!(key.verifies("i-1", "node-1", 3, seal));
        assert!(!key.verifies("i-1", "node-1", 4, seal), "another epoch");
        assert!(!key.verifies("i-1", "node-2", 3, seal), "another node");
        assert!(!key.verifies("i-2", "node-1", 3, seal), "another instance");
        assert!(!key.verifies("i-1", "node-1", u64::MAX, PlacementSeal::default()), "no seal");
        assert!(!PlacementKey::plaintext().verifies("i-1", "node-1", 3, seal), "another key");
        // Where one part ends and the next begins is part of what is sealed.
        assert_ne!(key.seal("i-1n", "ode-1", 3), seal);
    }

    #[test]
    fn a_key_reads_back_from_hex_and_nothing_else_does() {
        let key = PlacementKey::new([0xA5; 32]);
        let read = PlacementKey::from_hex(&format!("{}\n", key.to_hex())).unwrap();
        assert_eq!(read.seal("i", "n", 1), key.seal("i", "n", 1));
        assert!(PlacementKey::from_hex("zz").unwrap_err().contains("not a placement key"));
        assert!(PlacementKey::from_hex("abcd").unwrap_err().contains("has 32 bytes, not 2"));
    }
}
