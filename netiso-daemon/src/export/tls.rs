//! TLS for the API listener: a certificate and key from files (reloaded when they change), or a
//! certificate generated at start (a private CA and a server certificate it signs; the CA is
//! written next to the evidence store for clients to trust, and its fingerprint is logged).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = any_supported_type(&key).context("unsupported private key type")?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading private key {}", key.display()))?;
    certified(chain, key)
}

/// SHA-256 of a certificate, as `AB:CD:...`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A CA and a server certificate for `names` signed by it: (CA PEM, server certified key).
pub fn generate(names: &[String]) -> anyhow::Result<(String, Arc<CertifiedKey>, String)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "netiso API CA");
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "netiso API");
    let key = rcgen::KeyPair::generate()?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    let fp = fingerprint(ca.der());
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((ca.pem(), certified(chain, key)?, fp))
}

/// Where the certificate comes from.
pub enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generate one for these names; write the CA to this file.
    Generated {
        names: Vec<String>,
        ca_out: PathBuf,
    },
}

/// The server configuration (for files, with a task that reloads them when they change) and, for a
/// generated certificate, its CA (PEM).
pub fn server_config(source: Source) -> anyhow::Result<(Arc<rustls::ServerConfig>, Option<String>)> {
    let (resolver, generated_ca) = match source {
        Source::Files { cert, key } => {
            let current = Arc::new(Current(RwLock::new(load(&cert, &key)?)));
            tracing::info!(cert = %cert.display(), "API TLS certificate loaded");
            let watched = current.clone();
            tokio::spawn(async move {
                let stamp =
                    |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let mut seen = (stamp(&cert), stamp(&key));
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let now = (stamp(&cert), stamp(&key));
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match load(&cert, &key) {
                        Ok(k) => {
                            *watched.0.write().expect("certificate lock") = k;
                            tracing::info!(cert = %cert.display(), "API TLS certificate reloaded");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "API TLS certificate changed but cannot be loaded; keeping the previous one")
                        }
                    }
                }
            });
            (current, None)
        }
        Source::Generated { names, ca_out } => {
            let (ca_pem, key, fp) = generate(&names)?;
            if let Some(dir) = ca_out.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&ca_out, &ca_pem).with_context(|| format!("writing {}", ca_out.display()))?;
            tracing::warn!(
                ca = %ca_out.display(),
                sha256_fingerprint = %fp,
                names = ?names,
                "no --tls-cert given: generated a certificate for the API; clients trust it with --ca-file"
            );
            (Arc::new(Current(RwLock::new(key))), Some(ca_pem))
        }
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok((Arc::new(config), generated_ca))
}
