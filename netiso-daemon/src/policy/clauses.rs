//! The engine's policies as an enforcer needs them: per subject and direction, the peers and ports
//! admitted, with selectors resolved to pods and named ports to numbers (the lab compiles them into
//! nftables rules).

use super::compile::{Peer, PortMatch};
use super::engine::{Direction, Endpoint, PolicyEngine, rules};
use super::model::Protocol;

impl PolicyEngine {
    /// What the policies governing `subject` in `direction` admit, with selectors resolved to
    /// the pods they select and named ports to numbers: the input of an enforcement compiler.
    /// `None` when no policy isolates the subject (everything is admitted); an empty list denies all.
    pub fn clauses(&self, direction: Direction, subject: Endpoint) -> Option<Vec<Clause>> {
        let subject = subject.pod_index()?;
        let governing = self.governing(direction, subject);
        if governing.is_empty() {
            return None;
        }
        let mut clauses = Vec::new();
        for &p in governing {
            let policy = &self.policies[p as usize];
            for rule in rules(policy, direction) {
                let peers: Vec<ClausePeer> = match &rule.peers {
                    None => vec![ClausePeer::Any],
                    Some(peers) => peers
                        .iter()
                        .flat_map(|peer| match peer {
                            Peer::Pods { .. } => (0..self.pods.len() as u32)
                                .filter(|&q| {
                                    !self.pods[q as usize].host_network
                                        && self.peer_matches(policy, peer, Endpoint::Pod { index: q, ip: None })
                                })
                                .map(ClausePeer::Pod)
                                .collect::<Vec<_>>(),
                            Peer::IpBlock { cidr, except } => {
                                vec![ClausePeer::Block { cidr: *cidr, except: except.clone() }]
                            }
                            Peer::Invalid => vec![],
                        })
                        .collect(),
                };
                for peer in peers {
                    let Some(specs) = &rule.ports else {
                        clauses.push(Clause { peer: peer.clone(), port: None });
                        continue;
                    };
                    for spec in specs {
                        match &spec.port {
                            PortMatch::Any => clauses.push(Clause {
                                peer: peer.clone(),
                                port: Some(ClausePort { protocol: spec.protocol, range: None }),
                            }),
                            PortMatch::Range(lo, hi) => clauses.push(Clause {
                                peer: peer.clone(),
                                port: Some(ClausePort { protocol: spec.protocol, range: Some((*lo, *hi)) }),
                            }),
                            PortMatch::Named(name) => {
                                // The destination pod decides what the name means.
                                let destinations: Vec<(ClausePeer, u32)> = match (direction, &peer) {
                                    (Direction::Ingress, _) => vec![(peer.clone(), subject as u32)],
                                    (Direction::Egress, ClausePeer::Pod(q)) => {
                                        vec![(peer.clone(), *q)]
                                    }
                                    (Direction::Egress, ClausePeer::Any) => (0..self.pods.len() as u32)
                                        .filter(|&q| !self.pods[q as usize].host_network)
                                        .map(|q| (ClausePeer::Pod(q), q))
                                        .collect(),
                                    (Direction::Egress, ClausePeer::Block { .. }) => vec![],
                                };
                                for (peer, destination) in destinations {
                                    for cp in &self.pods[destination as usize].ports {
                                        if cp.name.as_deref() == Some(name) && cp.protocol == spec.protocol {
                                            clauses.push(Clause {
                                                peer: peer.clone(),
                                                port: Some(ClausePort {
                                                    protocol: spec.protocol,
                                                    range: Some((cp.port, cp.port)),
                                                }),
                                            });
                                        }
                                    }
                                }
                            }
                            PortMatch::Invalid => {}
                        }
                    }
                }
            }
        }
        Some(clauses)
    }
}

/// The other end of a [`Clause`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClausePeer {
    Any,
    Pod(u32),
    Block { cidr: ipnet::IpNet, except: Vec<ipnet::IpNet> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClausePort {
    pub protocol: Protocol,
    /// Inclusive; `None` is every port of the protocol.
    pub range: Option<(u16, u16)>,
}

/// One admitted (peer, port) combination. `port: None` admits every port of every protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    pub peer: ClausePeer,
    pub port: Option<ClausePort>,
}
