//! Talking to netiso daemons: directly by URL, or found through the Kubernetes API (`--kube`):
//! each daemon at its node's address over TLS, verified against the CA it published in the
//! `netiso-api-ca` ConfigMap, with the caller's own credentials; daemons that publish none (no
//! `--api-auth`) through the API server's pod proxy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::export::trust;

/// Where `observe` and `evidence` ask.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// A netiso daemon's API (repeatable; results are merged and ordered by time).
    #[arg(long = "server", value_name = "URL", default_value = "http://127.0.0.1:9963")]
    pub servers: Vec<String>,
    /// Ask every netiso daemon of the cluster: found through the Kubernetes API, each reached at
    /// its node's address and verified against the CA it published (ConfigMap netiso-api-ca),
    /// with the kubeconfig's credentials; daemons without authentication through the pod proxy.
    #[arg(long, conflicts_with = "servers")]
    pub kube: bool,
    /// Namespace of the netiso DaemonSet (with --kube).
    #[arg(long, default_value = "netiso")]
    pub kube_namespace: String,
    /// Label selector of the netiso pods (with --kube).
    #[arg(long, default_value = "app.kubernetes.io/name=netiso")]
    pub kube_selector: String,
    /// Port of the netiso API on its nodes (with --kube).
    #[arg(long, default_value_t = 9963)]
    pub kube_port: u16,
    /// Bearer token for an API with Kubernetes authentication (default: the kubeconfig's user
    /// token, then the in-cluster service account's).
    #[arg(long, env = "NETISO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the API's certificate, e.g. the api-ca.pem a daemon
    /// generated (with --kube: for daemons that publish no CA of their own).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Do not verify the API's certificate (the connection is encrypted but not authenticated).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
}

/// How to reach a daemon over HTTPS: whom to trust, and the token to present.
#[derive(Clone)]
pub struct Credentials {
    pub tls: Arc<rustls::ClientConfig>,
    pub token: Option<String>,
}

/// One daemon to ask: one the CLI asks itself, a pod reached through the API server, or a netiso
/// pod that cannot be asked safely yet (and why).
#[derive(Clone)]
pub enum Endpoint {
    Direct(Direct),
    Pod { client: kube::Client, namespace: String, name: String, port: u16 },
    Unverifiable { pod: String, reason: String },
}

/// A daemon the CLI asks itself: at a base URL, or a netiso pod's daemon at its node's address,
/// with a client that carries the kubeconfig's credentials and trusts only the CA that node
/// published.
#[derive(Clone)]
pub enum Direct {
    Url(String, Arc<Credentials>),
    Daemon { client: kube::Client, pod: String, url: String },
}

impl Endpoint {
    pub fn name(&self) -> String {
        match self {
            Endpoint::Direct(Direct::Url(u, _)) => u.clone(),
            Endpoint::Direct(Direct::Daemon { pod, .. }) => pod.clone(),
            Endpoint::Pod { namespace, name, .. } => format!("{namespace}/{name}"),
            Endpoint::Unverifiable { pod, .. } => pod.clone(),
        }
    }
}

/// What `--kube` learned from the API server: its configuration and client, and the CAs to
/// verify daemons with.
struct Cluster {
    config: kube::Config,
    client: kube::Client,
    /// Node name → the CA (PEM) its daemon published.
    published: BTreeMap<String, String>,
    ca_file: Option<Vec<u8>>,
}

impl Target {
    pub async fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        if !self.kube {
            let credentials = Arc::new(self.credentials()?);
            return Ok(self
                .servers
                .iter()
                .map(|s| Endpoint::Direct(Direct::Url(s.trim_end_matches('/').to_owned(), credentials.clone())))
                .collect());
        }
        let config =
            kube::Config::infer().await.context("reading the Kubernetes configuration (kubeconfig or in-cluster)")?;
        let client = kube::Client::try_from(config.clone()).context("connecting to the Kubernetes API")?;
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &self.kube_namespace);
        let list =
            pods.list(&kube::api::ListParams::default().labels(&self.kube_selector)).await.with_context(|| {
                format!("listing netiso pods ({}) in namespace {}", self.kube_selector, self.kube_namespace)
            })?;
        if list.items.is_empty() {
            bail!("no netiso pods match {} in namespace {}", self.kube_selector, self.kube_namespace);
        }
        let published = self.published_cas(&client).await?;
        let ca_file = self
            .ca_file
            .as_ref()
            .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
            .transpose()?;
        if self.insecure_skip_tls_verify {
            eprintln!("netiso: warning: --insecure-skip-tls-verify: the daemons' certificates are not checked");
        }
        let cluster = Cluster { config, client, published, ca_file };
        list.items
            .into_iter()
            .filter(|pod| pod.metadata.name.is_some())
            .map(|pod| self.pod_endpoint(pod, &cluster))
            .collect()
    }

    /// How to ask a netiso pod: directly at its node's address when a CA verifies it (its node's
    /// published one, else --ca-file); through the pod proxy when no daemon publishes a CA (none
    /// authenticates its callers); not at all when the others publish one and its node has not.
    fn pod_endpoint(&self, pod: Pod, cluster: &Cluster) -> anyhow::Result<Endpoint> {
        let name = pod.metadata.name.unwrap_or_default();
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let ca = cluster.published.get(&node).map(String::as_bytes).or(cluster.ca_file.as_deref());
        let qualified = format!("{}/{name}", self.kube_namespace);
        match (ca, status.host_ip.or(status.pod_ip)) {
            (Some(ca), Some(address)) => {
                let url = match address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("https://[{v6}]:{}", self.kube_port),
                    _ => format!("https://{address}:{}", self.kube_port),
                };
                let client =
                    self.daemon_client(&cluster.config, &url, ca).with_context(|| format!("{qualified} at {url}"))?;
                Ok(Endpoint::Direct(Direct::Daemon { client, pod: qualified, url }))
            }
            (Some(_), None) => Ok(Endpoint::Unverifiable {
                pod: qualified,
                reason: "has no node address yet (not scheduled or not started)".into(),
            }),
            (None, _) if !cluster.published.is_empty() => Ok(Endpoint::Unverifiable {
                pod: qualified,
                reason: format!(
                    "node `{node}` has published no CA in ConfigMap {}/{} yet (its daemon does once it has started: see its log), so it cannot be verified; or pass the node's /var/lib/netiso/api-ca.pem with --ca-file",
                    self.kube_namespace,
                    trust::CONFIGMAP
                ),
            }),
            (None, _) => Ok(Endpoint::Pod {
                client: cluster.client.clone(),
                namespace: self.kube_namespace.clone(),
                name,
                port: self.kube_port,
            }),
        }
    }

    /// The CAs the daemons published, by node name; none when the ConfigMap does not exist (no
    /// daemon authenticates its callers).
    async fn published_cas(&self, client: &kube::Client) -> anyhow::Result<BTreeMap<String, String>> {
        let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), &self.kube_namespace);
        let where_ = format!("ConfigMap {}/{}", self.kube_namespace, trust::CONFIGMAP);
        match configmaps.get_opt(trust::CONFIGMAP).await {
            Ok(found) => Ok(found.and_then(|c| c.data).unwrap_or_default()),
            Err(kube::Error::Api(status)) if status.code == 403 => bail!(
                "may not read {where_}, where the daemons publish the CA that verifies them ({}): the netiso-responder Role grants get on it",
                status.message
            ),
            Err(e) => Err(e).with_context(|| format!("reading {where_}")),
        }
    }

    /// A client for one daemon: the kubeconfig's credentials (exec plugins and token files
    /// included, or --token), trusting only `ca`.
    fn daemon_client(&self, config: &kube::Config, url: &str, ca: &[u8]) -> anyhow::Result<kube::Client> {
        let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(ca)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .context("the CA is not PEM")?;
        if roots.is_empty() {
            bail!("the CA holds no certificate");
        }
        let mut config = config.clone();
        config.cluster_url = url.parse().with_context(|| format!("`{url}` is not a URL"))?;
        config.root_cert = Some(roots);
        config.root_cert_file = None;
        config.tls_server_name = None;
        config.proxy_url = None;
        config.default_retry = false;
        config.accept_invalid_certs = self.insecure_skip_tls_verify;
        if let Some(token) = &self.token {
            config.auth_info = kube::config::AuthInfo { token: Some(token.clone().into()), ..Default::default() };
        }
        kube::Client::try_from(config).context("creating a client for the daemon")
    }
}

impl Target {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let tls = if self.insecure_skip_tls_verify {
            eprintln!("netiso: warning: --insecure-skip-tls-verify: the server's certificate is not checked");
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &self.ca_file {
                Some(path) => {
                    use rustls::pki_types::pem::PemObject;
                    for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
                        .with_context(|| format!("reading {}", path.display()))?
                    {
                        roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
                    }
                }
                None => {
                    for cert in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(cert);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Credentials { tls: Arc::new(tls), token: self.token.clone().or_else(ambient_token) })
    }
}

/// The token of the kubeconfig's current user, or of the in-cluster service account.
fn ambient_token() -> Option<String> {
    use secrecy::ExposeSecret;
    if let Ok(config) = kube::config::Kubeconfig::read() {
        let context = config.current_context.as_ref().and_then(|c| config.contexts.iter().find(|n| &n.name == c));
        let user = context.and_then(|c| c.context.as_ref()).and_then(|c| c.user.as_ref());
        let auth =
            user.and_then(|u| config.auth_infos.iter().find(|a| &a.name == u)).and_then(|a| a.auth_info.as_ref());
        if let Some(auth) = auth {
            if let Some(token) = &auth.token {
                return Some(token.expose_secret().to_owned());
            }
            if let Some(file) = &auth.token_file {
                return std::fs::read_to_string(file).ok().map(|t| t.trim().to_owned());
            }
        }
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/token").ok().map(|t| t.trim().to_owned())
}

/// Accepts any certificate but still checks the handshake signatures (for
/// --insecure-skip-tls-verify).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Empty<Bytes>>;

fn http_client(credentials: &Credentials) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*credentials.tls).clone())
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A short, printable excerpt of an answer's body, for errors that say what a server answered.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Percent-encodes a query value or path segment.
pub fn encode(value: &str) -> String {
    // RFC 3986's unreserved characters, and `/` (ours: namespace/name) stay as they are.
    const KEPT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');
    utf8_percent_encode(value, KEPT).to_string()
}

/// A GET through the API server's pod proxy.
fn proxy_request(
    namespace: &str,
    name: &str,
    port: u16,
    path_and_query: &str,
) -> anyhow::Result<http::Request<Vec<u8>>> {
    http::Request::get(format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path_and_query}"))
        .body(Vec::new())
        .with_context(|| format!("`{path_and_query}` cannot be sent to {namespace}/{name}"))
}

/// A GET request; the token goes only over HTTPS.
fn request(base: &str, path_and_query: &str, credentials: &Credentials) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    let mut builder = http::Request::get(format!("{base}{path_and_query}"));
    if base.starts_with("https://")
        && let Some(token) = &credentials.token
    {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Empty::new()).with_context(|| format!("`{base}` is not a URL"))
}

/// An answer with its body still to be read, from a daemon asked directly.
async fn send_direct(direct: &Direct, path_and_query: &str) -> anyhow::Result<http::Response<DirectBody>> {
    match direct {
        Direct::Url(base, credentials) => {
            let request = request(base, path_and_query, credentials)?;
            let response =
                http_client(credentials).request(request).await.with_context(|| format!("cannot reach {base}"))?;
            Ok(response.map(|b| b.map_err(anyhow::Error::from).boxed_unsync()))
        }
        Direct::Daemon { client, pod, url } => {
            let request = http::Request::get(path_and_query)
                .body(kube::client::Body::empty())
                .with_context(|| format!("`{path_and_query}` cannot be sent to {pod}"))?;
            let response = client.send(request).await.with_context(|| {
                format!("cannot reach {pod} at {url} (its certificate must be signed by the CA its node published)")
            })?;
            if response.status() == http::StatusCode::UNAUTHORIZED {
                let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                bail!(
                    "{pod} refused the credentials ({}): netiso's API takes a bearer token; a kubeconfig user with a client certificate passes one with --token",
                    excerpt(&body)
                );
            }
            Ok(response.map(|b| b.map_err(anyhow::Error::from).boxed_unsync()))
        }
    }
}

type DirectBody = http_body_util::combinators::UnsyncBoxBody<Bytes, anyhow::Error>;

/// GET `path_and_query` (`/v1/flows?...`): status and body.
pub async fn get(endpoint: &Endpoint, path_and_query: &str) -> anyhow::Result<(u16, Bytes)> {
    match endpoint {
        Endpoint::Direct(direct) => {
            let name = endpoint.name();
            let response = tokio::time::timeout(Duration::from_secs(30), send_direct(direct, path_and_query))
                .await
                .with_context(|| format!("{name} did not answer within 30 s"))??;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.with_context(|| format!("reading from {name}"))?.to_bytes();
            Ok((status, body))
        }
        Endpoint::Pod { client, namespace, name, port } => {
            let request = proxy_request(namespace, name, *port, path_and_query)?;
            match client.request_text(request).await {
                Ok(text) => Ok((200, Bytes::from(text))),
                Err(kube::Error::Api(status)) => Ok((status.code, Bytes::from(status.message))),
                Err(e) => Err(e).with_context(|| format!("asking {namespace}/{name} through the API server")),
            }
        }
        Endpoint::Unverifiable { pod, reason } => bail!("{pod} {reason}"),
    }
}

/// GET a streaming endpoint and call `line` for each line until the stream ends (Ok) or `line`
/// fails (that error).
pub async fn stream_lines(
    endpoint: &Endpoint,
    path_and_query: &str,
    mut line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match endpoint {
        Endpoint::Direct(direct) => {
            let name = endpoint.name();
            let response = send_direct(direct, path_and_query).await?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                bail!("{name} answered HTTP {status}: {}", excerpt(&body));
            }
            let mut body = response.into_body().into_data_stream();
            let mut pending = Vec::new();
            while let Some(chunk) = body.next().await {
                pending.extend_from_slice(&chunk.with_context(|| format!("reading from {name}"))?);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let text: Vec<u8> = pending.drain(..=end).collect();
                    line(String::from_utf8_lossy(&text).trim_end())?;
                }
            }
            Ok(())
        }
        Endpoint::Pod { client, namespace, name, port } => {
            use futures::AsyncBufReadExt;
            let request = proxy_request(namespace, name, *port, path_and_query)?;
            let reader =
                client.request_stream(request).await.with_context(|| format!("following {namespace}/{name}"))?;
            let mut lines = reader.lines();
            while let Some(l) = lines.next().await {
                line(&l?)?;
            }
            Ok(())
        }
        Endpoint::Unverifiable { pod, reason } => bail!("{pod} {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_reaches_the_url_encoded_and_a_bad_path_is_an_error() {
        assert_eq!(encode("2026-12-05T00:00:00+01:00"), "2026-12-05T00%3A00%3A00%2B01%3A00");
        assert_eq!(encode("1h 30m"), "1h%2030m");
        assert!(proxy_request("netiso", "netiso-abc", 9963, "/v1/flows/a b/evidence").is_err());
        let fine =
            proxy_request("netiso", "netiso-abc", 9963, &format!("/v1/flows/{}/evidence", encode("a b"))).unwrap();
        assert_eq!(fine.uri().path(), "/api/v1/namespaces/netiso/pods/netiso-abc:9963/proxy/v1/flows/a%20b/evidence");
    }
}
