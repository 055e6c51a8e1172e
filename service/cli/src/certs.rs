//! `factum certs`: a cluster CA and certificates for its components and operators (rcgen), written as PEM files
//! into one directory under the names `--tls DIR` reads (`factum_env::rpc::tls::file_names`). A certificate
//! names its principal as its one DNS subject alternative name (`Principal::dns_name`), which is what a peer
//! checks.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use factum_control_plane::PlacementKey;
use factum_env::rpc::tls::{file_names, CA_FILE};
use factum_env::Env;
use factum_proto::{GrantKey, Principal};
use rand_core::TryRngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The CA's private key, beside `ca.pem`: whoever holds it can mint any identity, so keep it off the nodes.
pub const CA_KEY_FILE: &str = "ca.key";

/// The control plane's placement key (`factum_control_plane::PlacementKey`), beside its certificate. Written
/// once, with the control plane's first certificate, and never replaced: a new key would make a restarted
/// control plane refuse the facts of every placement the old one sealed.
pub const PLACEMENT_KEY_FILE: &str = "placement.key";

/// The key provider hosts check grants with (`factum_proto::GrantKey`), derived from the placement key, so a
/// provider host given it can check grants but not seal placements. Written with a provider's certificate.
pub const GRANT_KEY_FILE: &str = "grant.key";

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a component's or operator's certificate is valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// What `factum certs init` issues beside the CA: what `factum up --tls DIR` and the CLI's default identity use.
pub fn initial_identities() -> Vec<Principal> {
    vec![Principal::ControlPlane, Principal::Node("node-1".into()), Principal::Operator("local".into())]
}

/// Creates the CA in `dir` (refusing to replace one) and issues `identities`.
pub fn init(dir: &Path, identities: &[Principal]) -> Result<Vec<String>> {
    if dir.join(CA_FILE).exists() {
        bail!("{} already holds a CA; issue more certificates with `factum certs issue`", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = ca_params();
    (params.not_before, params.not_after) = validity(CA_VALIDITY)?;
    let cert = params.self_signed(&key).context("cannot sign the CA certificate")?;
    write(dir, CA_KEY_FILE, &key.serialize_pem(), true)?;
    write(dir, CA_FILE, &cert.pem(), false)?;
    let mut written = vec![CA_FILE.to_string(), CA_KEY_FILE.to_string()];
    written.extend(issue(dir, identities)?);
    Ok(written)
}

/// Issues a certificate and key for each of `identities`, signed by the CA in `dir`; returns the files written.
pub fn issue(dir: &Path, identities: &[Principal]) -> Result<Vec<String>> {
    let issuer = load_ca(dir)?;
    let mut written = Vec::new();
    for principal in identities {
        let Some(name) = principal.dns_name() else { bail!("{principal} cannot hold a certificate") };
        let (cert_file, key_file) = file_names(principal);
        leaf(dir, &issuer, &principal.to_string(), &[name], (&cert_file, &key_file))?;
        written.extend([cert_file, key_file]);
        if *principal == Principal::ControlPlane && !dir.join(PLACEMENT_KEY_FILE).exists() {
            let mut key = [0; PlacementKey::LEN];
            rand_core::OsRng.try_fill_bytes(&mut key).context("the OS gave no random bytes for the placement key")?;
            write(dir, PLACEMENT_KEY_FILE, &(PlacementKey::new(key).to_hex() + "\n"), true)?;
            written.push(PLACEMENT_KEY_FILE.to_string());
        }
        if matches!(principal, Principal::Provider(_)) && !dir.join(GRANT_KEY_FILE).exists() {
            let key = placement_key(dir).context("a provider checks grants with a key derived from it")?.grant_key();
            write(dir, GRANT_KEY_FILE, &(key.to_hex() + "\n"), true)?;
            written.push(GRANT_KEY_FILE.to_string());
        }
    }
    Ok(written)
}

/// The provider hosts' grant key in `dir`.
pub fn grant_key(dir: &Path) -> Result<GrantKey> {
    let path = dir.join(GRANT_KEY_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: a provider host checks grants with it; `factum certs issue provider/ID --dir {}` \
             writes one",
            path.display(),
            dir.display()
        )
    })?;
    GrantKey::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The control plane's placement key in `dir`.
pub fn placement_key(dir: &Path) -> Result<PlacementKey> {
    let path = dir.join(PLACEMENT_KEY_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: the control plane seals placements with it; `factum certs issue control-plane --dir {}` \
             writes one",
            path.display(),
            dir.display()
        )
    })?;
    PlacementKey::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Issues a certificate for a backend server (etcd, Redis, NATS) called `name`, valid for `names` (host names
/// or IP addresses, as its clients dial it), signed by the CA in `dir`: `host-NAME.pem` and `host-NAME.key`.
pub fn issue_host(dir: &Path, name: &str, names: &[String]) -> Result<Vec<String>> {
    factum_proto::validate_id("host name", name).map_err(|e| anyhow::anyhow!(e.message))?;
    if names.is_empty() {
        bail!("a host certificate needs at least one name or address its clients dial");
    }
    let issuer = load_ca(dir)?;
    let (cert_file, key_file) = (format!("host-{name}.pem"), format!("host-{name}.key"));
    leaf(dir, &issuer, name, names, (&cert_file, &key_file))?;
    Ok(vec![cert_file, key_file])
}

/// The CA in `dir`, ready to sign.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let ca_key = std::fs::read_to_string(dir.join(CA_KEY_FILE))
        .with_context(|| format!("no CA key in {} (run `factum certs init` first)", dir.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).context("the CA key is not a PEM private key")?;
    // The CA is known by its name and key, so the parameters it was made from sign as it.
    Ok(Issuer::new(ca_params(), ca_key))
}

/// Writes a certificate for `names` (DNS names or IP addresses) and its key as `files`.
fn leaf(dir: &Path, issuer: &Issuer<'_, KeyPair>, common: &str, names: &[String], files: (&str, &str)) -> Result<()> {
    let mut params =
        CertificateParams::new(names.to_vec()).with_context(|| format!("{names:?} do not make certificate names"))?;
    params.distinguished_name.push(DnType::CommonName, common);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every component is both: it serves calls and makes them.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    (params.not_before, params.not_after) = validity(LEAF_VALIDITY)?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let cert = params.signed_by(&key, issuer).with_context(|| format!("cannot sign {common}'s certificate"))?;
    write(dir, files.1, &key.serialize_pem(), true)?;
    write(dir, files.0, &cert.pem(), false)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "factum cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// From an hour ago (clocks differ a little between machines) until `length` from now.
fn validity(length: Duration) -> Result<(time::OffsetDateTime, time::OffsetDateTime)> {
    let now = time::OffsetDateTime::from(Env::tokio().clock.wall());
    let from = now.checked_sub(time::Duration::HOUR).context("the clock is out of range")?;
    let until = now.checked_add(time::Duration::try_from(length)?).context("the clock is out of range")?;
    Ok((from, until))
}

/// Writes `name` in `dir`; a key only its owner may read.
fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    let mut file = options.open(&path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}
