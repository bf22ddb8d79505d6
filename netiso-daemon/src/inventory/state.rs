//! The inventory's objects as last seen, by kind and key, and who held each IP address when:
//! changes applied, deleted or replaced wholesale (a relist), and the cluster as the policy
//! engine sees it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::timeline::{IpTimeline, PodSnapshot};
use super::{Kind, Object, manifests};
use crate::cluster::{ClusterState, NamespaceInfo, NodeInfo, PodInfo, Workload};

type Key = (String, String);

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

#[derive(Default)]
pub(super) struct State {
    pub(super) namespaces: BTreeMap<String, Namespace>,
    pub(super) pods: BTreeMap<Key, Pod>,
    pub(super) policies: BTreeMap<Key, NetworkPolicy>,
    pub(super) services: BTreeMap<Key, Service>,
    pub(super) nodes: BTreeMap<String, Node>,
    pub(super) replicasets: BTreeMap<Key, ReplicaSet>,
    pub(super) timeline: IpTimeline,
    /// Moves on every change.
    pub(super) generation: u64,
    pub(super) synced: HashSet<Kind>,
    /// Kinds whose source is failing, with the time of their latest failure.
    pub(super) stale: std::collections::HashMap<Kind, Instant>,
    pub(super) last_sync: Option<SystemTime>,
    /// The node netiso runs on, with its interfaces' addresses (no Node object lists them all:
    /// the kubelet's probes come from a bridge or veth address).
    pub(super) local_node: Option<NodeInfo>,
}

fn workload_of(pod: &Pod, replicasets: &BTreeMap<Key, ReplicaSet>) -> Option<Workload> {
    let owners = pod.metadata.owner_references.as_ref()?;
    let owner = owners.iter().find(|o| o.controller == Some(true)).or_else(|| owners.first())?;
    if owner.kind == "ReplicaSet" {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        if let Some(rs) = replicasets.get(&(namespace, owner.name.clone()))
            && let Some(parent) = rs.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true))
        {
            return Some(Workload { kind: parent.kind.clone(), name: parent.name.clone() });
        }
    }
    Some(Workload { kind: owner.kind.clone(), name: owner.name.clone() })
}

fn start_time(pod: &Pod) -> Option<SystemTime> {
    let t = pod.status.as_ref()?.start_time.as_ref()?;
    let secs = t.0.as_second();
    (secs > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
}

impl State {
    pub(super) fn snapshot(&self, pod: &Pod, info: PodInfo) -> Arc<PodSnapshot> {
        Arc::new(PodSnapshot {
            uid: pod.metadata.uid.clone().unwrap_or_else(|| format!("{}/{}", info.namespace, info.name)),
            workload: workload_of(pod, &self.replicasets),
            info,
        })
    }

    pub(super) fn track_pod(&mut self, pod: &Pod, at: SystemTime) {
        let Ok(info) = manifests::pod_info(pod) else { return };
        let ips = if info.host_network { Vec::new() } else { info.ips.clone() };
        let snapshot = self.snapshot(pod, info);
        self.timeline.update(snapshot, &ips, at, start_time(pod));
    }

    pub(super) fn pod_uid(pod: &Pod) -> String {
        pod.metadata.uid.clone().unwrap_or_else(|| {
            let (ns, name) = key(&pod.metadata);
            format!("{ns}/{name}")
        })
    }

    pub(super) fn apply(&mut self, object: Object, at: SystemTime) {
        match object {
            Object::Namespace(o) => {
                self.namespaces.insert(o.metadata.name.clone().unwrap_or_default(), o);
            }
            Object::Pod(o) => {
                self.track_pod(&o, at);
                self.pods.insert(key(&o.metadata), o);
            }
            Object::NetworkPolicy(o) => {
                self.policies.insert(key(&o.metadata), o);
            }
            Object::Service(o) => {
                self.services.insert(key(&o.metadata), o);
            }
            Object::Node(o) => {
                self.nodes.insert(o.metadata.name.clone().unwrap_or_default(), o);
            }
            Object::ReplicaSet(o) => {
                self.replicasets.insert(key(&o.metadata), o);
            }
        }
    }

    pub(super) fn delete(&mut self, object: &Object, at: SystemTime) {
        match object {
            Object::Namespace(o) => {
                self.namespaces.remove(o.metadata.name.as_deref().unwrap_or_default());
            }
            Object::Pod(o) => {
                self.timeline.release(&Self::pod_uid(o), at);
                self.pods.remove(&key(&o.metadata));
            }
            Object::NetworkPolicy(o) => {
                self.policies.remove(&key(&o.metadata));
            }
            Object::Service(o) => {
                self.services.remove(&key(&o.metadata));
            }
            Object::Node(o) => {
                self.nodes.remove(o.metadata.name.as_deref().unwrap_or_default());
            }
            Object::ReplicaSet(o) => {
                self.replicasets.remove(&key(&o.metadata));
            }
        }
    }

    pub(super) fn replace(&mut self, kind: Kind, objects: Vec<Object>, at: SystemTime) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Pod => {
                let listed: HashSet<String> = objects
                    .iter()
                    .filter_map(|o| if let Object::Pod(p) = o { Some(Self::pod_uid(p)) } else { None })
                    .collect();
                for uid in self.timeline.current_holders() {
                    if !listed.contains(&uid) {
                        self.timeline.release(&uid, at);
                    }
                }
                self.pods.clear();
            }
            Kind::NetworkPolicy => self.policies.clear(),
            Kind::Service => self.services.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::ReplicaSet => self.replicasets.clear(),
        }
        for o in objects.into_iter().filter(|o| o.kind() == kind) {
            self.apply(o, at);
        }
    }

    pub(super) fn cluster_state(&self, extra: &[&PodSnapshot]) -> ClusterState {
        let mut pods: Vec<PodInfo> = self.pods.values().filter_map(|p| manifests::pod_info(p).ok()).collect();
        for snapshot in extra {
            if !pods.iter().any(|p| p.namespace == snapshot.info.namespace && p.name == snapshot.info.name) {
                pods.push(snapshot.info.clone());
            }
        }
        ClusterState {
            namespaces: self
                .namespaces
                .values()
                .map(|n| NamespaceInfo {
                    name: n.metadata.name.clone().unwrap_or_default(),
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                })
                .collect(),
            pods,
            policies: self.policies.values().cloned().collect(),
            nodes: self.nodes(),
        }
    }

    /// Every node with the addresses that are its own: its Node object's, its host-network
    /// pods', and for the local node its interfaces'.
    pub(super) fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<NodeInfo> = self.nodes.values().map(manifests::node_info).collect();
        let mut add = |name: &str, ips: &[IpAddr]| {
            let index = match nodes.iter().position(|n| n.name == name) {
                Some(index) => index,
                None => {
                    nodes.push(NodeInfo { name: name.to_owned(), addresses: vec![] });
                    nodes.len() - 1
                }
            };
            for ip in ips {
                if !nodes[index].addresses.contains(ip) {
                    nodes[index].addresses.push(*ip);
                }
            }
        };
        for pod in self.pods.values().filter_map(|p| manifests::pod_info(p).ok()) {
            if let (true, Some(node)) = (pod.host_network, &pod.node) {
                add(node, &pod.ips);
            }
        }
        if let Some(local) = &self.local_node {
            add(&local.name, &local.addresses);
        }
        nodes
    }
}
