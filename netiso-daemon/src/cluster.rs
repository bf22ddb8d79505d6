//! The cluster's vocabulary, shared by every stage: labels, namespaces, pods and nodes as
//! NetworkPolicy sees them, the protocols it governs, references to policies, and the identity of a flow's end. Plain data, no behaviour
//! beyond naming; the inventory builds it, the policy engine decides on it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!("unknown protocol `{s}`; NetworkPolicy knows TCP, UDP and SCTP")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// status.podIPs, primary first.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    /// NetworkPolicy does not select host-network pods; their addresses are their node's.
    #[serde(default)]
    pub host_network: bool,
    /// spec.nodeName: traffic between the pod and this node is always allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl PodInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "resourceVersion", skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A node and the addresses that are its own: its Node object's, its host-network pods', and,
/// for the node netiso runs on, its interfaces'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Everything the engine decides on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
    #[serde(default)]
    pub nodes: Vec<NodeInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    Pod,
    /// A node address, including host-network pods.
    Node,
    /// A Service ClusterIP (traffic not yet translated to a backend).
    Service,
    /// An address the inventory does not know.
    World,
}

/// One end of a flow as recorded in evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub kind: EndpointKind,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// `Deployment/api`, `DaemonSet/agent`, ... (the pod's top-level owner).
    pub workload: Option<String>,
    /// Labels at the time of the flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `namespace/name` of the Service this end is: its ClusterIP, or a backend the packet was
    /// DNATed to from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub ip: IpAddr,
    pub port: u16,
}

impl Identity {
    pub fn world(ip: IpAddr, port: u16) -> Self {
        Identity {
            kind: EndpointKind::World,
            namespace: None,
            pod: None,
            workload: None,
            labels: None,
            node: None,
            service: None,
            ip,
            port,
        }
    }

    /// `namespace/pod`, when this end is a pod.
    /// The end as few names as possible cover: a pod's workload (its top-level owner's name, else
    /// the pod's), a Service's name, else `node` or `world`.
    pub fn workload_name(&self) -> String {
        match (self.owner_name(), &self.service, self.kind) {
            (Some(name), _, EndpointKind::Pod) => name.to_owned(),
            (_, Some(service), EndpointKind::Service) => {
                service.split_once('/').map_or(service.as_str(), |(_, name)| name).to_owned()
            }
            (_, _, EndpointKind::Node) => "node".into(),
            _ => "world".into(),
        }
    }

    /// A pod's top-level owner's name (`api` of `Deployment/api`), else the pod's name.
    pub fn owner_name(&self) -> Option<&str> {
        let owner = self.workload.as_ref().map(|w| w.split_once('/').map_or(w.as_str(), |(_, name)| name));
        owner.or(self.pod.as_deref())
    }

    pub fn pod_key(&self) -> Option<String> {
        Some(format!("{}/{}", self.namespace.as_deref()?, self.pod.as_deref()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_name_is_the_owner_the_pod_the_service_or_what_the_end_is() {
        let pod = |workload: Option<&str>| Identity {
            kind: EndpointKind::Pod,
            namespace: Some("production".into()),
            pod: Some("api-7d9f8-x2x4k".into()),
            workload: workload.map(str::to_owned),
            ..Identity::world("10.244.0.30".parse().unwrap(), 8080)
        };
        assert_eq!(pod(Some("Deployment/api")).workload_name(), "api");
        assert_eq!(pod(None).workload_name(), "api-7d9f8-x2x4k");
        let service = Identity {
            kind: EndpointKind::Service,
            namespace: Some("production".into()),
            service: Some("production/payments".into()),
            ..Identity::world("10.96.0.40".parse().unwrap(), 80)
        };
        assert_eq!(service.workload_name(), "payments");
        let node = Identity { kind: EndpointKind::Node, ..Identity::world("192.0.2.1".parse().unwrap(), 10250) };
        assert_eq!(node.workload_name(), "node");
        assert_eq!(Identity::world("203.0.113.10".parse().unwrap(), 80).workload_name(), "world");
    }
}
