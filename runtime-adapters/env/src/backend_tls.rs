//! TLS to a backend server (etcd, Redis, NATS): which CA to trust for the server's certificate and,
//! when the server asks for one, the client certificate to show. Files, as operators keep them (`factum certs
//! host` makes a server certificate from the cluster's CA).

use std::path::PathBuf;

/// TLS settings for one backend; the default is plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTls {
    /// PEM file of the CA whose certificate the server must show; setting it requires TLS.
    pub ca: Option<PathBuf>,
    /// PEM files of the client certificate and its key, for a server that verifies its clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl BackendTls {
    /// From the three files an operator names (`--etcd-ca/-cert/-key` and the like): the client certificate
    /// counts only with its key (the command line requires both or neither).
    pub fn from_files(ca: &Option<PathBuf>, cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Self {
        BackendTls { ca: ca.clone(), client: cert.clone().zip(key.clone()) }
    }

    /// Reads the CA file, if any.
    pub fn read_ca(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.ca.as_deref().map(read).transpose()
    }

    /// Reads the client certificate and key files, if any.
    pub fn read_client(&self) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        match &self.client {
            Some((cert, key)) => Ok(Some((read(cert)?, read(key)?))),
            None => Ok(None),
        }
    }
}

/// Reads `path`, naming it in the error.
fn read(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
}

impl BackendTls {
    /// Whether any TLS is asked for.
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }
}
