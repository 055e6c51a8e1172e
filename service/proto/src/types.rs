//! Data model of the design (§Control Plane, §Node Agent, §Data Models), plus the few fields the wire needs
//! to order facts (`seq`) and to say who reported them (`node_id`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;
use crate::permissions::{parse_permissions, Permission};

/// Execution status of an instance: a fact reported by the agent that runs it, never a wish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// The agent accepted the instance and is compiling or instantiating it.
    Starting,
    /// The guest is executing.
    Running,
    /// The guest ended cleanly (exit code 0) or was stopped on request.
    Stopped,
    /// The guest trapped, exited non-zero or ran out of fuel, and its restart policy did not restart it.
    Crashed,
    /// The node that ran the instance stopped answering; the last fact from it no longer holds.
    /// Only the control plane reports this; an agent always knows its own instances.
    Unknown,
}

impl InstanceStatus {
    /// Whether no further transition can come from the agent without a new start.
    pub fn is_terminal(self) -> bool {
        matches!(self, InstanceStatus::Stopped | InstanceStatus::Crashed)
    }

    /// Lower-case name as used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Starting => "starting",
            InstanceStatus::Running => "running",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Crashed => "crashed",
            InstanceStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the control plane keeps per instance (design §InstanceMetadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    /// Unique id; the key of every map.
    pub instance_id: String,
    /// The node whose agent runs it.
    pub node_id: String,
    /// Hex SHA-256 of the module bytes.
    pub module_hash: String,
    /// Wall-clock milliseconds since the Unix epoch when the agent accepted it.
    pub created_at: u64,
    /// Last execution fact.
    pub status: InstanceStatus,
    /// How many times the restart policy restarted it.
    pub restarts: u32,
    /// Why it last crashed, if it did.
    pub last_error: Option<String>,
    /// Restarts in a row, each after a run shorter than [`STABLE_RUN`]: what the backoff doubles on. A stable
    /// run resets it; at [`CRASH_LOOP_STREAK`] or more the instance is in a crash loop.
    pub restart_streak: u32,
    /// While the instance waits out a restart backoff: that wait in milliseconds.
    pub backoff_ms: Option<u64>,
}

impl InstanceMetadata {
    /// Whether it keeps ending soon after each restart (Kubernetes' CrashLoopBackOff).
    pub fn in_crash_loop(&self) -> bool {
        self.restart_streak >= CRASH_LOOP_STREAK
    }
}

/// The kind of capability provider (design §CapabilityAssignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    /// Key-value store.
    Kv,
    /// Outbound HTTP.
    Http,
    /// Publish/subscribe messaging.
    Messaging,
}

impl ProviderType {
    /// Lower-case name as used in metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Kv => "kv",
            ProviderType::Http => "http",
            ProviderType::Messaging => "messaging",
        }
    }
}

impl fmt::Display for ProviderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a provider is: type, implementation, version, operations. Kept apart from instance metadata (P21);
/// it is the only provider data the registry (etcd) holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderMetadata {
    /// Which capability kind it serves.
    pub provider_type: ProviderType,
    /// Implementation name, e.g. `kv-memory`.
    pub name: String,
    /// Implementation version.
    pub version: String,
    /// Operation names it understands.
    pub operations: Vec<String>,
}

/// Longest accepted id (instance, capability, node).
pub const MAX_ID_LEN: usize = 128;

/// Checks an id: 1..=128 bytes of `[A-Za-z0-9._-]`, so ids are safe in logs, keys and file names.
pub fn validate_id(kind: &str, id: &str) -> Result<(), ErrorResponse> {
    let ok_chars = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars {
        return Err(ErrorResponse::invalid(format!(
            "bad {kind} {id:?}: use 1 to {MAX_ID_LEN} characters from [A-Za-z0-9._-]"
        ))
        .with_detail(kind, id));
    }
    Ok(())
}

/// A capability granted to one instance (design §CapabilityAssignment). The capability id names the store,
/// bus or client the instance reaches through the provider of `provider_type`; instances assigned the same
/// capability id share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityAssignment {
    /// The instance holding it.
    pub instance_id: String,
    /// Which store / bus / client.
    pub capability_id: String,
    /// Which provider serves it; derived from the permissions.
    pub provider_type: ProviderType,
    /// Permission strings, validated.
    pub permissions: Vec<String>,
}

impl CapabilityAssignment {
    /// Builds a validated assignment: ids well-formed, permissions parse and share one provider type.
    pub fn new(instance_id: &str, capability_id: &str, permissions: &[String]) -> Result<Self, ErrorResponse> {
        validate_id("instance_id", instance_id)?;
        validate_id("capability_id", capability_id)?;
        let (provider_type, parsed) = parse_permissions(permissions)?;
        Ok(Self {
            instance_id: instance_id.to_string(),
            capability_id: capability_id.to_string(),
            provider_type,
            permissions: parsed.iter().map(Permission::to_string).collect(),
        })
    }

    /// Re-validates an assignment that arrived over the wire and returns its parsed permissions.
    pub fn parsed_permissions(&self) -> Result<Vec<Permission>, ErrorResponse> {
        let (provider_type, parsed) = parse_permissions(&self.permissions)?;
        if provider_type != self.provider_type {
            return Err(ErrorResponse::invalid(format!(
                "capability {} claims provider {} but its permissions are for {provider_type}",
                self.capability_id, self.provider_type
            )));
        }
        Ok(parsed)
    }
}

/// When to restart an instance that ended (design §RestartPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyType {
    /// Never restart.
    #[default]
    Never,
    /// Restart after any end, clean or not.
    Always,
    /// Restart only after a crash.
    OnFailure,
}

impl FromStr for PolicyType {
    type Err = ErrorResponse;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(PolicyType::Never),
            "always" => Ok(PolicyType::Always),
            "on_failure" | "on-failure" => Ok(PolicyType::OnFailure),
            _ => Err(ErrorResponse::invalid(format!("bad restart policy {s:?}: expected never, always or on_failure"))),
        }
    }
}

impl std::fmt::Display for PolicyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyType::Never => "never",
            PolicyType::Always => "always",
            PolicyType::OnFailure => "on_failure",
        })
    }
}

/// Longest accepted base backoff.
pub const MAX_BACKOFF_SECONDS: u32 = 3600;
/// Largest accepted `max_retries`.
pub const MAX_RETRIES_LIMIT: u32 = 1_000_000;
/// The shortest wait before a restart, whatever the policy says: a guest that exits at once under `always`
/// with no backoff would otherwise restart in a hot loop (Docker's restart delay starts here too).
pub const MIN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// Doubling stops here (Kubernetes' CrashLoopBackOff cap), unless the policy's own base is longer.
pub const BACKOFF_CAP: std::time::Duration = std::time::Duration::from_secs(300);
/// A run at least this long resets the restart streak, so the next restart waits only the base again.
pub const STABLE_RUN: std::time::Duration = std::time::Duration::from_secs(10);
/// Restarts in a row after short runs from which `factum ps` calls it a crash loop.
pub const CRASH_LOOP_STREAK: u32 = 3;
/// Jitter added to a backoff, in thousandths of it: restarts of instances that failed together spread out.
const BACKOFF_JITTER_PER_MILLE: u64 = 100;

/// Restart policy of one instance (design §RestartPolicy). The wait before a restart doubles per restart in a
/// row after a short run (see [`RestartPolicy::backoff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When to restart.
    pub policy_type: PolicyType,
    /// Restarts allowed in total; `None` means no limit.
    pub max_retries: Option<u32>,
    /// Base delay before a restart; `None` means 0 (the [`MIN_BACKOFF`] still applies).
    pub backoff_seconds: Option<u32>,
}

/// For people: `always, at most 3 restarts, backoff 1 s doubling (at most 300 s)`.
impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.policy_type)?;
        if self.policy_type == PolicyType::Never {
            return Ok(());
        }
        match self.max_retries {
            Some(max) => write!(f, ", at most {max} restarts")?,
            None => f.write_str(", restarts without limit")?,
        }
        let base = match self.backoff_seconds.unwrap_or(0) {
            0 => format!("{} ms", MIN_BACKOFF.as_millis()),
            base => format!("{base} s"),
        };
        write!(f, ", backoff {base} doubling (at most {} s)", self.cap().as_secs())
    }
}

impl RestartPolicy {
    /// Rejects values outside the documented bounds.
    pub fn validate(&self) -> Result<(), ErrorResponse> {
        if self.backoff_seconds.is_some_and(|b| b > MAX_BACKOFF_SECONDS) {
            return Err(ErrorResponse::invalid(format!("backoff_seconds above {MAX_BACKOFF_SECONDS}")));
        }
        if self.max_retries.is_some_and(|r| r > MAX_RETRIES_LIMIT) {
            return Err(ErrorResponse::invalid(format!("max_retries above {MAX_RETRIES_LIMIT}")));
        }
        Ok(())
    }

    /// Whether an instance that ended (`crashed` or not) after `restarts` restarts is restarted again.
    pub fn should_restart(&self, crashed: bool, restarts: u32) -> bool {
        let wants = match self.policy_type {
            PolicyType::Never => false,
            PolicyType::Always => true,
            PolicyType::OnFailure => crashed,
        };
        wants && self.max_retries.is_none_or(|max| restarts < max)
    }

    fn base(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.backoff_seconds.unwrap_or(0).into()).max(MIN_BACKOFF)
    }

    fn cap(&self) -> std::time::Duration {
        self.base().max(BACKOFF_CAP)
    }

    /// Wait before a restart that is the `streak`-th in a row after a short run (1-based): the base (at least
    /// [`MIN_BACKOFF`]) doubled per earlier restart of the streak, at most [`BACKOFF_CAP`] or the base if longer,
    /// plus up to 10 % jitter drawn from `random` (the env's rng, so simulated runs stay reproducible).
    pub fn backoff(&self, streak: u32, random: u64) -> std::time::Duration {
        let doubled = self.base().saturating_mul(1 << streak.saturating_sub(1).min(20));
        let delay = doubled.min(self.cap());
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let jitter_ms = delay_ms.saturating_mul(random % (BACKOFF_JITTER_PER_MILLE + 1)) / 1000;
        delay.saturating_add(std::time::Duration::from_millis(jitter_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_read_as_sentences() {
        let policy =
            |policy_type, max_retries, backoff_seconds| RestartPolicy { policy_type, max_retries, backoff_seconds };
        assert_eq!(policy(PolicyType::Never, Some(3), Some(1)).to_string(), "never");
        assert_eq!(
            policy(PolicyType::Always, Some(3), Some(1)).to_string(),
            "always, at most 3 restarts, backoff 1 s doubling (at most 300 s)"
        );
        assert_eq!(
            policy(PolicyType::OnFailure, None, None).to_string(),
            "on_failure, restarts without limit, backoff 100 ms doubling (at most 300 s)"
        );
        assert_eq!(
            policy(PolicyType::Always, None, Some(600)).to_string(),
            "always, restarts without limit, backoff 600 s doubling (at most 600 s)"
        );
    }

    #[test]
    fn backoff_has_a_floor_doubles_to_a_cap_and_jitters_up_to_a_tenth() {
        use std::time::Duration;
        let policy =
            |backoff_seconds| RestartPolicy { policy_type: PolicyType::Always, max_retries: None, backoff_seconds };
        let none = policy(None);
        assert_eq!(none.backoff(1, 0), MIN_BACKOFF);
        assert_eq!(none.backoff(2, 0), Duration::from_millis(200));
        assert_eq!(none.backoff(4, 0), Duration::from_millis(800));
        assert_eq!(none.backoff(1_000, 0), BACKOFF_CAP);
        assert_eq!(policy(Some(0)).backoff(1, 0), MIN_BACKOFF);
        assert_eq!(none.backoff(1, 50), Duration::from_millis(105));
        let one = policy(Some(1));
        assert_eq!(one.backoff(3, 0), Duration::from_secs(4));
        // Jitter: `random % 101` thousandths, so at most +10 %, never below the unjittered wait.
        assert_eq!(one.backoff(3, 100), Duration::from_millis(4_400));
        assert_eq!(one.backoff(3, 101), Duration::from_secs(4));
        assert_eq!(one.backoff(3, u64::MAX).max(Duration::from_secs(4)), one.backoff(3, u64::MAX));
        assert!(one.backoff(3, u64::MAX) <= Duration::from_millis(4_400));
        // A base longer than the cap is the wait every time.
        let long = policy(Some(MAX_BACKOFF_SECONDS));
        assert_eq!(long.backoff(1, 0), long.backoff(9, 0));
        assert_eq!(long.backoff(9, 0), Duration::from_secs(MAX_BACKOFF_SECONDS.into()));
    }
}
