//! The course scenario: namespaces develop, staging and production isolated by the baseline
//! policies of deploy/network-policies, an ingress controller and cluster DNS, reached through
//! Services as pods reach them on a node, and a "world" beyond the node.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeAddress, NodeStatus, Pod, PodIP, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const V4_PREFIX: &str = "10.244.0";
pub const V6_PREFIX: &str = "fd00:10:244::";
pub const GATEWAY_V4: &str = "10.244.0.1";
pub const GATEWAY_V6: &str = "fd00:10:244::1";
/// The name the lab's DNS server answers with the api Service's ClusterIP, as in a cluster.
pub const API_NAME: &str = "api.production.svc.cluster.local";
/// The Node object's name and InternalIP: the node's address on its uplink to the lab router.
pub const NODE_NAME: &str = "lab";
pub const NODE_IP: &str = "192.0.2.2";
/// The lab router's address on the nodes' subnet (the nodes' default gateway).
pub const ROUTER_IP: &str = "192.0.2.1";
/// The pod network of the whole cluster: pods reach each other across nodes untranslated.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The router's address toward the world: what the world sees pods' egress come from.
pub const ROUTER_WORLD_IP: &str = "203.0.113.1";
/// A server in the "world" namespace behind the router, with TCP and UDP echo on WORLD_PORT.
pub const WORLD_IP: &str = "203.0.113.10";
pub const WORLD_PORT: u16 = 80;
/// The ClusterIP range kube-proxy translates.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Namespaces that get the baseline policies.
pub const APP_NAMESPACES: [&str; 3] = ["develop", "staging", "production"];

pub enum Server {
    None,
    /// TCP and UDP echo on this port.
    Echo(u16),
    /// dnsmasq on 53/UDP and 53/TCP.
    Dns,
}

/// A node of the lab cluster: the first is the one netiso observes and kube-proxy runs on; the
/// others hold backends that its pods reach across the nodes' subnet.
pub struct LabNode {
    pub name: &'static str,
    /// Its InternalIP on the nodes' subnet behind the lab router.
    pub ip: &'static str,
    /// Its pods' IPv4 /24 without the last byte, and their IPv6 /64 without the last group.
    pub v4_prefix: &'static str,
    pub v6_prefix: &'static str,
}

impl LabNode {
    /// The node's address on its pods' bridge: their gateway, and the source of its probes.
    pub fn gateway_v4(&self) -> String {
        format!("{}.1", self.v4_prefix)
    }

    pub fn gateway_v6(&self) -> String {
        format!("{}1", self.v6_prefix)
    }

    pub fn pod_cidr_v4(&self) -> String {
        format!("{}.0/24", self.v4_prefix)
    }
}

pub const NODES: &[LabNode] = &[
    LabNode { name: NODE_NAME, ip: NODE_IP, v4_prefix: V4_PREFIX, v6_prefix: V6_PREFIX },
    LabNode { name: "lab-2", ip: "192.0.2.3", v4_prefix: "10.244.1", v6_prefix: "fd00:10:244:1::" },
];

pub struct LabPod {
    /// Index in [`NODES`] of the node it runs on.
    pub node: usize,
    pub namespace: &'static str,
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    /// Last byte of the IPv4 address and last group of the IPv6 address.
    pub host: u8,
    pub ports: &'static [(&'static str, u16, &'static str)],
    pub server: Server,
}

impl LabPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn node(&self) -> &'static LabNode {
        &NODES[self.node]
    }

    pub fn ipv4(&self) -> IpAddr {
        format!("{}.{}", self.node().v4_prefix, self.host).parse().expect("valid")
    }

    pub fn ipv6(&self) -> IpAddr {
        format!("{}{}", self.node().v6_prefix, self.host).parse().expect("valid")
    }

    /// The host-side veth in the node namespace (15 characters at most).
    pub fn veth(&self) -> String {
        format!("veth{}", self.host)
    }
}

pub const PODS: &[LabPod] = &[
    LabPod {
        node: 0,
        namespace: "develop",
        name: "debug",
        labels: &[("app", "debug")],
        host: 10,
        ports: &[],
        server: Server::None,
    },
    LabPod {
        node: 0,
        namespace: "staging",
        name: "web",
        labels: &[("app", "web"), ("pod-template-hash", "6d4b9c7f5")],
        host: 20,
        ports: &[("http", 8080, "TCP")],
        server: Server::Echo(8080),
    },
    LabPod {
        node: 0,
        namespace: "production",
        name: "api",
        labels: &[("app", "api"), ("pod-template-hash", "5f7c8d9b4")],
        host: 30,
        ports: &[("http", 8080, "TCP")],
        server: Server::Echo(8080),
    },
    LabPod {
        node: 0,
        namespace: "ingress-nginx",
        name: "controller",
        labels: &[
            ("app.kubernetes.io/name", "ingress-nginx"),
            ("app.kubernetes.io/component", "controller"),
            ("pod-template-hash", "7c9f8d6b5"),
        ],
        host: 40,
        ports: &[("http", 80, "TCP")],
        server: Server::None,
    },
    LabPod {
        node: 0,
        namespace: "kube-system",
        name: "coredns",
        labels: &[("k8s-app", "kube-dns"), ("pod-template-hash", "668d6bf9bc")],
        host: 53,
        ports: &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        server: Server::Dns,
    },
    // On the second node: the Service in front of it is reached across the nodes' subnet.
    LabPod {
        node: 1,
        namespace: "staging",
        name: "docs",
        labels: &[("app", "docs"), ("pod-template-hash", "8b6c5d4f7")],
        host: 60,
        ports: &[("http", 8080, "TCP")],
        server: Server::Echo(8080),
    },
];

/// A ClusterIP Service, translated by the lab's kube-proxy to the pods its selector selects.
pub struct LabService {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: &'static str,
    pub selector: &'static [(&'static str, &'static str)],
    /// (name, port, protocol, target port)
    pub ports: &'static [(&'static str, u16, &'static str, u16)],
}

impl LabService {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn ip(&self) -> IpAddr {
        self.cluster_ip.parse().expect("valid")
    }

    /// The pods of the Service's namespace that its selector selects: its endpoints.
    pub fn backends(&self) -> Vec<&'static LabPod> {
        PODS.iter()
            .filter(|p| p.namespace == self.namespace && self.selector.iter().all(|l| p.labels.contains(l)))
            .collect()
    }

    /// The target port of the Service's `port`/`protocol`.
    pub fn target_port(&self, port: u16, protocol: &str) -> Option<u16> {
        self.ports.iter().find(|(_, p, proto, _)| *p == port && *proto == protocol).map(|(_, _, _, target)| *target)
    }
}

pub const SERVICES: &[LabService] = &[
    LabService {
        namespace: "kube-system",
        name: "kube-dns",
        cluster_ip: "10.96.0.10",
        selector: &[("k8s-app", "kube-dns")],
        ports: &[("dns", 53, "UDP", 53), ("dns-tcp", 53, "TCP", 53)],
    },
    LabService {
        namespace: "staging",
        name: "web",
        cluster_ip: "10.96.0.20",
        selector: &[("app", "web")],
        ports: &[("http", 80, "TCP", 8080)],
    },
    LabService {
        namespace: "production",
        name: "api",
        cluster_ip: "10.96.0.30",
        selector: &[("app", "api")],
        ports: &[("http", 80, "TCP", 8080)],
    },
    // Its only backend runs on the second node.
    LabService {
        namespace: "staging",
        name: "docs",
        cluster_ip: "10.96.0.50",
        selector: &[("app", "docs")],
        ports: &[("http", 80, "TCP", 8080)],
    },
    // Scaled to zero: kube-proxy rejects its traffic.
    LabService {
        namespace: "production",
        name: "payments",
        cluster_ip: "10.96.0.40",
        selector: &[("app", "payments")],
        ports: &[("http", 80, "TCP", 8080)],
    },
];

pub fn service(key: &str) -> &'static LabService {
    SERVICES.iter().find(|s| s.key() == key).unwrap_or_else(|| panic!("no lab Service {key}"))
}

pub fn pod(key: &str) -> &'static LabPod {
    PODS.iter().find(|p| p.key() == key).unwrap_or_else(|| panic!("no lab pod {key}"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn namespaces() -> Vec<Namespace> {
    ["develop", "staging", "production", "ingress-nginx", "kube-system"]
        .iter()
        .map(|name| {
            let mut l = labels(&[("kubernetes.io/metadata.name", name)]);
            if APP_NAMESPACES.contains(name) {
                l.insert("env".into(), name.to_string());
            }
            Namespace {
                metadata: ObjectMeta { name: Some(name.to_string()), labels: Some(l), ..Default::default() },
                ..Default::default()
            }
        })
        .collect()
}

pub fn services() -> Vec<Service> {
    SERVICES
        .iter()
        .map(|s| Service {
            metadata: ObjectMeta {
                name: Some(s.name.into()),
                namespace: Some(s.namespace.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(labels(s.selector)),
                cluster_ip: Some(s.cluster_ip.into()),
                cluster_ips: Some(vec![s.cluster_ip.into()]),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(name, port, protocol, target)| ServicePort {
                            name: Some(name.to_string()),
                            port: (*port).into(),
                            protocol: Some(protocol.to_string()),
                            target_port: Some(IntOrString::Int((*target).into())),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// The nodes the lab's pods run on, with their InternalIPs.
pub fn nodes() -> Vec<Node> {
    NODES
        .iter()
        .map(|n| Node {
            metadata: ObjectMeta { name: Some(n.name.into()), ..Default::default() },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: n.ip.into() }]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

pub fn pods() -> Vec<Pod> {
    PODS.iter()
        .map(|p| Pod {
            metadata: ObjectMeta {
                name: Some(p.name.into()),
                namespace: Some(p.namespace.into()),
                labels: Some(labels(p.labels)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(p.node().name.into()),
                containers: vec![Container {
                    name: p.name.into(),
                    image: Some(format!("lab/{}:1", p.name)),
                    ports: (!p.ports.is_empty()).then(|| {
                        p.ports
                            .iter()
                            .map(|(name, port, protocol)| ContainerPort {
                                name: Some(name.to_string()),
                                container_port: (*port).into(),
                                protocol: Some(protocol.to_string()),
                                ..Default::default()
                            })
                            .collect()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(p.ipv4().to_string()),
                pod_ips: Some(vec![PodIP { ip: p.ipv4().to_string() }, PodIP { ip: p.ipv6().to_string() }]),
                ..Default::default()
            }),
        })
        .collect()
}
