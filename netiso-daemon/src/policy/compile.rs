//! NetworkPolicy objects → the engine's compiled form, with API-server defaulting applied and
//! every validation problem reported against the policy and field it is in.

use std::fmt;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::model::Protocol;
use super::selector::Selector;

/// A validation problem in one policy. The policy is still evaluated as far as it can be: a bad
/// peer or port matches nothing (fail closed), a bad podSelector drops the policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyError {
    /// `namespace/name`.
    pub policy: String,
    /// JSON path within the object, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkPolicy {}: {}: {}", self.policy, self.field, self.message)
    }
}

pub use crate::cluster::PolicyRef;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// A peer with only a podSelector: pods in the policy's own namespace.
    PolicyNamespace,
    Selector(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    /// A peer that failed validation: matches nothing.
    Invalid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    Any,
    Range(u16, u16),
    Named(String),
    /// A port that failed validation: matches nothing.
    Invalid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None`: every peer (the field was absent or empty).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port and protocol.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompiledPolicy {
    pub reference: PolicyRef,
    pub pod_selector: Selector,
    /// `None` when the policy does not govern ingress; `Some(vec![])` isolates and allows nothing.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// The object as given, for evidence and suggestions.
    pub source: NetworkPolicy,
}

impl CompiledPolicy {
    pub fn namespace(&self) -> &str {
        &self.reference.namespace
    }
}

struct Ctx<'a> {
    policy: &'a str,
    errors: &'a mut Vec<PolicyError>,
}

impl Ctx<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError { policy: self.policy.to_owned(), field: field.into(), message: message.into() });
    }

    fn selector(
        &mut self,
        field: &str,
        selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Option<Selector> {
        match Selector::compile(selector) {
            Ok(s) => Some(s),
            Err(errors) => {
                for (suffix, message) in errors {
                    self.error(format!("{field}{suffix}"), message);
                }
                None
            }
        }
    }
}

/// Parses a CIDR the way the API server historically accepted it: host bits may be set.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("`{text}` is not a valid CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)"))
}

fn compile_peer(ctx: &mut Ctx, field: &str, peer: &NetworkPolicyPeer) -> Peer {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => compile_ip_block(ctx, &format!("{field}.ipBlock"), block),
        (Some(_), _, _) => {
            ctx.error(field, "ipBlock cannot be combined with podSelector or namespaceSelector");
            Peer::Invalid
        }
        (None, None, None) => {
            ctx.error(field, "a peer must set podSelector, namespaceSelector or ipBlock");
            Peer::Invalid
        }
        (None, ns, pods) => {
            let namespaces = match ns {
                None => Some(NamespaceScope::PolicyNamespace),
                Some(s) => ctx.selector(&format!("{field}.namespaceSelector"), s).map(NamespaceScope::Selector),
            };
            let pods = match pods {
                None => Some(Selector::everything()),
                Some(s) => ctx.selector(&format!("{field}.podSelector"), s),
            };
            match (namespaces, pods) {
                (Some(namespaces), Some(pods)) => Peer::Pods { namespaces, pods },
                _ => Peer::Invalid,
            }
        }
    }
}

fn compile_ip_block(ctx: &mut Ctx, field: &str, block: &IPBlock) -> Peer {
    let cidr = match parse_cidr(&block.cidr) {
        Ok(c) => c,
        Err(e) => {
            ctx.error(format!("{field}.cidr"), e);
            return Peer::Invalid;
        }
    };
    let mut except = Vec::new();
    for (i, text) in block.except.iter().flatten().enumerate() {
        let f = format!("{field}.except[{i}]");
        match parse_cidr(text) {
            Ok(e) if cidr.contains(&e) => except.push(e),
            Ok(_) => {
                ctx.error(f, format!("`{text}` is not inside cidr {}", block.cidr));
                return Peer::Invalid;
            }
            Err(e) => {
                ctx.error(f, e);
                return Peer::Invalid;
            }
        }
    }
    Peer::IpBlock { cidr, except }
}

fn is_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !name.is_empty()
        && name.len() <= 15
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

fn compile_port(ctx: &mut Ctx, field: &str, port: &NetworkPolicyPort) -> PortSpec {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => match p.parse() {
            Ok(p) => p,
            Err(e) => {
                ctx.error(format!("{field}.protocol"), e);
                return PortSpec { protocol: Protocol::Tcp, port: PortMatch::Invalid };
            }
        },
    };
    let port = match (&port.port, port.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => {
            ctx.error(format!("{field}.endPort"), "endPort requires port");
            PortMatch::Invalid
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                ctx.error(format!("{field}.endPort"), "endPort cannot be used with a named port");
                PortMatch::Invalid
            } else if !is_port_name(name) {
                ctx.error(format!("{field}.port"), format!("`{name}` is not a valid port name (IANA_SVC_NAME: up to 15 lowercase letters, digits and '-', with a letter)"));
                PortMatch::Invalid
            } else {
                PortMatch::Named(name.clone())
            }
        }
        (Some(IntOrString::Int(n)), end) => {
            if !(1..=65535).contains(n) {
                ctx.error(format!("{field}.port"), format!("port {n} is out of range 1-65535"));
                PortMatch::Invalid
            } else {
                let start = *n as u16;
                match end {
                    None => PortMatch::Range(start, start),
                    Some(e) if e < *n => {
                        ctx.error(format!("{field}.endPort"), format!("endPort {e} is below port {n}"));
                        PortMatch::Invalid
                    }
                    // The API server rejects it; an engine that stored it anyway reads the
                    // range as open-ended, so evaluate it as up to 65535.
                    Some(e) if e > 65535 => {
                        ctx.error(
                            format!("{field}.endPort"),
                            format!("endPort {e} is out of range 1-65535; evaluated as 65535"),
                        );
                        PortMatch::Range(start, 65535)
                    }
                    Some(e) => PortMatch::Range(start, e as u16),
                }
            }
        }
    };
    PortSpec { protocol, port }
}

fn compile_rule(
    ctx: &mut Ctx,
    field: &str,
    peers_name: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Rule {
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers.iter().enumerate().map(|(i, p)| compile_peer(ctx, &format!("{field}.{peers_name}[{i}]"), p)).collect()
    });
    let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
        ports.iter().enumerate().map(|(i, p)| compile_port(ctx, &format!("{field}.ports[{i}]"), p)).collect()
    });
    Rule { peers, ports }
}

/// Compiles one policy. Returns `None` (with errors) when it cannot be evaluated at all.
pub fn compile(policy: &NetworkPolicy, errors: &mut Vec<PolicyError>) -> Option<CompiledPolicy> {
    let namespace = policy.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = policy.metadata.name.clone().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let mut ctx = Ctx { policy: &key, errors };
    if name.is_empty() {
        ctx.error("metadata.name", "a NetworkPolicy needs a name");
        return None;
    }
    let Some(spec) = policy.spec.as_ref() else {
        ctx.error("spec", "a NetworkPolicy needs a spec");
        return None;
    };
    let pod_selector = match &spec.pod_selector {
        None => Selector::everything(),
        Some(s) => ctx.selector("spec.podSelector", s)?,
    };
    // API-server defaulting: no policyTypes means Ingress, plus Egress when egress rules exist.
    let (mut has_ingress, mut has_egress) = (false, false);
    match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        None => {
            has_ingress = true;
            has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => ctx.error(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown policy type `{other}`; use Ingress or Egress"),
                    ),
                }
            }
        }
    }
    let ingress = has_ingress.then(|| {
        spec.ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                compile_rule(&mut ctx, &format!("spec.ingress[{i}]"), "from", r.from.as_ref(), r.ports.as_ref())
            })
            .collect()
    });
    let egress = has_egress.then(|| {
        spec.egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| compile_rule(&mut ctx, &format!("spec.egress[{i}]"), "to", r.to.as_ref(), r.ports.as_ref()))
            .collect()
    });
    Some(CompiledPolicy {
        reference: PolicyRef { namespace, name, resource_version: policy.metadata.resource_version.clone() },
        pod_selector,
        ingress,
        egress,
        source: policy.clone(),
    })
}
