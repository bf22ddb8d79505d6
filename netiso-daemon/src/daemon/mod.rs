//! The node daemon, wired: kernel events flow datapath → inventory → policy → evidence → export.
//! [`start`] brings it up (programs attached, listeners bound) and hands back a [`Running`] daemon;
//! [`run`] serves until a shutdown signal. `netiso run` turns its arguments into a [`Config`] and
//! calls [`run`]; tests start the daemon in-process with [`start`], or as a process of its own
//! with [`process::Process`].

pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::cluster::NodeInfo;
use crate::datapath::conntrack::Conntrack;
use crate::datapath::record::DatapathRecord;
use crate::datapath::{Datapath, DatapathConfig, DatapathStats, interfaces};
use crate::evidence::correlate::{self, Correlator, Handled};
use crate::evidence::record::FlowVerdict;
use crate::evidence::store::{self, Retention, Store, StoreOp, StoreWriter};
use crate::export::auth::{ApiAuth, Authorizer};
use crate::export::http::{self, ListenerHealth, Shared};
use crate::export::log::{BlockedFlowLog, LogFormat, RecordOutput};
use crate::export::metrics::Metrics;
use crate::export::{tls, trust};
use crate::inventory::{Inventory, Kind, kubernetes, manifests};

/// Everything the daemon is told; `netiso run --help` explains each.
#[derive(Clone, Debug)]
pub struct Config {
    pub datapath: DatapathConfig,
    /// Raw kernel records go to standard output in this format; none prints none.
    pub print_records: Option<LogFormat>,
    /// Inventory from these manifests instead of the Kubernetes API.
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API; none: in-cluster config, then KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub store: PathBuf,
    pub retention: Duration,
    pub store_max_bytes: u64,
    /// The query API; port 0 picks a free port ([`Running::api_address`]).
    pub listen: SocketAddr,
    /// /metrics, /healthz, /readyz; port 0 picks a free port.
    pub metrics_listen: SocketAddr,
    pub api_auth: ApiAuth,
    pub auth_cache_ttl: Duration,
    /// The API's certificate and key (PEM files, reloaded on change).
    pub tls: Option<TlsFiles>,
    pub connection_timeout: Duration,
    pub blocked_log_interval: Duration,
    /// Publish the generated certificate's CA in this ConfigMap, for `--kube` clients.
    pub publish_api_ca: Option<trust::Target>,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A started daemon: its programs are attached and its listeners bound.
pub struct Running {
    api_address: SocketAddr,
    metrics_address: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<DatapathStats>>,
}

impl Running {
    pub fn api_address(&self) -> SocketAddr {
        self.api_address
    }

    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_address
    }

    /// Detaches the programs after a final drain, stores what it produced and closes the
    /// listeners; the datapath's totals come back.
    pub async fn stop(self) -> anyhow::Result<DatapathStats> {
        let _ = self.shutdown.send(true);
        self.task.await.context("daemon task")?
    }

    /// Until the daemon ends by itself (its datapath failed) or `shutdown` completes.
    async fn serve_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<DatapathStats> {
        tokio::select! {
            () = shutdown => self.stop().await,
            finished = &mut self.task => finished.context("daemon task")?,
        }
    }
}

/// Starts the daemon and serves until `shutdown` completes (`netiso run`: SIGINT or SIGTERM).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<DatapathStats> {
    start(config).await?.serve_until(shutdown).await
}

/// Loads and attaches the programs, opens the store, starts the inventory and binds both
/// listeners; returns once the datapath is ready.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    if config.publish_api_ca.is_some() {
        if config.tls.is_some() {
            anyhow::bail!(
                "--publish-api-ca publishes the CA of a generated certificate; with --tls-cert, give clients your CA with --ca-file"
            );
        }
        if config.api_auth != ApiAuth::Kubernetes {
            anyhow::bail!("--publish-api-ca needs --api-auth kubernetes (which serves the API over TLS)");
        }
    }
    let datapath = Datapath::load(config.datapath.clone()).await?;
    let client = kube_client(config.kubeconfig.as_deref()).await?;
    let authorizer = match config.api_auth {
        ApiAuth::None => None,
        ApiAuth::Kubernetes => {
            let client = client.clone().context(
                "--api-auth kubernetes needs a Kubernetes configuration (in-cluster, KUBECONFIG or --kubeconfig)",
            )?;
            Some(Arc::new(Authorizer::new(client, config.node_name.clone(), config.auth_cache_ttl)))
        }
    };
    let (tls, generated_ca) = match (&config.tls, config.api_auth) {
        (Some(files), _) => {
            let source = tls::Source::Files { cert: files.cert.clone(), key: files.key.clone() };
            let (tls, _) = tls::server_config(source)?;
            (Some(tls), None)
        }
        (None, ApiAuth::Kubernetes) => {
            let mut names = vec!["localhost".to_owned(), config.node_name.clone(), config.listen.ip().to_string()];
            names.dedup();
            let ca_out = config.store.parent().unwrap_or(Path::new(".")).join("api-ca.pem");
            let (tls, ca) = tls::server_config(tls::Source::Generated { names, ca_out })?;
            (Some(tls), ca)
        }
        (None, ApiAuth::None) => (None, None),
    };
    let publication = match (&config.publish_api_ca, generated_ca) {
        (Some(target), Some(ca)) => {
            let client = client.clone().context("--publish-api-ca needs a Kubernetes configuration")?;
            Some((target.clone(), ca, client))
        }
        _ => None,
    };
    let inventory = start_inventory(&config, client).await?;
    let publisher = publication
        .map(|(target, ca, client)| trust::spawn(client, target, config.node_name.clone(), ca, inventory.clone()));
    let local_addresses = follow_local_addresses(&inventory, &config.node_name).await?;
    let retention = Retention { max_age: config.retention, max_bytes: config.store_max_bytes };
    let store = Arc::new(Store::open(&config.store, retention)?);
    let correlator = Correlator::new(
        inventory.clone(),
        config.node_name.clone(),
        store.last_id()?,
        config.datapath.idle_timeout * 2,
        correlate::HOLD,
    )
    .with_attempt_window(config.blocked_log_interval);
    let correlator = match Conntrack::open() {
        Ok(conntrack) => correlator.with_translations(Box::new(conntrack)),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot read connection tracking (needs CAP_NET_ADMIN and the kernel's nf_conntrack_netlink): flows to Services whose backend is on another node name only the ClusterIP"
            );
            correlator
        }
    };
    let (writer, writer_task) = store::spawn_writer(store.clone(), Duration::from_millis(200), Duration::from_secs(30));

    let stats = datapath.stats();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", config.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("listening on {} (--metrics-listen)", config.metrics_listen))?;
    let api_address = listener.local_addr().context("the API listener's address")?;
    let metrics_address = metrics_listener.local_addr().context("the metrics listener's address")?;
    let metrics = Metrics::new();
    let api_health = Arc::new(ListenerHealth::new("api", metrics.accept_errors("api")));
    let metrics_health = Arc::new(ListenerHealth::new("metrics", metrics.accept_errors("metrics")));
    let shared = Arc::new(Shared {
        metrics,
        store: store.clone(),
        inventory,
        datapath: stats.clone(),
        datapath_ready: Default::default(),
        written: writer.written.clone(),
        listeners: vec![api_health.clone(), metrics_health.clone()],
    });
    let (http_stop, _) = broadcast::channel::<()>(1);
    let stopped = |tx: &broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let api_task = tokio::spawn(http::serve(
        listener,
        http::api_router(shared.clone(), authorizer),
        tls.clone(),
        api_health,
        config.connection_timeout,
        stopped(&http_stop),
    ));
    let metrics_task = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(shared.clone()),
        None,
        metrics_health,
        config.connection_timeout,
        stopped(&http_stop),
    ));
    tracing::info!(
        api = %api_address,
        api_tls = tls.is_some(),
        api_auth = ?config.api_auth,
        metrics = %metrics_address,
        "serving the query API (/v1/...) and /metrics, /healthz, /readyz"
    );

    let (records_tx, records) = mpsc::channel(4096);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut datapath_task = tokio::spawn(datapath.run(records_tx, shutdown_rx.clone(), Some(ready_tx)));
    let Ok(interfaces) = ready_rx.await else {
        // The datapath ended before it was ready: its error says why.
        datapath_task.await.context("datapath task")??;
        anyhow::bail!("the datapath stopped before it was ready");
    };
    shared.datapath_ready.store(true, Ordering::Relaxed);
    tracing::info!(interfaces = ?interfaces, store = %store.path().display(), "datapath ready");

    let pipeline = Pipeline {
        shared,
        correlator,
        blocked: BlockedFlowLog::new(config.blocked_log_interval),
        writer,
        printer: config.print_records.map(RecordOutput::stdout),
    };
    let task = tokio::spawn(async move {
        let result = pipeline.run(records, shutdown_rx, &mut datapath_task, writer_task).await;
        local_addresses.abort();
        if let Some(publisher) = publisher {
            publisher.abort();
        }
        let _ = http_stop.send(());
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
        Ok(stats)
    });
    Ok(Running { api_address, metrics_address, shutdown, task })
}

/// The node's own addresses (its interfaces') into the inventory, now and after every change:
/// traffic between a pod and its node is always allowed, and the kubelet's probes come from
/// addresses no Node object lists (a bridge's, a veth's).
async fn follow_local_addresses(inventory: &Arc<Inventory>, node: &str) -> anyhow::Result<JoinHandle<()>> {
    let addresses = interfaces::addresses().await.context("listing the node's addresses over rtnetlink")?;
    inventory.set_local_node(NodeInfo { name: node.to_owned(), addresses });
    let (inventory, node) = (inventory.clone(), node.to_owned());
    Ok(tokio::spawn(async move {
        let (updates, mut received) = mpsc::channel(4);
        let follow = async {
            while let Some(addresses) = received.recv().await {
                inventory.set_local_node(NodeInfo { name: node.clone(), addresses });
            }
        };
        let (watched, ()) = tokio::join!(interfaces::watch_addresses(updates), follow);
        if let Err(e) = watched {
            tracing::warn!(error = %e, "no longer following the node's addresses");
        }
    }))
}

/// The stages after the datapath, for each record it produces.
struct Pipeline {
    shared: Arc<Shared>,
    correlator: Correlator,
    blocked: BlockedFlowLog,
    writer: StoreWriter,
    printer: Option<RecordOutput>,
}

impl Pipeline {
    /// Until shutdown (or the datapath ends); then stops the datapath, handles what its final
    /// drain produced, lets it detach and waits for the store to have everything.
    async fn run(
        mut self,
        mut records: mpsc::Receiver<DatapathRecord>,
        mut shutdown: watch::Receiver<bool>,
        datapath_task: &mut JoinHandle<Result<(), crate::datapath::DatapathError>>,
        writer_task: JoinHandle<()>,
    ) -> anyhow::Result<()> {
        let mut release = tokio::time::interval(correlate::HOLD / 4);
        let result = loop {
            tokio::select! {
                record = records.recv() => match record {
                    Some(record) => self.handle(record).await,
                    None => break Ok(()),
                },
                _ = release.tick() => self.release(std::time::Instant::now()).await,
                () = async { drop(shutdown.wait_for(|stop| *stop).await) } => break Ok(()),
                finished = &mut *datapath_task => {
                    break finished.context("datapath task").and_then(|r| r.map_err(anyhow::Error::from));
                }
            }
        };
        if !datapath_task.is_finished() {
            // The datapath stops on the same shutdown signal, after a final drain.
            let drain = async {
                while let Some(record) = records.recv().await {
                    self.handle(record).await;
                }
            };
            let (done, ()) = tokio::join!(datapath_task, drain);
            done.context("datapath task")??;
        }
        // Nothing more can drop what is still held: it was forwarded.
        self.release(std::time::Instant::now() + correlate::HOLD).await;
        drop(self.writer);
        writer_task.await.context("evidence writer")?;
        result
    }

    /// Prints a new key's raw record, then correlates it and exports the outcome: counters, the
    /// blocked-flow log, the store.
    async fn handle(&mut self, record: DatapathRecord) {
        if record.new_key
            && let Some(printer) = &mut self.printer
        {
            printer.print(&record);
        }
        let Some(handled) = self.correlator.handle(&record) else { return };
        export(&self.shared, &mut self.blocked, &self.writer, handled).await;
    }

    /// Exports the flows whose hold ended by `now`.
    async fn release(&mut self, now: std::time::Instant) {
        for handled in self.correlator.release(now) {
            export(&self.shared, &mut self.blocked, &self.writer, handled).await;
        }
    }
}

async fn export(shared: &Shared, blocked: &mut BlockedFlowLog, writer: &StoreWriter, handled: Handled) {
    shared.metrics.observe(&handled);
    if let StoreOp::Insert(record) = &handled.op
        && record.verdict == FlowVerdict::Dropped
    {
        blocked.record(record);
    }
    writer.send(handled.op).await;
}

/// The Kubernetes client from `kubeconfig`, else in-cluster config or KUBECONFIG, if any.
async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<Option<kube::Client>> {
    let config = match kubeconfig {
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
async fn start_inventory(config: &Config, client: Option<kube::Client>) -> anyhow::Result<Arc<Inventory>> {
    if let Some(path) = &config.manifests {
        // Read once up front so a bad path fails the start instead of a background task.
        manifests::load(path).with_context(|| format!("reading manifests from {}", path.display()))?;
        let inventory = Inventory::new(&Kind::ALL, config.retention);
        tokio::spawn(manifests::follow(path.clone(), inventory.clone(), Duration::from_secs(1)));
        return Ok(inventory);
    }
    match client {
        Some(client) => {
            let inventory = Inventory::new(&Kind::ALL, config.retention);
            kubernetes::spawn(client, inventory.clone());
            Ok(inventory)
        }
        None => {
            tracing::warn!(
                "no Kubernetes configuration (in-cluster or KUBECONFIG) and no --manifests: flows are recorded with addresses only"
            );
            Ok(Inventory::new(&[], config.retention))
        }
    }
}
