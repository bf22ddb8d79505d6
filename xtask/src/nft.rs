//! Compiles NetworkPolicies into an nftables ruleset for the forward path, the way
//! iptables/nftables-based CNIs enforce them. Selectors and named ports are resolved by netiso's
//! own engine, so the lab enforces exactly what netiso evaluates.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use netiso::policy::{Clause, ClausePeer, ClausePort, Direction, Endpoint, PolicyEngine, Protocol};

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

fn net_family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

fn port_match(port: &Option<ClausePort>) -> String {
    let Some(ClausePort { protocol, range }) = port else {
        return String::new();
    };
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    match range {
        None => format!(" meta l4proto {proto}"),
        Some((lo, hi)) if lo == hi => format!(" {proto} dport {lo}"),
        Some((lo, hi)) => format!(" {proto} dport {lo}-{hi}"),
    }
}

/// nft matches for the peer: `saddr` for ingress (the peer sends), `daddr` for egress.
fn peer_matches(engine: &PolicyEngine, peer: &ClausePeer, field: &str) -> Vec<String> {
    match peer {
        ClausePeer::Any => vec![String::new()],
        ClausePeer::Pod(index) => {
            engine.pods()[*index as usize].ips.iter().map(|ip| format!(" {} {field} {ip}", family(ip))).collect()
        }
        ClausePeer::Block { cidr, except } => {
            let fam = net_family(cidr);
            let mut m = format!(" {fam} {field} {cidr}");
            if !except.is_empty() {
                let list: Vec<String> = except.iter().map(ToString::to_string).collect();
                let _ = write!(m, " {fam} {field} != {{ {} }}", list.join(", "));
            }
            vec![m]
        }
    }
}

/// What the enforcement does to a packet no policy admits, as CNIs variously do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Enforcement {
    /// Drop silently: the sender times out.
    #[default]
    Drop,
    /// Answer with ICMP "administratively prohibited": the sender learns at once.
    Reject,
    /// TCP gets a forged reset, other protocols the ICMP answer of `Reject`.
    TcpReset,
}

impl Enforcement {
    /// The rules that end a policy chain, each counting what it refuses (as the benchmarks read).
    fn verdict(self) -> &'static str {
        match self {
            Enforcement::Drop => "counter drop",
            Enforcement::Reject => "counter reject with icmpx admin-prohibited",
            Enforcement::TcpReset => {
                "meta l4proto tcp counter reject with tcp reset\n\t\tcounter reject with icmpx admin-prohibited"
            }
        }
    }
}

fn chain_name(direction: Direction, index: usize) -> String {
    format!("{}_{index}", direction.as_str())
}

/// The whole ruleset: a table `name` in family inet with a forward chain that accepts replies,
/// keeps IPv6 neighbour discovery working, and then checks the source's egress and the
/// destination's ingress, ending each pod's chain with `enforcement`.
pub fn ruleset(table: &str, engine: &PolicyEngine, enforcement: Enforcement) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {table} {{");
    let mut dispatch: Vec<(Direction, Vec<String>)> = vec![(Direction::Egress, vec![]), (Direction::Ingress, vec![])];
    let mut chains = String::new();
    for (index, pod) in engine.pods().iter().enumerate() {
        if pod.host_network {
            continue;
        }
        for (direction, lines) in dispatch.iter_mut() {
            let subject = Endpoint::Pod { index: index as u32, ip: None };
            let Some(clauses) = engine.clauses(*direction, subject) else {
                continue;
            };
            let (own, peer_field) = match direction {
                Direction::Egress => ("saddr", "daddr"),
                Direction::Ingress => ("daddr", "saddr"),
            };
            let chain = chain_name(*direction, index);
            for ip in &pod.ips {
                lines.push(format!("\t\t{} {own} {ip} goto {chain}", family(ip)));
            }
            let _ = writeln!(chains, "\tchain {chain} {{\n\t\t# {} of {}", direction.as_str(), pod.key());
            for Clause { peer, port } in &clauses {
                for peer in peer_matches(engine, peer, peer_field) {
                    // A clause that admits everything has no match at all: a bare `return`.
                    let matches = format!("{peer}{}", port_match(port));
                    let rule = [matches.trim(), "return"].join(" ");
                    let _ = writeln!(chains, "\t\t{}", rule.trim_start());
                }
            }
            let _ = writeln!(chains, "\t\t{}\n\t}}", enforcement.verdict());
        }
    }
    let _ = writeln!(
        out,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state established,related accept\n\t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }} accept\n\t\tjump egress\n\t\tjump ingress\n\t}}"
    );
    for (direction, lines) in &dispatch {
        let _ = writeln!(out, "\tchain {} {{", direction.as_str());
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "\t}}");
    }
    out.push_str(&chains);
    out.push_str("}\n");
    out
}
