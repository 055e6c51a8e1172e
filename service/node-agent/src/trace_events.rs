//! The words of the events an agent records in its env trace about capabilities, so a simulator can keep its
//! own ledger of what each instance held at every instant and check every call against it (Property 4).
//!
//! Each event is one line of space-separated words, recorded under the agent's instance lock, so the trace
//! orders grants, revokes and call authorizations exactly as the agent applied them:
//!
//! | event | meaning |
//! | --- | --- |
//! | `boot` | a new agent process: it holds nothing |
//! | `grants <instance> [<cap>=<perm>,<perm> …]` | an instance was accepted with exactly these grants |
//! | `grant <instance> <cap>=<perm>,<perm>` | one grant added or replaced |
//! | `revoke <instance> <cap>` | one grant removed |
//! | `forget <instance>` | the instance and all it held are gone from this node |
//! | `auth <n> <instance> <cap> <operation> <target>` | call `n` was let through to a provider now |
//! | `call <n> <instance> <cap> <outcome>` | call `n` finished: `ok` or an error code |
//! | `deliver <instance> <cap> <topic>` | a message on `topic` was handed to the instance |
//!
//! `<target>` is what the permission depends on beyond the operation: the topic of `publish` and
//! `subscribe`, `-` otherwise.

/// A new agent process.
pub const BOOT: &str = "boot";
/// An instance accepted with its grants.
pub const GRANTS: &str = "grants";
/// One grant added or replaced.
pub const GRANT: &str = "grant";
/// One grant removed.
pub const REVOKE: &str = "revoke";
/// An instance removed.
pub const FORGET: &str = "forget";
/// A capability call let through.
pub const AUTH: &str = "auth";
/// A capability call's outcome.
pub const CALL: &str = "call";
/// A message delivered.
pub const DELIVER: &str = "deliver";
