//! The HTTP listener of `netiso run`: `/metrics`, `/healthz`, `/readyz`, and the query API
//! (`/v1/flows`, `/v1/flows/{id}/evidence`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;

use super::metrics::Metrics;
use crate::datapath::DatapathStats;
use crate::evidence::filter::{FlowFilter, parse_ip, parse_verdict};
use crate::evidence::record::{EvidenceBundle, FlowList, FlowRecord, MAX_LIMIT, StreamNotice, ndjson_line};
use crate::evidence::store::{Query, Store, Written};
use crate::inventory::{Freshness, Inventory, InventoryView};

/// Everything the listener reads; owned by `netiso run`.
pub struct Shared {
    pub metrics: Metrics,
    pub store: Arc<Store>,
    pub inventory: Arc<Inventory>,
    pub datapath: Arc<Mutex<DatapathStats>>,
    pub datapath_ready: AtomicBool,
    pub written: broadcast::Sender<Written>,
    /// The API's and the metrics' listeners.
    pub listeners: Vec<Arc<ListenerHealth>>,
}

const DEFAULT_LIMIT: usize = 100;

/// A request parameter that cannot be used, answered with 400.
#[derive(Debug)]
pub struct BadParameter {
    pub parameter: String,
    pub message: String,
}

impl IntoResponse for BadParameter {
    fn into_response(self) -> Response {
        let error = format!("parameter `{}`: {}", self.parameter, self.message);
        (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": error }))).into_response()
    }
}

fn bad(parameter: &str, message: impl std::fmt::Display) -> BadParameter {
    BadParameter { parameter: parameter.to_owned(), message: message.to_string() }
}

/// RFC 3339 (`2026-01-02T03:04:05Z`) or a duration ago (`5m`, `1h30m`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a duration like 5m"))?;
    SystemTime::now().checked_sub(ago).ok_or_else(|| format!("`{text}` ago is before 1970"))
}

/// Sets the criterion a filter parameter names; false for a parameter that is no filter. Errors
/// name the parameter as the request gave it (`not.port`).
fn set_criterion(f: &mut FlowFilter, criterion: &str, name: &str, value: &str) -> Result<bool, BadParameter> {
    let text = || Some(value.to_owned()).filter(|v| !v.is_empty());
    fn parsed<T: std::str::FromStr<Err = String>>(name: &str, value: &str) -> Result<Option<T>, BadParameter> {
        value.parse().map(Some).map_err(|e| bad(name, e))
    }
    let ip = || parse_ip(value).map(Some).map_err(|e| bad(name, e));
    let port = || value.parse().map(Some).map_err(|_| bad(name, format!("`{value}` is not a port number")));
    match criterion {
        "verdict" => f.verdict = Some(parse_verdict(value).map_err(|e| bad(name, e))?),
        "namespace" => f.namespace = text(),
        "from-namespace" => f.from_namespace = text(),
        "to-namespace" => f.to_namespace = text(),
        "pod" => f.pod = parsed(name, value)?,
        "from-pod" => f.from_pod = parsed(name, value)?,
        "to-pod" => f.to_pod = parsed(name, value)?,
        "label" => f.label = parsed(name, value)?,
        "from-label" => f.from_label = parsed(name, value)?,
        "to-label" => f.to_label = parsed(name, value)?,
        "ip" => f.ip = ip()?,
        "from-ip" => f.from_ip = ip()?,
        "to-ip" => f.to_ip = ip()?,
        "port" => f.port = port()?,
        "from-port" => f.from_port = port()?,
        "to-port" => f.to_port = port()?,
        "protocol" => f.protocol = Some(value.parse().map_err(|e: String| bad(name, e))?),
        "reason" => f.reason = text(),
        "policy" => {
            if !value.contains('/') {
                return Err(bad(name, format!("`{value}`: use namespace/name")));
            }
            f.policy = text();
        }
        "node" => f.node = parsed(name, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// The query a request's parameters describe, or the response naming the bad parameter. A filter
/// parameter prefixed `not.` (`not.namespace=kube-system`) excludes what it matches; all such
/// parameters together name what is left out.
pub fn parse_query(params: &HashMap<String, String>) -> Result<(Query, bool), BadParameter> {
    let mut q = Query { limit: DEFAULT_LIMIT, ..Default::default() };
    let mut exclude = FlowFilter::default();
    let mut follow = false;
    let id = |name: &str, value: &str| {
        value.parse::<u64>().map_err(|_| bad(name, format!("`{value}`: use a record id (from `next`)")))
    };
    for (name, value) in params {
        if let Some(negated) = name.strip_prefix("not.") {
            if !set_criterion(&mut exclude, negated, name, value)? {
                return Err(bad(name, "unknown filter"));
            }
            continue;
        }
        if set_criterion(&mut q.filter, name, name, value)? {
            continue;
        }
        match name.as_str() {
            "since" => q.since = Some(parse_time(value).map_err(|e| bad(name, e))?),
            "until" => q.until = Some(parse_time(value).map_err(|e| bad(name, e))?),
            "before" => q.before_id = Some(id(name, value)?),
            "after" => q.after_id = Some(id(name, value)?),
            "order" => {
                q.oldest_first = match value.as_str() {
                    "newest" => false,
                    "oldest" => true,
                    other => return Err(bad(name, format!("`{other}`: use newest or oldest"))),
                }
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| bad(name, format!("`{value}`: use a number from 1 to {MAX_LIMIT}")))?
            }
            "follow" => {
                follow = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(bad(name, format!("`{other}`: use true or false"))),
                }
            }
            other => return Err(bad(other, "unknown parameter")),
        }
    }
    q.exclude = (!exclude.is_empty()).then_some(exclude);
    Ok((q, follow))
}

async fn flows(State(shared): State<Arc<Shared>>, UrlQuery(params): UrlQuery<HashMap<String, String>>) -> Response {
    let (query, follow) = match parse_query(&params) {
        Ok(q) => q,
        Err(bad) => return bad.into_response(),
    };
    // Subscribe before reading history, so nothing falls in between.
    let mut live = shared.written.subscribe();
    let store = shared.store.clone();
    let q = query.clone();
    let page = match tokio::task::spawn_blocking(move || store.query_page(&q)).await {
        Ok(Ok(page)) => page,
        Ok(Err(e)) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e.to_string()}))).into_response();
        }
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e.to_string()}))).into_response();
        }
    };
    let history = page.records;
    if !follow {
        // `more`: older records match too; `next` is where the following page starts.
        let flows = history.into_iter().map(FlowRecord::listed).collect();
        let next = page.next.map(|id| id.to_string());
        return axum::Json(FlowList { flows, more: page.more, next }).into_response();
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(256);
    tokio::spawn(async move {
        let mut last = 0u64;
        let oldest_first: Box<dyn Iterator<Item = FlowRecord> + Send> =
            if query.oldest_first { Box::new(history.into_iter()) } else { Box::new(history.into_iter().rev()) };
        for r in oldest_first {
            last = last.max(r.id);
            if tx.send(Ok(Bytes::from(ndjson_line(&r.listed())))).await.is_err() {
                return;
            }
        }
        loop {
            // New records once each; a dropped record again whenever its counts change (a repeated
            // attempt), as an update line with the same id.
            let record = match live.recv().await {
                Ok(Written::Inserted(r)) if r.id > last => {
                    last = r.id;
                    r
                }
                Ok(Written::Counted(r)) => r,
                Ok(Written::Inserted(_)) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let note = StreamNotice {
                        error: format!("{n} records were skipped: the reader is too slow"),
                        ends: false,
                    };
                    if tx.send(Ok(Bytes::from(ndjson_line(&note)))).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if query.matches(&record)
                && tx.send(Ok(Bytes::from(ndjson_line(&FlowRecord::clone(&record).listed())))).await.is_err()
            {
                return;
            }
        }
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Response::builder().header(header::CONTENT_TYPE, "application/x-ndjson").body(body).expect("valid response")
}

async fn evidence(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return bad("id", format!("`{id}` is not a record id")).into_response();
    };
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || store.get(id)).await {
        Ok(Ok(Some(r))) => axum::Json(EvidenceBundle::of(r)).into_response(),
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("no record {id} (removed by retention, or on another node)")})),
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e.to_string()}))).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e.to_string()}))).into_response(),
    }
}

/// OpenMetrics for clients that ask for it (Prometheus does), the classic text format otherwise.
async fn metrics(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    let datapath = shared.datapath.lock().expect("stats lock").clone();
    let store = shared.store.stats();
    shared.metrics.refresh(&datapath, &shared.inventory.status(), &store);
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            shared.metrics.encode(),
        )
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.metrics.encode_text())
            .into_response()
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let attached = shared.datapath_ready.load(Ordering::Relaxed);
    let synced = shared.inventory.status().synced;
    if let Some((since, error)) = shared.store.health().failing {
        let since = humantime::format_rfc3339_seconds(since);
        let why = format!(
            "not ready: evidence store writes fail since {since} ({error}); records are held until they succeed\n"
        );
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    for listener in &shared.listeners {
        if let Some((since, error)) = listener.failing() {
            let since = humantime::format_rfc3339_seconds(since);
            let why = format!(
                "not ready: the {} listener cannot accept connections since {since} ({error}); it retries\n",
                listener.name
            );
            return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        }
    }
    if attached && synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = match (attached, synced) {
            (false, _) => "the eBPF programs are not attached yet",
            _ => "the inventory has not synced yet",
        };
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response()
    }
}

/// The inventory as the engine sees it, for `netiso whatif` and `netiso advise`.
async fn inventory(State(shared): State<Arc<Shared>>) -> Response {
    let dns_selector = shared
        .inventory
        .service_selector("kube-system", "kube-dns")
        .unwrap_or_else(|| [("k8s-app".to_owned(), "kube-dns".to_owned())].into());
    let status = shared.inventory.status();
    let status = Freshness { synced: status.synced, stale: status.stale };
    axum::Json(InventoryView { state: shared.inventory.cluster_state(), dns_selector, status }).into_response()
}

/// Metrics and health: for Prometheus and probes, no credentials.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

/// The query API, behind Kubernetes-delegated authentication and authorization when given.
pub fn api_router(shared: Arc<Shared>, authorizer: Option<Arc<super::auth::Authorizer>>) -> Router {
    let router = Router::new()
        .route("/v1/inventory", get(inventory))
        .route("/v1/flows", get(flows))
        .route("/v1/flows/{id}/evidence", get(evidence))
        .with_state(shared);
    match authorizer {
        Some(a) => router.layer(axum::middleware::from_fn_with_state(a, super::auth::require)),
        None => router,
    }
}

const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// Accept failures are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);

/// Whether a listener accepts connections: part of readiness, counted in the metrics.
pub struct ListenerHealth {
    pub name: &'static str,
    errors: Counter,
    state: Mutex<AcceptState>,
}

#[derive(Default)]
struct AcceptState {
    failing: Option<(SystemTime, String)>,
    logged: Option<Instant>,
}

impl ListenerHealth {
    pub fn new(name: &'static str, errors: Counter) -> Self {
        ListenerHealth { name, errors, state: Mutex::default() }
    }

    /// Since when, and why, accepting fails; None while it works.
    pub fn failing(&self) -> Option<(SystemTime, String)> {
        self.state.lock().expect("listener state").failing.clone()
    }

    fn accepted(&self) {
        let mut state = self.state.lock().expect("listener state");
        if let Some((since, _)) = state.failing.take() {
            let since = humantime::format_rfc3339_seconds(since);
            tracing::info!(listener = self.name, failing_since = %since, "accepting connections again");
        }
    }

    fn accept_failed(&self, error: &std::io::Error) {
        self.errors.inc();
        let mut state = self.state.lock().expect("listener state");
        state.failing.get_or_insert_with(|| (SystemTime::now(), error.to_string()));
        if state.logged.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
            state.logged = Some(Instant::now());
            tracing::warn!(
                listener = self.name,
                error = %error,
                "cannot accept connections; retrying (raise the open-file limit if this is EMFILE)"
            );
        }
    }
}

/// Errors of one connection that went away before it was accepted: the listener is fine.
fn connection_gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

/// Serves `router` on `listener` until `shutdown` resolves, over TLS when a configuration is given.
/// A failing accept (out of file descriptors) never ends it: it backs off and retries, marked in
/// `health` meanwhile. A connection must finish its TLS handshake, and send each request's headers
/// (idle keep-alive connections too), within `timeout`, so idle clients cannot hold descriptors;
/// responses are not limited: a follow stream stays open as long as its reader.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    health: Arc<ListenerHealth>,
    timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                health.accepted();
                backoff = ACCEPT_BACKOFF.0;
                accepted
            }
            Err(e) if connection_gone(&e) => continue,
            Err(e) => {
                health.accept_failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut shutdown => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                return connection(stream, router, peer, timeout).await;
            };
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, router, peer, timeout).await,
                Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    peer: std::net::SocketAddr,
    timeout: Duration,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeout);
    if let Err(e) = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).await {
        tracing::debug!(peer = %peer, error = %e, "API connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::record::FlowVerdict;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, parameter) in [
            (vec![("port", "eighty")], "port"),
            (vec![("verdict", "blocked")], "verdict"),
            (vec![("from-pod", "/api")], "from-pod"),
            (vec![("ip", "10.0.0.0/33")], "ip"),
            (vec![("label", "=x")], "label"),
            (vec![("not.port", "eighty")], "not.port"),
            (vec![("not.limit", "5")], "not.limit"),
            (vec![("order", "sideways")], "order"),
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "20000")], "limit"),
            (vec![("since", "yesterday-ish")], "since"),
            (vec![("since", "300000000000y")], "since"),
            (vec![("until", "300000000000y")], "until"),
            (vec![("protocol", "tcpp")], "protocol"),
            (vec![("colour", "red")], "colour"),
        ] {
            let err = parse_query(&params(&pairs)).unwrap_err();
            assert_eq!(err.parameter, parameter);
        }
    }

    #[test]
    fn good_parameters_become_a_query() {
        let (q, follow) = parse_query(&params(&[
            ("verdict", "DROPPED"),
            ("to-pod", "prod/api"),
            ("port", "8080"),
            ("since", "5m"),
            ("follow", "true"),
            ("not.namespace", "kube-system"),
            ("not.to-port", "53"),
            ("order", "oldest"),
        ]))
        .unwrap();
        assert!(follow && q.oldest_first);
        assert_eq!(q.filter.verdict, Some(FlowVerdict::Dropped));
        assert_eq!(q.filter.to_pod, Some("prod/api".parse().unwrap()));
        assert_eq!(q.filter.port, Some(8080));
        let exclude = q.exclude.unwrap();
        assert_eq!((exclude.namespace.as_deref(), exclude.to_port), (Some("kube-system"), Some(53)));
        let since = q.since.unwrap();
        let ago = SystemTime::now().duration_since(since).unwrap();
        assert!(ago >= std::time::Duration::from_secs(299) && ago <= std::time::Duration::from_secs(301));
        assert_eq!(q.limit, DEFAULT_LIMIT);
    }
}
