//! Talking to netiso daemons: directly by URL, or through the Kubernetes API server's pod proxy
//! (`--kube`), which needs no extra component and only kubectl-level RBAC.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where `observe` and `evidence` ask.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// A netiso daemon's API (repeatable; results are merged and ordered by time).
    #[arg(long = "server", value_name = "URL", default_value = "http://127.0.0.1:9963")]
    pub servers: Vec<String>,
    /// Ask every netiso pod of the cluster through the Kubernetes API server's pod proxy.
    #[arg(long, conflicts_with = "servers")]
    pub kube: bool,
    /// Namespace of the netiso DaemonSet (with --kube).
    #[arg(long, default_value = "netiso")]
    pub kube_namespace: String,
    /// Label selector of the netiso pods (with --kube).
    #[arg(long, default_value = "app.kubernetes.io/name=netiso")]
    pub kube_selector: String,
    /// Port of the netiso API in its pods (with --kube).
    #[arg(long, default_value_t = 9963)]
    pub kube_port: u16,
}

/// One daemon to ask: a base URL, or a pod reached through the API server.
#[derive(Clone)]
pub enum Endpoint {
    Url(String),
    Pod { client: kube::Client, namespace: String, name: String, port: u16 },
}

impl Endpoint {
    pub fn name(&self) -> String {
        match self {
            Endpoint::Url(u) => u.clone(),
            Endpoint::Pod { namespace, name, .. } => format!("{namespace}/{name}"),
        }
    }
}

impl Target {
    pub async fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        if !self.kube {
            return Ok(self.servers.iter().map(|s| Endpoint::Url(s.trim_end_matches('/').to_owned())).collect());
        }
        let client =
            kube::Client::try_default().await.context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client.clone(), &self.kube_namespace);
        let list =
            pods.list(&kube::api::ListParams::default().labels(&self.kube_selector)).await.with_context(|| {
                format!("listing netiso pods ({}) in namespace {}", self.kube_selector, self.kube_namespace)
            })?;
        let endpoints: Vec<Endpoint> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .map(|name| Endpoint::Pod {
                client: client.clone(),
                namespace: self.kube_namespace.clone(),
                name,
                port: self.kube_port,
            })
            .collect();
        if endpoints.is_empty() {
            bail!("no netiso pods match {} in namespace {}", self.kube_selector, self.kube_namespace);
        }
        Ok(endpoints)
    }
}

fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path_and_query` (`/v1/flows?...`): status and body.
pub async fn get(endpoint: &Endpoint, path_and_query: &str) -> anyhow::Result<(u16, Bytes)> {
    match endpoint {
        Endpoint::Url(base) => {
            let uri: hyper::Uri =
                format!("{base}{path_and_query}").parse().with_context(|| format!("`{base}` is not a URL"))?;
            let response = tokio::time::timeout(Duration::from_secs(30), http_client().get(uri))
                .await
                .with_context(|| format!("{base} did not answer within 30 s"))?
                .with_context(|| format!("cannot reach {base}"))?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.with_context(|| format!("reading from {base}"))?.to_bytes();
            Ok((status, body))
        }
        Endpoint::Pod { client, namespace, name, port } => {
            let request =
                http::Request::get(format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path_and_query}"))
                    .body(Vec::new())
                    .expect("valid request");
            match client.request_text(request).await {
                Ok(text) => Ok((200, Bytes::from(text))),
                Err(kube::Error::Api(status)) => Ok((status.code, Bytes::from(status.message))),
                Err(e) => Err(e).with_context(|| format!("asking {namespace}/{name} through the API server")),
            }
        }
    }
}

/// GET a streaming endpoint and call `line` for each line until the stream ends.
pub async fn stream_lines(endpoint: &Endpoint, path_and_query: &str, mut line: impl FnMut(&str)) -> anyhow::Result<()> {
    match endpoint {
        Endpoint::Url(base) => {
            let uri: hyper::Uri =
                format!("{base}{path_and_query}").parse().with_context(|| format!("`{base}` is not a URL"))?;
            let response = http_client().get(uri).await.with_context(|| format!("cannot reach {base}"))?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                bail!("{base}: {status}: {}", String::from_utf8_lossy(&body));
            }
            let mut body = response.into_body().into_data_stream();
            let mut pending = Vec::new();
            while let Some(chunk) = body.next().await {
                pending.extend_from_slice(&chunk.with_context(|| format!("reading from {base}"))?);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let text: Vec<u8> = pending.drain(..=end).collect();
                    line(String::from_utf8_lossy(&text).trim_end());
                }
            }
            Ok(())
        }
        Endpoint::Pod { client, namespace, name, port } => {
            use futures::AsyncBufReadExt;
            let request =
                http::Request::get(format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path_and_query}"))
                    .body(Vec::new())
                    .expect("valid request");
            let reader =
                client.request_stream(request).await.with_context(|| format!("following {namespace}/{name}"))?;
            let mut lines = reader.lines();
            while let Some(l) = lines.next().await {
                line(&l?);
            }
            Ok(())
        }
    }
}
