//! The plain data the engine decides on: namespaces, pods and flows. Built by the inventory from
//! the Kubernetes API or from manifests; the engine never does I/O.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::cluster::{ClusterState, ContainerPort, Labels, NamespaceInfo, PodInfo, PolicyRef, Protocol};
use crate::cluster::{EndpointKind, Identity};

/// One end of a flow as the caller names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EndpointRef {
    /// `namespace/pod`, optionally with the address the flow used (for pods with several).
    Pod {
        namespace: String,
        name: String,
        ip: Option<IpAddr>,
    },
    Ip(IpAddr),
}

impl FromStr for EndpointRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(EndpointRef::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(EndpointRef::Pod { namespace: ns.into(), name: name.into(), ip: None })
            }
            _ => Err(format!("`{s}` is neither namespace/pod nor an IP address")),
        }
    }
}

/// How a recorded end is named to the engine: the pod it was, else its address.
impl From<&Identity> for EndpointRef {
    fn from(end: &Identity) -> Self {
        match (&end.namespace, &end.pod) {
            (Some(namespace), Some(name)) if end.kind == EndpointKind::Pod => {
                EndpointRef::Pod { namespace: namespace.clone(), name: name.clone(), ip: Some(end.ip) }
            }
            _ => EndpointRef::Ip(end.ip),
        }
    }
}

impl fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointRef::Pod { namespace, name, .. } => write!(f, "{namespace}/{name}"),
            EndpointRef::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub from: EndpointRef,
    pub to: EndpointRef,
    pub port: u16,
    pub protocol: Protocol,
}
