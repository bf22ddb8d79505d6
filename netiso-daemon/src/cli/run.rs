//! `netiso run`: the node daemon. Kernel events flow datapath → inventory → policy → evidence →
//! export: raw records to stdout, flow records into the evidence store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::{mpsc, watch};

use super::LogFormat;
use crate::datapath::{Datapath, DatapathConfig};
use crate::evidence::correlate::Correlator;
use crate::evidence::record::FlowVerdict;
use crate::evidence::store::{self, Retention, Store};
use crate::export::http::{self, Shared};
use crate::export::log::{self, BlockedFlowLog, RecordOutput};
use crate::export::metrics::Metrics;
use crate::export::tls;
use crate::inventory::{Inventory, Kind, kubernetes, manifests};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Also observe interfaces matching this name or glob (every veth is observed by default).
    #[arg(long = "interfaces", value_name = "GLOB")]
    pub interfaces: Vec<String>,
    /// Output format of records (stdout) and diagnostics (stderr).
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Drop reasons to record: kernel names (NETFILTER_DROP), classes (policy, socket, routing,
    /// other, routine), `default` (all but routine frees) or `all`; comma-separated.
    #[arg(long, default_value = "default")]
    pub drop_reasons: String,
    /// Entries of the kernel's drop map.
    #[arg(long, default_value_t = 16_384)]
    pub drop_map_entries: u32,
    /// Entries of the kernel's flow map.
    #[arg(long, default_value_t = 65_536)]
    pub flow_map_entries: u32,
    /// How often the kernel maps are read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_interval: Duration,
    /// Keys idle this long leave the kernel maps.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Take the inventory from these manifests (file or directory, reloaded on change) instead
    /// of the Kubernetes API.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: in-cluster config, then KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in the Node object.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The evidence store.
    #[arg(long, default_value = "/var/lib/netiso/evidence.redb")]
    pub store: PathBuf,
    /// Keep evidence this long.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Keep at most this many bytes of evidence (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    pub store_max_bytes: u64,
    /// Address of the query API (/v1/...).
    #[arg(long, default_value = "127.0.0.1:9963")]
    pub listen: std::net::SocketAddr,
    /// Address of /metrics, /healthz and /readyz (never behind credentials, for Prometheus and
    /// probes).
    #[arg(long, default_value = "127.0.0.1:9962")]
    pub metrics_listen: std::net::SocketAddr,
    /// Authentication of query API requests: `kubernetes` checks bearer tokens with TokenReview
    /// and requires `get nodes/proxy` on this node (SubjectAccessReview); `none` trusts every
    /// caller (only sensible on loopback).
    #[arg(long, value_enum, default_value = "none")]
    pub api_auth: ApiAuth,
    /// How long an authentication/authorization decision is reused.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub auth_cache_ttl: Duration,
    /// TLS certificate (PEM, chain) of the API; reloaded when it changes. With --api-auth
    /// kubernetes and no certificate, one is generated at start.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A connection to either listener must finish its TLS handshake, and send each request's
    /// headers (also when idle between requests), within this; responses are not limited.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub connection_timeout: Duration,
    /// Log a blocked flow at most once per this interval (repeats are counted).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub blocked_log_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiAuth {
    None,
    Kubernetes,
}

/// `512MiB`, `2GiB`, `100MB`, `4096`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a size like 512MiB"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    log::init_diagnostics(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

fn node_name(args: &RunArgs) -> String {
    args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".into())
    })
}

/// The Kubernetes client from --kubeconfig, else in-cluster config or KUBECONFIG, if any.
async fn kube_client(args: &RunArgs) -> anyhow::Result<Option<kube::Client>> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Some(
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .context("loading kubeconfig")?,
            )
        }
        None => kube::Config::infer().await.ok(),
    };
    config.map(|c| kube::Client::try_from(c).context("creating the Kubernetes client")).transpose()
}

/// Starts the inventory's source: manifests when given, else the Kubernetes API when a
/// configuration is found. Without either, flows are recorded with addresses only.
async fn start_inventory(args: &RunArgs, client: Option<kube::Client>) -> anyhow::Result<Arc<Inventory>> {
    if let Some(path) = &args.manifests {
        // Read once up front so a bad path fails the start instead of a background task.
        manifests::load(path).with_context(|| format!("reading manifests from {}", path.display()))?;
        let inventory = Inventory::new(&Kind::ALL, args.retention);
        tokio::spawn(manifests::follow(path.clone(), inventory.clone(), Duration::from_secs(1)));
        return Ok(inventory);
    }
    match client {
        Some(client) => {
            let inventory = Inventory::new(&Kind::ALL, args.retention);
            kubernetes::spawn(client, inventory.clone());
            Ok(inventory)
        }
        None => {
            tracing::warn!(
                "no Kubernetes configuration (in-cluster or KUBECONFIG) and no --manifests: flows are recorded with addresses only"
            );
            Ok(Inventory::new(&[], args.retention))
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = DatapathConfig {
        interface_patterns: args.interfaces.clone(),
        drop_reasons: args.drop_reasons.clone(),
        drop_map_entries: args.drop_map_entries,
        flow_map_entries: args.flow_map_entries,
        drain_interval: args.drain_interval,
        idle_timeout: args.idle_timeout,
    };
    let datapath = Datapath::load(config).await?;
    let client = kube_client(&args).await?;
    let authorizer = match args.api_auth {
        ApiAuth::None => None,
        ApiAuth::Kubernetes => {
            let client = client.clone().context(
                "--api-auth kubernetes needs a Kubernetes configuration (in-cluster, KUBECONFIG or --kubeconfig)",
            )?;
            Some(Arc::new(crate::export::auth::Authorizer::new(client, node_name(&args), args.auth_cache_ttl)))
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key, args.api_auth) {
        (Some(cert), Some(key), _) => {
            Some(tls::server_config(tls::Source::Files { cert: cert.clone(), key: key.clone() })?)
        }
        (_, _, ApiAuth::Kubernetes) => {
            let mut names = vec!["localhost".to_owned(), node_name(&args), args.listen.ip().to_string()];
            names.dedup();
            let ca_out = args.store.parent().unwrap_or(std::path::Path::new(".")).join("api-ca.pem");
            Some(tls::server_config(tls::Source::Generated { names, ca_out })?)
        }
        _ => None,
    };
    let inventory = start_inventory(&args, client).await?;
    let retention = Retention { max_age: args.retention, max_bytes: args.store_max_bytes };
    let store = Arc::new(Store::open(&args.store, retention)?);
    let mut correlator = Correlator::new(inventory.clone(), node_name(&args), store.last_id()?, args.idle_timeout * 2);
    let (writer, writer_task) = store::spawn_writer(store.clone(), Duration::from_millis(200), Duration::from_secs(30));

    let stats = datapath.stats();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("listening on {} (--metrics-listen)", args.metrics_listen))?;
    let metrics = Metrics::new();
    let api_health = Arc::new(http::ListenerHealth::new("api", metrics.accept_errors("api")));
    let metrics_health = Arc::new(http::ListenerHealth::new("metrics", metrics.accept_errors("metrics")));
    let shared = Arc::new(Shared {
        metrics,
        store: store.clone(),
        inventory: inventory.clone(),
        datapath: stats.clone(),
        datapath_ready: Default::default(),
        inserted: writer.inserted.clone(),
        listeners: vec![api_health.clone(), metrics_health.clone()],
    });
    let (http_stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let api_task = tokio::spawn(http::serve(
        listener,
        http::api_router(shared.clone(), authorizer.clone()),
        tls.clone(),
        api_health,
        args.connection_timeout,
        stopped(&http_stop_tx),
    ));
    let metrics_task = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(shared.clone()),
        None,
        metrics_health,
        args.connection_timeout,
        stopped(&http_stop_tx),
    ));
    tracing::info!(
        api = %args.listen,
        api_tls = tls.is_some(),
        api_auth = ?args.api_auth,
        metrics = %args.metrics_listen,
        "serving the query API (/v1/...) and /metrics, /healthz, /readyz"
    );
    let mut blocked = BlockedFlowLog::new(args.blocked_log_interval);
    let (records_tx, mut records_rx) = mpsc::channel(4096);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut datapath_task = tokio::spawn(datapath.run(records_tx, shutdown_rx, Some(ready_tx)));

    let mut printer = RecordOutput::stdout(args.log_format);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ready_rx = Some(ready_rx);
    let result = loop {
        tokio::select! {
            ready = async { ready_rx.as_mut().expect("ready once").await }, if ready_rx.is_some() => {
                ready_rx = None;
                if let Ok(interfaces) = ready {
                    shared.datapath_ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(interfaces = ?interfaces, store = %store.path().display(), "datapath ready");
                }
            }
            record = records_rx.recv() => match record {
                Some(record) => {
                    if record.new_key {
                        printer.print(&record);
                    }
                    if let Some(handled) = correlator.handle(&record) {
                        export(&shared, &mut blocked, &writer, handled).await;
                    }
                }
                None => break Ok(()),
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            finished = &mut datapath_task => break finished.context("datapath task")?.map_err(anyhow::Error::from),
        }
    };
    // Stop the datapath, handle what its final drain produced, then let it detach.
    let _ = shutdown_tx.send(true);
    if !datapath_task.is_finished() {
        let drain = async {
            while let Some(record) = records_rx.recv().await {
                if record.new_key {
                    printer.print(&record);
                }
                if let Some(handled) = correlator.handle(&record) {
                    export(&shared, &mut blocked, &writer, handled).await;
                }
            }
            anyhow::Ok(())
        };
        let (done, drained) = tokio::join!(datapath_task, drain);
        drained?;
        done.context("datapath task")??;
    }
    drop(writer);
    writer_task.await.context("evidence writer")?;
    let _ = http_stop_tx.send(());
    // Follow streams end with the process; do not wait on them.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(api_task, metrics_task) }).await;
    result?;
    let stats = stats.lock().expect("stats lock").clone();
    tracing::info!(
        records = stats.records,
        ring_events = stats.ring_events,
        dropped_packets = stats.dropped_packets,
        flow_packets = stats.flow_packets,
        losses = stats.losses(),
        ringbuf_full = stats.ringbuf_full,
        drop_map_full = stats.drop_map_full,
        flow_map_full = stats.flow_map_full,
        foreign_drops = stats.foreign_drops,
        "stopped; all programs detached"
    );
    Ok(ExitCode::SUCCESS)
}

/// The evidence stage's outputs for one handled record: counters, the blocked-flow log, the store.
async fn export(
    shared: &Shared,
    blocked: &mut BlockedFlowLog,
    writer: &store::StoreWriter,
    handled: crate::evidence::correlate::Handled,
) {
    shared.metrics.observe(&handled);
    if let crate::evidence::store::StoreOp::Insert(record) = &handled.op
        && record.verdict == FlowVerdict::Dropped
    {
        blocked.record(record);
    }
    writer.send(handled.op).await;
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
