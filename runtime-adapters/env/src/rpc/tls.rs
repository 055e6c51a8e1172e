//! Mutual TLS (rustls) under the hello: both ends show a certificate of the cluster's CA, a client checks that
//! the server's certificate names the principal it meant to call, and a server takes the principal a client
//! claims in its hello only if the client's certificate names it (see [`Principal::dns_name`]). Production only:
//! the simulator's network carries plaintext, and its identities are taken as claimed.

use std::io;
use std::path::Path;
use std::sync::Arc;

use factum_proto::Principal;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::BoxStream;

/// This process's side of mutual TLS: the cluster CA it trusts and the certificate it shows.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// The PEM files `factum certs` writes for `principal` in its directory: certificate and key.
pub fn file_names(principal: &Principal) -> (String, String) {
    let stem = principal.to_string().replace('/', "-");
    (format!("{stem}.pem"), format!("{stem}.key"))
}

/// The CA certificate's file name in a certificate directory.
pub const CA_FILE: &str = "ca.pem";

impl Tls {
    /// From a directory `factum certs` wrote: `ca.pem` and `principal`'s certificate and key.
    pub fn from_dir(dir: &Path, principal: &Principal) -> io::Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
        };
        let (cert, key) = file_names(principal);
        Self::from_pem(&read(CA_FILE)?, &read(&cert)?, &read(&key)?)
            .map_err(|e| io::Error::new(e.kind(), format!("the certificates of {principal} in {}: {e}", dir.display())))
    }

    /// From PEM: the CA certificate, this process's certificate (chain) and its private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> io::Result<Self> {
        let invalid =
            |what: &str, e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca) {
            roots
                .add(ca.map_err(|e| invalid("the CA certificate", &e))?)
                .map_err(|e| invalid("the CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(invalid("the CA certificate", &"no certificate in the file"));
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("the certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid("the private key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| invalid("the CA certificate", &e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid("the certificate and key", &e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("the certificate and key", &e))?;
        Ok(Tls { connector: TlsConnector::from(Arc::new(client)), acceptor: TlsAcceptor::from(Arc::new(server)) })
    }

    /// The client's handshake: the server must show a certificate of the CA that names `server`.
    pub(crate) async fn connect(&self, stream: BoxStream, server: &Principal) -> io::Result<BoxStream> {
        let name = server
            .dns_name()
            .and_then(|n| ServerName::try_from(n).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{server} has no certificate name")))?;
        let stream = self.connector.connect(name, stream).await.map_err(|e| tls_error("the TLS handshake", e))?;
        Ok(Box::pin(stream))
    }

    /// The server's handshake: the client must show a certificate of the CA, which is returned.
    pub(crate) async fn accept(&self, stream: BoxStream) -> io::Result<(BoxStream, CertificateDer<'static>)> {
        let stream = self.acceptor.accept(stream).await.map_err(|e| tls_error("the TLS handshake", e))?;
        let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
        let cert = cert.ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"))?;
        Ok((Box::pin(stream), cert))
    }
}

fn tls_error(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} failed: {e}"))
}

/// Whether `cert` (already verified against the CA) names `principal`.
pub fn names(cert: &CertificateDer<'_>, principal: &Principal) -> bool {
    let Some(name) = principal.dns_name() else { return false };
    let (Ok(cert), Ok(name)) = (webpki::EndEntityCert::try_from(cert), ServerName::try_from(name)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}
