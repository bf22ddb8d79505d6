//! Who is on each end of a flow: namespaces, pods (with their workloads), NetworkPolicies,
//! Services and nodes, from the Kubernetes API or from manifests, behind one interface. Keeps
//! who held each IP address when, so late or racing events are attributed correctly.

pub mod kubernetes;
pub mod manifests;
mod state;
pub mod timeline;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use serde::{Deserialize, Serialize};

use self::state::State;
use self::timeline::PodSnapshot;
use crate::cluster::{ClusterState, EndpointKind, Identity, Labels, NodeInfo, PolicyRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    Node,
    ReplicaSet,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::Service, Kind::Node, Kind::ReplicaSet];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Service => "services",
            Kind::Node => "nodes",
            Kind::ReplicaSet => "replicasets",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
    Service(Service),
    Node(Node),
    ReplicaSet(ReplicaSet),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Service(_) => Kind::Service,
            Object::Node(_) => Kind::Node,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Change {
    Apply(Object),
    Delete(Object),
    /// The complete current set of one kind (a list or relist, or a reloaded manifest).
    Replace(Kind, Vec<Object>),
}

/// Health of the inventory, for readiness, metrics and records.
#[derive(Clone, Debug, PartialEq)]
pub struct InventoryStatus {
    /// Every required kind has been listed at least once.
    pub synced: bool,
    /// A source is failing: records made now may name ends from an outdated view.
    pub stale: bool,
    pub objects: BTreeMap<&'static str, usize>,
    pub last_sync: Option<SystemTime>,
}

/// `GET /v1/inventory`, for `netiso whatif` and `netiso advise`: the cluster as the engine sees
/// it (namespaces, pods, the NetworkPolicies in force), and the kube-dns Service's selector.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InventoryView {
    #[serde(flatten)]
    pub state: ClusterState,
    pub dns_selector: Labels,
    pub status: Freshness,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Freshness {
    pub synced: bool,
    pub stale: bool,
}

pub struct Inventory {
    state: RwLock<State>,
    required: Vec<Kind>,
    /// How long ended IP holdings are kept (the evidence retention).
    history: Duration,
    /// Node addresses and ClusterIPs by address, for the state's generation they were built from.
    addresses: Mutex<Option<(u64, Arc<AddressIndex>)>>,
}

/// What an address that no pod holds belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AddressOwner {
    Node(String),
    /// `namespace/name`.
    Service(String),
}

type AddressIndex = HashMap<IpAddr, AddressOwner>;

fn log_freshness(was_stale: bool, stale: bool) {
    match (was_stale, stale) {
        (false, true) => tracing::warn!("inventory is stale: records name ends from the last known state"),
        (true, false) => tracing::info!("inventory is fresh again"),
        _ => {}
    }
}

impl Inventory {
    /// An inventory that is synced once every kind in `required` has been listed.
    pub fn new(required: &[Kind], history: Duration) -> Arc<Self> {
        Arc::new(Inventory {
            state: RwLock::default(),
            required: required.to_vec(),
            history,
            addresses: Mutex::default(),
        })
    }

    pub fn apply(&self, change: Change) {
        self.apply_at(change, SystemTime::now());
    }

    pub fn apply_at(&self, change: Change, at: SystemTime) {
        let mut s = self.state.write().expect("inventory lock");
        match change {
            Change::Apply(o) => s.apply(o, at),
            Change::Delete(o) => s.delete(&o, at),
            Change::Replace(kind, objects) => {
                s.replace(kind, objects, at);
                s.synced.insert(kind);
            }
        }
        s.generation += 1;
        s.last_sync = Some(at);
        s.timeline.prune(at, self.history);
    }

    /// The node netiso runs on and its interfaces' addresses, which are that node's own.
    pub fn set_local_node(&self, node: NodeInfo) {
        let mut s = self.state.write().expect("inventory lock");
        if s.local_node.as_ref() != Some(&node) {
            s.local_node = Some(node);
            s.generation += 1;
        }
    }

    /// A source for `kind` is failing (`true`) or working again (`false`).
    pub fn set_stale(&self, kind: Kind, stale: bool) {
        let mut s = self.state.write().expect("inventory lock");
        let was_stale = !s.stale.is_empty();
        if stale {
            s.stale.insert(kind, Instant::now());
        } else {
            s.stale.remove(&kind);
        }
        log_freshness(was_stale, !s.stale.is_empty());
    }

    /// The source answers again: kinds that have not failed for `quiet` are no longer stale
    /// (a quiet kind's watch produces no event to say it recovered).
    pub fn clear_stale_quiet_for(&self, quiet: Duration) {
        let mut s = self.state.write().expect("inventory lock");
        let was_stale = !s.stale.is_empty();
        s.stale.retain(|_, last| last.elapsed() < quiet);
        log_freshness(was_stale, !s.stale.is_empty());
    }

    pub fn status(&self) -> InventoryStatus {
        let s = self.state.read().expect("inventory lock");
        InventoryStatus {
            synced: self.required.iter().all(|k| s.synced.contains(k)),
            stale: !s.stale.is_empty(),
            objects: BTreeMap::from([
                (Kind::Namespace.as_str(), s.namespaces.len()),
                (Kind::Pod.as_str(), s.pods.len()),
                (Kind::NetworkPolicy.as_str(), s.policies.len()),
                (Kind::Service.as_str(), s.services.len()),
                (Kind::Node.as_str(), s.nodes.len()),
                (Kind::ReplicaSet.as_str(), s.replicasets.len()),
            ]),
            last_sync: s.last_sync,
        }
    }

    /// The cluster's Node names, once the nodes have been listed and while their source works;
    /// None before (or while stale), so that nothing is concluded from a partial view.
    pub fn node_names(&self) -> Option<std::collections::BTreeSet<String>> {
        let s = self.state.read().expect("inventory lock");
        let current = s.synced.contains(&Kind::Node) && !s.stale.contains_key(&Kind::Node);
        current.then(|| s.nodes.keys().cloned().collect())
    }

    /// A counter that moves on every change, for caches of what is derived from the state.
    pub fn generation(&self) -> u64 {
        self.state.read().expect("inventory lock").generation
    }

    /// The cluster as it is now, plus those of `pods` deleted or replaced since their snapshot
    /// (a flow is judged with the pods as they were); None when every one is current.
    pub fn cluster_state_with_departed(&self, pods: &[&PodSnapshot]) -> Option<ClusterState> {
        let s = self.state.read().expect("inventory lock");
        let departed = pods.iter().any(|p| {
            s.pods
                .get(&(p.info.namespace.clone(), p.info.name.clone()))
                .is_none_or(|current| State::pod_uid(current) != p.uid)
        });
        departed.then(|| s.cluster_state(pods))
    }

    /// Who held `ip` at `at`: the pod (with its snapshot, for evaluation), or a node, Service or
    /// the world.
    pub fn identify(&self, ip: IpAddr, port: u16, at: SystemTime) -> (Identity, Option<Arc<PodSnapshot>>) {
        let s = self.state.read().expect("inventory lock");
        if let Some(pod) = s.timeline.holder(ip, at) {
            let identity = Identity {
                kind: EndpointKind::Pod,
                namespace: Some(pod.info.namespace.clone()),
                pod: Some(pod.info.name.clone()),
                workload: pod.workload.as_ref().map(|w| format!("{}/{}", w.kind, w.name)),
                labels: Some(pod.info.labels.clone()),
                node: pod.info.node.clone(),
                service: None,
                ip,
                port,
            };
            return (identity, Some(pod));
        }
        let mut id = Identity::world(ip, port);
        match self.address_index(&s).get(&ip) {
            Some(AddressOwner::Node(node)) => {
                id.kind = EndpointKind::Node;
                id.node = Some(node.clone());
            }
            Some(AddressOwner::Service(service)) => {
                id.kind = EndpointKind::Service;
                id.namespace = service.split('/').next().map(str::to_owned);
                id.service = Some(service.clone());
            }
            None => {}
        }
        (id, None)
    }

    /// The node addresses and ClusterIPs of `s`, built once per generation of the state rather
    /// than searched for every flow (finding a node's addresses reads every pod).
    fn address_index(&self, s: &State) -> Arc<AddressIndex> {
        let mut cached = self.addresses.lock().expect("address index lock");
        if let Some((generation, index)) = cached.as_ref()
            && *generation == s.generation
        {
            return index.clone();
        }
        let mut index = AddressIndex::new();
        for ((namespace, name), service) in &s.services {
            let Some(spec) = service.spec.as_ref() else { continue };
            for ip in spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()) {
                if let Ok(ip) = ip.parse() {
                    index.insert(ip, AddressOwner::Service(format!("{namespace}/{name}")));
                }
            }
        }
        // A node's address wins over a ClusterIP that claims it too.
        for node in s.nodes() {
            for ip in node.addresses {
                index.insert(ip, AddressOwner::Node(node.name.clone()));
            }
        }
        let index = Arc::new(index);
        *cached = Some((s.generation, index.clone()));
        index
    }

    /// The engine's view of the whole cluster now (for what-if and advice elsewhere).
    pub fn cluster_state(&self) -> ClusterState {
        self.state.read().expect("inventory lock").cluster_state(&[])
    }

    /// The selector of Service `namespace/name`, if it exists and has one.
    pub fn service_selector(&self, namespace: &str, name: &str) -> Option<Labels> {
        let s = self.state.read().expect("inventory lock");
        s.services.get(&(namespace.to_owned(), name.to_owned()))?.spec.as_ref()?.selector.clone()
    }

    /// How many pods Service `namespace/name` selects now (its endpoints, by selector); None
    /// for an unknown Service or one without a selector (its endpoints are managed by hand).
    pub fn service_endpoints(&self, namespace: &str, name: &str) -> Option<usize> {
        let s = self.state.read().expect("inventory lock");
        let selector = s.services.get(&(namespace.to_owned(), name.to_owned()))?.spec.as_ref()?.selector.clone()?;
        let selected = s.pods.values().filter_map(|p| manifests::pod_info(p).ok()).filter(|p| {
            p.namespace == namespace && !p.ips.is_empty() && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        });
        Some(selected.count())
    }

    /// The policy objects as they are now, for evidence.
    pub fn policy_objects(&self, refs: &[PolicyRef]) -> Vec<NetworkPolicy> {
        let s = self.state.read().expect("inventory lock");
        refs.iter().filter_map(|r| s.policies.get(&(r.namespace.clone(), r.name.clone())).cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": uid,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"), "uid": "rs", "controller": true}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000 + secs)
    }

    #[test]
    fn a_drop_while_pod_a_held_the_address_is_attributed_to_a_after_b_took_it() {
        let inv = Inventory::new(&[Kind::Pod], Duration::from_secs(86400));
        let a = pod("shop", "cart", "uid-a", "10.1.1.1", &[("app", "cart")]);
        inv.apply_at(Change::Replace(Kind::Pod, vec![Object::Pod(a.clone())]), at(0));
        inv.apply_at(Change::Delete(Object::Pod(a)), at(100));
        inv.apply_at(
            Change::Apply(Object::Pod(pod("shop", "search", "uid-b", "10.1.1.1", &[("app", "search")]))),
            at(110),
        );
        let ip = "10.1.1.1".parse().unwrap();
        let (then, snapshot) = inv.identify(ip, 80, at(50));
        assert_eq!(then.pod.as_deref(), Some("cart"));
        assert_eq!(then.labels.unwrap()["app"], "cart");
        let (now, _) = inv.identify(ip, 80, at(120));
        assert_eq!(now.pod.as_deref(), Some("search"));
        // The deleted pod can still be evaluated.
        let snapshot = snapshot.unwrap();
        let then = inv.cluster_state_with_departed(&[&snapshot]).expect("cart has departed");
        assert!(then.pods.iter().any(|p| p.name == "cart"));
        assert!(!inv.cluster_state().pods.iter().any(|p| p.name == "cart"));
    }

    #[test]
    fn workloads_follow_replicasets_to_their_deployment() {
        let inv = Inventory::new(&[Kind::Pod, Kind::ReplicaSet], Duration::from_secs(60));
        let rs: ReplicaSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-rs", "namespace": "shop",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "cart", "uid": "d", "controller": true}]}
        }))
        .unwrap();
        inv.apply(Change::Replace(Kind::ReplicaSet, vec![Object::ReplicaSet(rs)]));
        inv.apply(Change::Replace(Kind::Pod, vec![Object::Pod(pod("shop", "cart", "u", "10.1.1.2", &[]))]));
        assert!(inv.status().synced);
        let (id, _) = inv.identify("10.1.1.2".parse().unwrap(), 1, SystemTime::now());
        assert_eq!(id.workload.as_deref(), Some("Deployment/cart"));
    }

    #[test]
    fn nodes_services_and_the_world() {
        let inv = Inventory::new(&[], Duration::from_secs(60));
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "worker-1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}
        }))
        .unwrap();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "prod"}, "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}
        }))
        .unwrap();
        inv.apply(Change::Apply(Object::Node(node)));
        inv.apply(Change::Apply(Object::Service(svc)));
        let now = SystemTime::now();
        assert_eq!(inv.identify("192.168.1.10".parse().unwrap(), 1, now).0.node.as_deref(), Some("worker-1"));
        let (svc, _) = inv.identify("10.96.0.10".parse().unwrap(), 80, now);
        assert_eq!((svc.kind, svc.service.as_deref()), (EndpointKind::Service, Some("prod/api")));
        assert_eq!(inv.identify("203.0.113.1".parse().unwrap(), 1, now).0.kind, EndpointKind::World);
    }

    #[test]
    fn node_names_are_known_once_listed_and_while_fresh() {
        let inv = Inventory::new(&[Kind::Node], Duration::from_secs(60));
        let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "worker-1"}})).unwrap();
        inv.apply(Change::Apply(Object::Node(node.clone())));
        assert_eq!(inv.node_names(), None, "a watch event before the list says nothing of the others");
        inv.apply(Change::Replace(Kind::Node, vec![Object::Node(node)]));
        assert_eq!(inv.node_names(), Some(["worker-1".to_owned()].into()));
        inv.set_stale(Kind::Node, true);
        assert_eq!(inv.node_names(), None);
    }

    #[test]
    fn addresses_follow_the_objects_that_own_them() {
        let inv = Inventory::new(&[], Duration::from_secs(60));
        let ip = "10.96.0.77".parse().unwrap();
        let kind = |inv: &Inventory| inv.identify(ip, 80, SystemTime::now()).0.kind;
        assert_eq!(kind(&inv), EndpointKind::World);
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "late", "namespace": "prod"}, "spec": {"clusterIP": "10.96.0.77"}
        }))
        .unwrap();
        inv.apply(Change::Apply(Object::Service(svc.clone())));
        assert_eq!(kind(&inv), EndpointKind::Service, "a Service created after the address was looked up");
        inv.apply(Change::Delete(Object::Service(svc)));
        assert_eq!(kind(&inv), EndpointKind::World, "and gone with it");
        inv.set_local_node(NodeInfo { name: "self".into(), addresses: vec![ip] });
        assert_eq!(kind(&inv), EndpointKind::Node, "the node's own interface address");
    }

    #[test]
    fn the_local_nodes_interface_addresses_and_host_network_pods_are_its_own() {
        let inv = Inventory::new(&[], Duration::from_secs(60));
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "worker-1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}
        }))
        .unwrap();
        let agent: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agent", "namespace": "kube-system"},
            "spec": {"nodeName": "worker-2", "hostNetwork": true, "containers": []},
            "status": {"podIP": "192.168.1.20"}
        }))
        .unwrap();
        inv.apply(Change::Apply(Object::Node(node)));
        inv.apply(Change::Apply(Object::Pod(agent)));
        let before = inv.generation();
        let bridge: IpAddr = "10.244.0.1".parse().unwrap();
        inv.set_local_node(NodeInfo { name: "worker-1".into(), addresses: vec![bridge] });
        assert!(inv.generation() > before, "engines built before see the new addresses");
        let (id, _) = inv.identify(bridge, 1, SystemTime::now());
        assert_eq!((id.kind, id.node.as_deref()), (EndpointKind::Node, Some("worker-1")));
        let nodes = inv.cluster_state().nodes;
        let addresses = |name: &str| nodes.iter().find(|n| n.name == name).map(|n| n.addresses.clone());
        assert_eq!(addresses("worker-1"), Some(vec!["192.168.1.10".parse().unwrap(), bridge]));
        assert_eq!(addresses("worker-2"), Some(vec!["192.168.1.20".parse().unwrap()]));
    }

    #[test]
    fn a_relist_releases_pods_that_are_gone() {
        let inv = Inventory::new(&[Kind::Pod], Duration::from_secs(86400));
        inv.apply_at(Change::Replace(Kind::Pod, vec![Object::Pod(pod("a", "p", "u1", "10.2.0.1", &[]))]), at(0));
        inv.apply_at(Change::Replace(Kind::Pod, vec![]), at(10));
        let ip = "10.2.0.1".parse().unwrap();
        assert_eq!(inv.identify(ip, 1, at(5)).0.pod.as_deref(), Some("p"));
        assert_eq!(inv.identify(ip, 1, at(15)).0.kind, EndpointKind::World);
    }
}
