//! The Services of the scenario translated as kube-proxy translates them on a node, in either of
//! its netfilter modes: ClusterIP traffic is DNATed in prerouting (pods) and output (the node) to
//! a backend picked at random, traffic from outside the pod network to a ClusterIP is
//! masqueraded, and a Service without endpoints is rejected before any translation. The rules
//! follow kube-proxy's own layout (`table ip kube-proxy` with verdict maps in nftables mode, the
//! KUBE-SERVICES / KUBE-SVC / KUBE-SEP chains in iptables mode, here iptables-nft), so what netiso
//! meets here is what it meets on a node.

use std::fmt::Write;

use super::scenario::{LabService, SERVICE_CIDR, V4_PREFIX};

/// kube-proxy's `--proxy-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[default]
    Nftables,
    /// iptables rules (through iptables-nft, as on current distributions).
    Iptables,
}

/// Each Service port with endpoints: (service, port name, port, protocol, target port, backends).
fn translated(services: &[LabService]) -> impl Iterator<Item = (&LabService, &str, u16, &str, u16)> {
    services
        .iter()
        .flat_map(|s| s.ports.iter().map(move |(name, port, protocol, target)| (s, *name, *port, *protocol, *target)))
}

/// kube-proxy's name for the table, in the node's network namespace.
pub const TABLE: &str = "kube-proxy";

const MASQUERADE_MARK: &str = "0x4000";

fn chain_suffix(service: &LabService, protocol: &str, port_name: &str) -> String {
    format!("{}-{}-{}-{port_name}", service.namespace, service.name, protocol.to_lowercase())
}

/// kube-proxy's nftables-mode table for `services`.
pub fn ruleset(services: &[LabService]) -> String {
    let mut service_ips = Vec::new();
    let mut no_endpoints = Vec::new();
    let mut chains = String::new();
    for (service, port_name, port, protocol, target) in translated(services) {
        let backends = service.backends();
        let proto = protocol.to_lowercase();
        let key = format!("{} . {proto} . {port}", service.cluster_ip);
        if backends.is_empty() {
            no_endpoints.push(format!("{key} : goto reject-chain"));
            continue;
        }
        let suffix = chain_suffix(service, protocol, port_name);
        service_ips.push(format!("{key} : goto service-{suffix}"));
        let picks: Vec<String> = (0..backends.len()).map(|i| format!("{i} : goto endpoint-{i}-{suffix}")).collect();
        let _ = writeln!(
            chains,
            "\tchain service-{suffix} {{\n\t\tip saddr != {V4_PREFIX}.0/24 jump mark-for-masquerade\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
            backends.len(),
            picks.join(", ")
        );
        for (i, backend) in backends.iter().enumerate() {
            let ip = backend.ipv4();
            let _ = writeln!(
                chains,
                "\tchain endpoint-{i}-{suffix} {{\n\t\tip saddr {ip} jump mark-for-masquerade\n\t\tmeta l4proto {proto} dnat to {ip}:{target}\n\t}}"
            );
        }
    }
    let map = |name: &str, elements: &[String]| {
        let elements =
            if elements.is_empty() { String::new() } else { format!("\n\t\telements = {{ {} }}", elements.join(", ")) };
        format!("\tmap {name} {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict{elements}\n\t}}\n")
    };
    let mut out = format!("table ip {TABLE} {{\n");
    out.push_str(&map("service-ips", &service_ips));
    out.push_str(&map("no-endpoint-services", &no_endpoints));
    let _ = write!(
        out,
        "\tchain reject-chain {{\n\t\treject\n\t}}
\tchain service-endpoints-check {{\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}}
\tchain filter-forward {{\n\t\ttype filter hook forward priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t}}
\tchain filter-output {{\n\t\ttype filter hook output priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t}}
\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {MASQUERADE_MARK}\n\t}}
\tchain masquerading {{\n\t\tmeta mark & {MASQUERADE_MARK} == 0 return\n\t\tmeta mark set meta mark ^ {MASQUERADE_MARK}\n\t\tmasquerade fully-random\n\t}}
\tchain services {{\n\t\tip daddr {SERVICE_CIDR} ip daddr . meta l4proto . th dport vmap @service-ips\n\t}}
\tchain nat-prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}}
\tchain nat-output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}
\tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}}
"
    );
    out.push_str(&chains);
    out.push_str("}\n");
    out
}

/// 16 characters naming `what`, as kube-proxy hashes its iptables chain names (which must stay
/// under 29 characters).
fn short_hash(what: &str) -> String {
    // FNV-1a: stable, so the rules read the same in every run.
    let hash = what.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016X}")
}

/// The same translation as kube-proxy's iptables mode writes it, for `iptables-restore`.
pub fn iptables_rules(services: &[LabService]) -> String {
    let pods = format!("{V4_PREFIX}.0/24");
    let mut chains = vec!["KUBE-SERVICES".to_owned(), "KUBE-MARK-MASQ".to_owned(), "KUBE-POSTROUTING".to_owned()];
    let mut nat = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".to_owned(),
        format!("-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQUERADE_MARK}/{MASQUERADE_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --set-xmark {MASQUERADE_MARK}/0x0"),
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully".to_owned(),
    ];
    let mut filter = vec![
        "-A INPUT -m conntrack --ctstate NEW -j KUBE-SERVICES".to_owned(),
        "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES".to_owned(),
        "-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES".to_owned(),
    ];
    for (service, port_name, port, protocol, target) in translated(services) {
        let proto = protocol.to_lowercase();
        let matches = format!("-d {}/32 -p {proto} -m {proto} --dport {port}", service.cluster_ip);
        let backends = service.backends();
        if backends.is_empty() {
            filter.push(format!("-A KUBE-SERVICES {matches} -j REJECT --reject-with icmp-port-unreachable"));
            continue;
        }
        let svc = format!("KUBE-SVC-{}", short_hash(&chain_suffix(service, protocol, port_name)));
        nat.push(format!("-A KUBE-SERVICES {matches} -j {svc}"));
        nat.push(format!("-A {svc} ! -s {pods} {matches} -j KUBE-MARK-MASQ"));
        chains.push(svc.clone());
        for (i, backend) in backends.iter().enumerate() {
            let sep =
                format!("KUBE-SEP-{}", short_hash(&format!("{i}-{}", chain_suffix(service, protocol, port_name))));
            // As kube-proxy spreads load: backend i of n is picked with probability 1/(n-i).
            let pick = match backends.len() - i {
                1 => String::new(),
                left => format!(" -m statistic --mode random --probability {:.11}", 1.0 / left as f64),
            };
            nat.push(format!("-A {svc}{pick} -j {sep}"));
            nat.push(format!("-A {sep} -s {}/32 -j KUBE-MARK-MASQ", backend.ipv4()));
            nat.push(format!("-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {}:{target}", backend.ipv4()));
            chains.push(sep);
        }
    }
    let mut out = String::from("*nat\n");
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in nat {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str("COMMIT\n*filter\n:KUBE-SERVICES - [0:0]\n");
    for rule in filter {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str("COMMIT\n");
    out
}
