//! The inventory from the Kubernetes API, against a fake API server: it converges after every
//! fault (modify, delete, bookmark, `410 Gone`, the server going away and coming back), and the
//! daemon keeps capturing meanwhile, marking its records stale.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use netiso::cluster::EndpointKind;
use netiso::evidence::filter::FlowFilter;
use netiso::evidence::record::FlowVerdict;
use netiso::evidence::store::{Query, Store};
use netiso::inventory::{Inventory, Kind, kubernetes};
use serde_json::json;
use support::apiserver::{FakeApiServer, namespace, pod, policy};
use support::{connect, node_and_pod, start_daemon, tag, udp_from_pod};

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

fn who(inv: &Inventory, ip: &str) -> Option<String> {
    let (id, _) = inv.identify(ip.parse().unwrap(), 80, std::time::SystemTime::now());
    (id.kind == EndpointKind::Pod)
        .then(|| format!("{}:{}", id.pod_key().unwrap(), id.labels.unwrap().get("app").cloned().unwrap_or_default()))
}

fn lists_of(api: &FakeApiServer, resource: &str) -> usize {
    api.requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with(&format!("GET /{resource}?")) && !r.contains("watch=true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_converges_after_each_fault() {
    let mut api = FakeApiServer::start().await;
    api.apply(namespace("prod", json!({"kubernetes.io/metadata.name": "prod"})));
    api.apply(pod("prod", "api", "uid-api", "10.9.0.1", json!({"app": "api"})));
    api.apply(policy("prod", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})));

    let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let inv = Inventory::new(&Kind::ALL, Duration::from_secs(3600));
    let tasks = kubernetes::spawn(client, inv.clone());
    let long = Duration::from_secs(30);

    eventually("the first list", long, || {
        inv.status().synced && who(&inv, "10.9.0.1").as_deref() == Some("prod/api:api")
    })
    .await;
    assert_eq!(inv.cluster_state().policies.len(), 1);

    api.apply(pod("prod", "api", "uid-api", "10.9.0.1", json!({"app": "api-v2"})));
    eventually("MODIFIED arrives", long, || who(&inv, "10.9.0.1").as_deref() == Some("prod/api:api-v2")).await;

    api.apply(pod("prod", "worker", "uid-w", "10.9.0.2", json!({"app": "worker"})));
    eventually("ADDED arrives", long, || who(&inv, "10.9.0.2").is_some()).await;
    api.delete(pod("prod", "worker", "uid-w", "10.9.0.2", json!({"app": "worker"})));
    eventually("DELETED arrives", long, || who(&inv, "10.9.0.2").is_none()).await;

    api.bookmark();
    api.apply(pod("prod", "cache", "uid-c", "10.9.0.3", json!({"app": "cache"})));
    eventually("events after a BOOKMARK arrive", long, || who(&inv, "10.9.0.3").is_some()).await;

    // 410 Gone on the next watch forces a relist, which must pick up a change made meanwhile.
    let pod_lists = lists_of(&api, "api/v1/pods");
    api.expire_watches();
    eventually("a relist after 410 Gone", long, || lists_of(&api, "api/v1/pods") > pod_lists).await;
    api.apply(policy("prod", "allow", json!({"podSelector": {}, "ingress": [{}]})));
    eventually("the inventory follows the new watch", long, || inv.cluster_state().policies.len() == 2).await;

    // The server goes away: the inventory goes stale and keeps what it knew.
    api.go_away();
    eventually("the failure is noticed", long, || inv.status().stale).await;
    assert_eq!(who(&inv, "10.9.0.1").as_deref(), Some("prod/api:api-v2"), "nothing is forgotten");
    api.delete(pod("prod", "cache", "uid-c", "10.9.0.3", json!({"app": "cache"})));
    api.apply(pod("prod", "search", "uid-s", "10.9.0.4", json!({"app": "search"})));
    api.come_back().await;
    eventually("it converges when the server is back", Duration::from_secs(60), || {
        !inv.status().stale && who(&inv, "10.9.0.4").is_some() && who(&inv, "10.9.0.3").is_none()
    })
    .await;
    for t in tasks {
        assert!(!t.is_finished(), "watchers never give up");
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_continues_while_the_api_is_unreachable_and_records_say_so() {
    let tag = tag("nk");
    let (node, pod_ns, mut cleanup) = node_and_pod(&tag);
    // The daemon runs in the node namespace: the API must answer on that namespace's loopback.
    let mut api = FakeApiServer::start_in(Some(&node)).await;
    api.apply(namespace("shop", json!({"kubernetes.io/metadata.name": "shop"})));
    api.apply(pod("shop", "client", "uid-client", "10.77.0.2", json!({"app": "client"})));
    let kubeconfig = std::env::temp_dir().join(format!("{tag}.kubeconfig"));
    let store_path = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.extend([kubeconfig.clone(), store_path.clone()]);
    api.kubeconfig(&kubeconfig);
    connect(&node, &pod_ns);

    let daemon = Arc::new(std::sync::Mutex::new(start_daemon(
        &node,
        &store_path,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--drain-interval", "200ms", "--node-name", "n1"],
    )));
    let listed = daemon.lock().unwrap().wait_log("listed", Duration::from_secs(20));
    assert!(listed, "{:#?}", daemon.lock().unwrap().diagnostics());
    tokio::time::sleep(Duration::from_millis(500)).await;
    udp_from_pod(&pod_ns, 41001, 9001);
    tokio::time::sleep(Duration::from_millis(800)).await;

    api.go_away();
    assert!(daemon.lock().unwrap().wait_log("watch failed", Duration::from_secs(30)), "the failure is logged");
    udp_from_pod(&pod_ns, 41002, 9002);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(daemon.lock().unwrap().is_running(), "the daemon never exits for an API outage");

    api.come_back().await;
    assert!(daemon.lock().unwrap().wait_log("inventory is fresh again", Duration::from_secs(40)));
    udp_from_pod(&pod_ns, 41003, 9003);
    tokio::time::sleep(Duration::from_millis(800)).await;
    daemon.lock().unwrap().stop().unwrap();

    let store = Store::open(&store_path, Default::default()).unwrap();
    let dropped = store
        .query(&Query {
            filter: FlowFilter {
                verdict: Some(FlowVerdict::Dropped),
                from_pod: Some("shop/client".parse().unwrap()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    let by_port = |p: u16| {
        dropped
            .iter()
            .find(|r| r.destination.port == p)
            .unwrap_or_else(|| panic!("no record for port {p}: {dropped:#?}"))
    };
    assert_eq!(by_port(9001).reason.as_deref(), Some("NO_SOCKET"));
    assert!(!by_port(9001).inventory_stale);
    assert!(by_port(9002).inventory_stale, "made while the API was unreachable");
    assert_eq!(by_port(9002).source.pod.as_deref(), Some("client"), "named from what was known");
    assert!(!by_port(9003).inventory_stale, "fresh again once the API is back");
    assert_eq!(by_port(9003).node, "n1");
}
