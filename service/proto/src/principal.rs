//! Who is at the other end of a connection, and what each kind of peer may call. A connection learns its
//! peer's principal once, when it opens (see `factum_env::rpc::hello`); every call is then checked against it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;

/// The identity a connection runs as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Principal {
    /// A peer that named no identity: it may call nothing that needs one.
    Anonymous,
    /// The control plane: the only caller agents obey.
    ControlPlane,
    /// The node agent of this node id: it may report for that node only.
    Node(String),
    /// A person or program that runs the cluster: every client call.
    Operator(String),
    /// A read-only operator: list, query and the node list.
    Reader(String),
    /// A capability provider host of this id: it serves invocations agents forward to it (P17) and calls
    /// nothing.
    Provider(String),
}

impl Principal {
    /// Whether this principal may change the cluster (start, stop, remove, grant, revoke) and read KV stores.
    pub fn may_operate(&self) -> bool {
        matches!(self, Principal::Operator(_))
    }

    /// Whether this principal may list and query instances and nodes.
    pub fn may_read(&self) -> bool {
        matches!(self, Principal::Operator(_) | Principal::Reader(_))
    }

    /// Refuses `action` unless this principal may operate.
    pub fn require_operator(&self, action: &str) -> Result<(), ErrorResponse> {
        if self.may_operate() {
            return Ok(());
        }
        Err(self.refusal(action, "an operator identity"))
    }

    /// Refuses `action` unless this principal may read.
    pub fn require_reader(&self, action: &str) -> Result<(), ErrorResponse> {
        if self.may_read() {
            return Ok(());
        }
        Err(self.refusal(action, "an operator or reader identity"))
    }

    /// Refuses `action` unless this principal is the control plane.
    pub fn require_control_plane(&self, action: &str) -> Result<(), ErrorResponse> {
        if *self == Principal::ControlPlane {
            return Ok(());
        }
        Err(self.refusal(action, "the control plane's identity"))
    }

    /// Refuses `action` about node `node_id` unless this principal is that node.
    pub fn require_node(&self, action: &str, node_id: &str) -> Result<(), ErrorResponse> {
        if matches!(self, Principal::Node(me) if me == node_id) {
            return Ok(());
        }
        Err(self.refusal(action, &format!("the identity of node {node_id}")))
    }

    /// The DNS name a certificate for this principal carries as its subject alternative name (what
    /// `factum certs` writes): `control-plane.factum`, `ID.node.factum`, `NAME.operator.factum`,
    /// `NAME.reader.factum`, `ID.provider.factum`; none for anonymous, which no certificate names.
    pub fn dns_name(&self) -> Option<String> {
        match self {
            Principal::Anonymous => None,
            Principal::ControlPlane => Some("control-plane.factum".into()),
            Principal::Node(id) => Some(format!("{id}.node.factum")),
            Principal::Operator(name) => Some(format!("{name}.operator.factum")),
            Principal::Reader(name) => Some(format!("{name}.reader.factum")),
            Principal::Provider(id) => Some(format!("{id}.provider.factum")),
        }
    }

    fn refusal(&self, action: &str, needed: &str) -> ErrorResponse {
        ErrorResponse::permission_denied(format!("{action} needs {needed}; this connection is {self}"))
            .with_detail("principal", self.to_string())
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::ControlPlane => f.write_str("control-plane"),
            Principal::Node(id) => write!(f, "node/{id}"),
            Principal::Operator(name) => write!(f, "operator/{name}"),
            Principal::Reader(name) => write!(f, "reader/{name}"),
            Principal::Provider(id) => write!(f, "provider/{id}"),
        }
    }
}

impl std::str::FromStr for Principal {
    type Err = ErrorResponse;

    /// Parses the [`fmt::Display`] form: `control-plane`, `node/ID`, `operator/NAME`, `reader/NAME`,
    /// `provider/ID`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let principal = match s.split_once('/') {
            None if s == "control-plane" => Principal::ControlPlane,
            None if s == "anonymous" => Principal::Anonymous,
            Some(("node", id)) => Principal::Node(id.to_string()),
            Some(("operator", name)) => Principal::Operator(name.to_string()),
            Some(("reader", name)) => Principal::Reader(name.to_string()),
            Some(("provider", id)) => Principal::Provider(id.to_string()),
            _ => {
                return Err(ErrorResponse::invalid(format!(
                    "bad identity {s:?}: use control-plane, node/ID, operator/NAME, reader/NAME or provider/ID"
                )))
            }
        };
        if let Principal::Node(name) | Principal::Operator(name) | Principal::Reader(name) | Principal::Provider(name) =
            &principal
        {
            crate::validate_id("identity name", name)?;
        }
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn roles_allow_what_each_principal_needs_and_name_what_is_missing() {
        let alice = Principal::Operator("alice".into());
        let bob = Principal::Reader("bob".into());
        let n1 = Principal::Node("n1".into());
        assert!(alice.require_operator("start").is_ok() && alice.require_reader("list").is_ok());
        assert!(bob.require_reader("list").is_ok());
        let refused = bob.require_operator("start_instance").unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
        assert_eq!(refused.message, "start_instance needs an operator identity; this connection is reader/bob");
        assert!(n1.require_node("report_node", "n1").is_ok());
        let forged = n1.require_node("report_node", "n2").unwrap_err();
        assert!(forged.message.contains("the identity of node n2; this connection is node/n1"), "{forged}");
        assert!(n1.require_control_plane("start_instance_local").is_err());
        assert!(Principal::ControlPlane.require_control_plane("start_instance_local").is_ok());
        assert!(Principal::Anonymous.require_reader("list").is_err());
    }

    #[test]
    fn principals_parse_what_they_print() {
        for p in [
            Principal::Anonymous,
            Principal::ControlPlane,
            Principal::Node("n-2".into()),
            Principal::Operator("alice".into()),
            Principal::Reader("ci.bot".into()),
            Principal::Provider("kv-1".into()),
        ] {
            assert_eq!(p.to_string().parse::<Principal>().unwrap(), p);
        }
        for bad in ["", "node", "node/", "admin/x", "operator/a b", "control-plane/x"] {
            assert_eq!(bad.parse::<Principal>().unwrap_err().error_code, ErrorCode::InvalidRequest, "{bad}");
        }
    }
}
