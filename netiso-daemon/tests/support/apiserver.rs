//! A fake Kubernetes API server for tests: list and watch (with resourceVersion, ADDED /
//! MODIFIED / DELETED / BOOKMARK events and `410 Gone`) for the kinds netiso watches, get and
//! merge-patch of ConfigMaps, TokenReview, SubjectAccessReview and the pod proxy, and faults on
//! demand: expire watches, go away, come back on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// (list path, kind)
pub const RESOURCES: &[(&str, &str)] = &[
    ("api/v1/namespaces", "Namespace"),
    ("api/v1/pods", "Pod"),
    ("api/v1/services", "Service"),
    ("api/v1/nodes", "Node"),
    ("apis/networking.k8s.io/v1/networkpolicies", "NetworkPolicy"),
    ("apis/apps/v1/replicasets", "ReplicaSet"),
    ("api/v1/configmaps", "ConfigMap"),
];

#[derive(Default)]
struct Objects {
    resource_version: u64,
    /// resource → (namespace/name → object)
    by_resource: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every event so far: (resourceVersion, resource, event JSON), for watches that resume.
    log: Vec<(u64, String, Value)>,
    /// Bearer tokens the fake TokenReview accepts: token → (username, groups).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// Users the fake SubjectAccessReview allows (`get nodes/proxy`).
    grants: std::collections::BTreeSet<String>,
    /// TokenReviews and SubjectAccessReviews received.
    reviews: usize,
    /// Reviews received and never answered, as an overloaded API server does.
    stall_reviews: bool,
    /// Resources whose next watch is answered with `410 Gone`.
    expire_watches: std::collections::BTreeSet<String>,
    /// Pod proxy: "namespace/name:port" → the address the request is forwarded to.
    proxies: BTreeMap<String, SocketAddr>,
}

#[derive(Clone)]
struct Shared {
    objects: Arc<Mutex<Objects>>,
    events: broadcast::Sender<(u64, String, Value)>,
    /// The network namespace the server answers in (pod proxy upstreams are there too).
    netns: Option<String>,
}

pub struct FakeApiServer {
    shared: Shared,
    pub addr: SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Requests served, as "METHOD path?query".
    pub requests: Arc<Mutex<Vec<String>>>,
    netns: Option<String>,
}

fn resource_of(path: &str) -> Option<&'static str> {
    RESOURCES.iter().map(|(p, _)| *p).find(|p| *p == path)
}

fn kind_of(resource: &str) -> &'static str {
    RESOURCES.iter().find(|(p, _)| *p == resource).map(|(_, k)| *k).unwrap_or("Unknown")
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!("{}/{}", meta["namespace"].as_str().unwrap_or(""), meta["name"].as_str().unwrap_or(""))
}

/// POST of a TokenReview or SubjectAccessReview: answered from the configured tokens and grants.
async fn review(
    State((shared, requests)): State<(Shared, Arc<Mutex<Vec<String>>>)>,
    Path(path): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    requests.lock().unwrap().push(format!("POST /{path}"));
    let stall = {
        let mut objects = shared.objects.lock().unwrap();
        objects.reviews += 1;
        objects.stall_reviews
    };
    if stall {
        return std::future::pending().await;
    }
    let objects = shared.objects.lock().unwrap();
    match path.as_str() {
        "apis/authentication.k8s.io/v1/tokenreviews" => {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let status = match objects.tokens.get(token) {
                Some((user, groups)) => {
                    json!({"authenticated": true, "user": {"username": user, "groups": groups, "uid": format!("uid-{user}")}})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            axum::Json(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": body["spec"], "status": status})).into_response()
        }
        "apis/authorization.k8s.io/v1/subjectaccessreviews" => {
            let user = body["spec"]["user"].as_str().unwrap_or_default();
            let attrs = &body["spec"]["resourceAttributes"];
            let asks_node_proxy =
                attrs["verb"] == "get" && attrs["resource"] == "nodes" && attrs["subresource"] == "proxy";
            let allowed = asks_node_proxy && objects.grants.contains(user);
            let reason = if allowed { "granted" } else { "no RBAC rule" };
            axum::Json(json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {}, "spec": body["spec"], "status": {"allowed": allowed, "reason": reason}})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"kind": "Status", "code": 404}))).into_response(),
    }
}

/// `namespace/name` of a ConfigMap's path.
fn configmap_key(path: &str) -> Option<String> {
    let rest = path.strip_prefix("api/v1/namespaces/")?;
    let (namespace, name) = rest.split_once("/configmaps/")?;
    Some(format!("{namespace}/{name}"))
}

fn not_found(what: &str) -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")});
    (StatusCode::NOT_FOUND, axum::Json(status)).into_response()
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("an object");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// PATCH (merge patch) of a ConfigMap, recorded as a MODIFIED event.
async fn patch(
    State((shared, requests)): State<(Shared, Arc<Mutex<Vec<String>>>)>,
    Path(path): Path<String>,
    body: Bytes,
) -> Response {
    requests.lock().unwrap().push(format!("PATCH /{path}"));
    let Some(key) = configmap_key(&path) else {
        return not_found(&path);
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let mut objects = shared.objects.lock().unwrap();
    let Some(object) = objects.by_resource.get_mut("api/v1/configmaps").and_then(|m| m.get_mut(&key)) else {
        return not_found(&key);
    };
    merge(object, &patch);
    let mut patched = object.clone();
    objects.resource_version += 1;
    let rv = objects.resource_version;
    patched["metadata"]["resourceVersion"] = json!(rv.to_string());
    objects.by_resource.get_mut("api/v1/configmaps").unwrap().insert(key, patched.clone());
    let event = json!({"type": "MODIFIED", "object": patched});
    objects.log.push((rv, "api/v1/configmaps".into(), event.clone()));
    let _ = shared.events.send((rv, "api/v1/configmaps".into(), event));
    axum::Json(patched).into_response()
}

async fn handle(
    State((shared, requests)): State<(Shared, Arc<Mutex<Vec<String>>>)>,
    Path(path): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    requests
        .lock()
        .unwrap()
        .push(format!("GET /{path}?{}", query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")));
    if path == "version" {
        return axum::Json(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "0", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1", "compiler": "gc", "platform": "linux/amd64"
        }))
        .into_response();
    }
    // Namespaced list: /api/v1/namespaces/NS/pods?labelSelector=k=v
    if let Some(rest) = path.strip_prefix("api/v1/namespaces/")
        && let Some((ns, "pods")) = rest.split_once('/')
    {
        let selector: Vec<(String, String)> = query
            .get("labelSelector")
            .map(|s| {
                s.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
            })
            .unwrap_or_default();
        let objects = shared.objects.lock().unwrap();
        let items: Vec<Value> = objects
            .by_resource
            .get("api/v1/pods")
            .map(|m| {
                m.values()
                    .filter(|p| p["metadata"]["namespace"] == ns)
                    .filter(|p| selector.iter().all(|(k, v)| p["metadata"]["labels"][k] == v.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        return axum::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": objects.resource_version.to_string()}, "items": items})).into_response();
    }
    // One ConfigMap: /api/v1/namespaces/NS/configmaps/NAME
    if let Some(key) = configmap_key(&path) {
        let objects = shared.objects.lock().unwrap();
        return match objects.by_resource.get("api/v1/configmaps").and_then(|m| m.get(&key)) {
            Some(object) => axum::Json(object.clone()).into_response(),
            None => not_found(&key),
        };
    }
    // Pod proxy: /api/v1/namespaces/NS/pods/NAME:PORT/proxy/REST
    if let Some(rest) = path.strip_prefix("api/v1/namespaces/")
        && let Some((target, tail)) = rest.split_once("/proxy")
        && let Some((ns, pod)) = target.split_once("/pods/")
    {
        let upstream = shared.objects.lock().unwrap().proxies.get(&format!("{ns}/{pod}")).copied();
        let Some(upstream) = upstream else {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"kind": "Status", "code": 404, "message": "no such pod"})),
            )
                .into_response();
        };
        let query_string: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path = format!("{tail}?{}", query_string.join("&"));
        let netns = shared.netns.clone();
        let body = tokio::task::spawn_blocking(move || proxy_get(upstream, &path, netns.as_deref())).await.unwrap();
        return match body {
            Ok((status, body)) => (StatusCode::from_u16(status).unwrap(), body).into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        };
    }
    let Some(resource) = resource_of(&path) else {
        return (StatusCode::NOT_FOUND, axum::Json(json!({"kind": "Status", "code": 404}))).into_response();
    };
    if query.get("watch").map(String::as_str) != Some("true") {
        let objects = shared.objects.lock().unwrap();
        let items: Vec<Value> =
            objects.by_resource.get(resource).map(|m| m.values().cloned().collect()).unwrap_or_default();
        return axum::Json(json!({
            "apiVersion": "v1",
            "kind": format!("{}List", kind_of(resource)),
            "metadata": {"resourceVersion": objects.resource_version.to_string()},
            "items": items,
        }))
        .into_response();
    }
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64).min(5);
    let (backlog, mut live, expire) = {
        let mut objects = shared.objects.lock().unwrap();
        let expire = objects.expire_watches.remove(resource);
        let backlog: Vec<Value> =
            objects.log.iter().filter(|(rv, r, _)| *rv > since && r == resource).map(|(_, _, e)| e.clone()).collect();
        (backlog, shared.events.subscribe(), expire)
    };
    let resource = resource.to_owned();
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>| async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(Bytes::from(format!("{v}\n")))).await.is_ok() }
        };
        if expire {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
            send(gone).await;
            return;
        }
        for event in backlog {
            if !send(event).await {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            match tokio::time::timeout_at(deadline, live.recv()).await {
                Ok(Ok((rv, r, event))) if r == resource && rv > since => {
                    if !send(event).await {
                        return;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                // Timed out (the watch ends, as real ones do) or the server is going away.
                _ => return,
            }
        }
    });
    Response::builder().header("content-type", "application/json").body(Body::from_stream(stream)).unwrap()
}

/// The pod proxy's upstream request (plain HTTP/1.0 GET).
fn proxy_get(upstream: SocketAddr, path: &str, netns: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let name = netns.map(str::to_owned);
    let mut stream = std::thread::spawn(move || {
        if let Some(name) = name {
            let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        }
        std::net::TcpStream::connect(upstream)
    })
    .join()
    .expect("connect thread")?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {upstream}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(502);
    Ok((status, body.to_owned()))
}

/// A body stream fed by a task.
fn async_stream<F, Fut>(f: F) -> tokio_stream_shim::ReceiverStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream_shim::ReceiverStream(rx)
}

mod tokio_stream_shim {
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::body::Bytes;

    pub struct ReceiverStream(pub tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>);

    impl futures::Stream for ReceiverStream {
        type Item = Result<Bytes, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

/// Binds a TCP listener on `addr`, inside network namespace `netns` when given (a socket keeps
/// the namespace it was created in, so the server thread itself stays where it is).
fn bind(addr: SocketAddr, netns: Option<&str>) -> std::io::Result<tokio::net::TcpListener> {
    let listener = match netns {
        None => std::net::TcpListener::bind(addr)?,
        Some(name) => {
            let name = name.to_owned();
            std::thread::spawn(move || {
                let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                std::net::TcpListener::bind(addr)
            })
            .join()
            .expect("bind thread")?
        }
    };
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

impl FakeApiServer {
    pub async fn start() -> Self {
        Self::start_in(None).await
    }

    /// Serves on 127.0.0.1 of network namespace `netns` (where the daemon under test runs).
    pub async fn start_in(netns: Option<&str>) -> Self {
        let (events, _) = broadcast::channel(1024);
        let shared = Shared { objects: Arc::default(), events, netns: netns.map(str::to_owned) };
        let listener = bind("127.0.0.1:0".parse().unwrap(), netns).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server =
            FakeApiServer { shared, addr, server: None, requests: Arc::default(), netns: netns.map(str::to_owned) };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/{*path}", get(handle).post(review).patch(patch))
            .with_state((self.shared.clone(), self.requests.clone()));
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Stops answering: the port refuses connections until [`FakeApiServer::come_back`].
    pub fn go_away(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    pub async fn come_back(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match bind(self.addr, self.netns.as_deref()) {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// TokenReview accepts `token` as `user` (in `groups`).
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        self.shared.objects.lock().unwrap().tokens.insert(token.into(), (user.into(), groups));
    }

    /// SubjectAccessReview allows (or no longer allows) `user` to get nodes/proxy.
    pub fn grant(&self, user: &str, allowed: bool) {
        let mut objects = self.shared.objects.lock().unwrap();
        if allowed {
            objects.grants.insert(user.into());
        } else {
            objects.grants.remove(user);
        }
    }

    /// Reviews are received and never answered (true), or answered again (false).
    pub fn stall_reviews(&self, stall: bool) {
        self.shared.objects.lock().unwrap().stall_reviews = stall;
    }

    /// The pod proxy forwards requests for `namespace/name:port` to `upstream`.
    pub fn proxy(&self, pod_and_port: &str, upstream: SocketAddr) {
        self.shared.objects.lock().unwrap().proxies.insert(pod_and_port.into(), upstream);
    }

    /// Reviews answered so far.
    pub fn reviews(&self) -> usize {
        self.shared.objects.lock().unwrap().reviews
    }

    /// The next watch of every resource gets `410 Gone`, forcing a relist.
    pub fn expire_watches(&self) {
        self.shared.objects.lock().unwrap().expire_watches = RESOURCES.iter().map(|(r, _)| r.to_string()).collect();
    }

    fn record(&self, resource: &str, event_type: &str, mut object: Value) {
        let mut objects = self.shared.objects.lock().unwrap();
        objects.resource_version += 1;
        let rv = objects.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&object);
        let map = objects.by_resource.entry(resource.to_owned()).or_default();
        if event_type == "DELETED" {
            map.remove(&k);
        } else {
            map.insert(k, object.clone());
        }
        let event = json!({"type": event_type, "object": object});
        objects.log.push((rv, resource.to_owned(), event.clone()));
        let _ = self.shared.events.send((rv, resource.to_owned(), event));
    }

    /// Adds or replaces an object (`kind` picks the resource).
    pub fn apply(&self, object: Value) {
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let resource = RESOURCES.iter().find(|(_, k)| *k == kind).map(|(r, _)| *r).expect("known kind");
        let exists = self
            .shared
            .objects
            .lock()
            .unwrap()
            .by_resource
            .get(resource)
            .is_some_and(|m| m.contains_key(&key(&object)));
        self.record(resource, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    pub fn delete(&self, object: Value) {
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let resource = RESOURCES.iter().find(|(_, k)| *k == kind).map(|(r, _)| *r).expect("known kind");
        self.record(resource, "DELETED", object);
    }

    /// A BOOKMARK for every resource (watchers must accept and skip them).
    pub fn bookmark(&self) {
        let rv = self.shared.objects.lock().unwrap().resource_version;
        for (resource, kind) in RESOURCES {
            let event = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
            let _ = self.shared.events.send((rv, resource.to_string(), event));
        }
    }

    /// An object as the server holds it now (`namespace/name`, or `/name` for cluster objects).
    pub fn object(&self, kind: &str, key: &str) -> Option<Value> {
        let resource = RESOURCES.iter().find(|(_, k)| *k == kind).map(|(r, _)| *r).expect("known kind");
        self.shared.objects.lock().unwrap().by_resource.get(resource).and_then(|m| m.get(key)).cloned()
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        self.kubeconfig_with_token(path, None);
    }

    /// Writes a kubeconfig for this server to `path` whose user presents `token`.
    pub fn kubeconfig_with_token(&self, path: &std::path::Path, token: Option<&str>) {
        let user = token.map_or("{}".to_owned(), |t| format!("\n    token: {t}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {user}\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.go_away();
    }
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}})
}

pub fn pod(ns: &str, name: &str, uid: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns, "uid": format!("np-{ns}-{name}")}, "spec": spec})
}
