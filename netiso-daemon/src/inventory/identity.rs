//! The identity of a flow end: a pod (with its workload), a node, a Service address, or the world.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::Labels;

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
    /// `namespace/name` of the Service whose ClusterIP this is.
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
    pub fn pod_key(&self) -> Option<String> {
        Some(format!("{}/{}", self.namespace.as_deref()?, self.pod.as_deref()?))
    }
}
