//! The course scenario: namespaces develop, staging and production isolated by the baseline
//! policies of deploy/network-policies, an ingress controller and cluster DNS.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const V4_PREFIX: &str = "10.244.0";
pub const V6_PREFIX: &str = "fd00:10:244::";
pub const GATEWAY_V4: &str = "10.244.0.1";
pub const GATEWAY_V6: &str = "fd00:10:244::1";
/// The name the lab's DNS server answers, as a Service name would resolve in a cluster.
pub const API_NAME: &str = "api.production.svc.cluster.local";

/// Namespaces that get the baseline policies.
pub const APP_NAMESPACES: [&str; 3] = ["develop", "staging", "production"];

pub enum Server {
    None,
    /// TCP and UDP echo on this port.
    Echo(u16),
    /// dnsmasq on 53/UDP and 53/TCP.
    Dns,
}

pub struct LabPod {
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

    pub fn ipv4(&self) -> IpAddr {
        format!("{V4_PREFIX}.{}", self.host).parse().expect("valid")
    }

    pub fn ipv6(&self) -> IpAddr {
        format!("{V6_PREFIX}{}", self.host).parse().expect("valid")
    }

    /// The host-side veth in the node namespace (15 characters at most).
    pub fn veth(&self) -> String {
        format!("veth{}", self.host)
    }
}

pub const PODS: &[LabPod] = &[
    LabPod {
        namespace: "develop",
        name: "debug",
        labels: &[("app", "debug")],
        host: 10,
        ports: &[],
        server: Server::None,
    },
    LabPod {
        namespace: "staging",
        name: "web",
        labels: &[("app", "web"), ("pod-template-hash", "6d4b9c7f5")],
        host: 20,
        ports: &[("http", 8080, "TCP")],
        server: Server::Echo(8080),
    },
    LabPod {
        namespace: "production",
        name: "api",
        labels: &[("app", "api"), ("pod-template-hash", "5f7c8d9b4")],
        host: 30,
        ports: &[("http", 8080, "TCP")],
        server: Server::Echo(8080),
    },
    LabPod {
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
        namespace: "kube-system",
        name: "coredns",
        labels: &[("k8s-app", "kube-dns"), ("pod-template-hash", "668d6bf9bc")],
        host: 53,
        ports: &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        server: Server::Dns,
    },
];

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

/// The cluster DNS Service: advice selects DNS pods by its selector.
pub fn services() -> Vec<Service> {
    vec![Service {
        metadata: ObjectMeta {
            name: Some("kube-dns".into()),
            namespace: Some("kube-system".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(labels(&[("k8s-app", "kube-dns")])),
            cluster_ip: Some("10.96.0.10".into()),
            ..Default::default()
        }),
        ..Default::default()
    }]
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
