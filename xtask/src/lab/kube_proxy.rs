//! The Services of the scenario translated as kube-proxy's nftables mode translates them on a node:
//! ClusterIP traffic is DNATed in prerouting (pods) and output (the node) to a backend picked at
//! random, node traffic to a ClusterIP is masqueraded, and a Service without endpoints is
//! rejected before any translation. The table layout follows kube-proxy's (`table ip kube-proxy`,
//! verdict maps keyed by address . protocol . port), so what netiso meets here is what it meets
//! on a node.

use std::fmt::Write;

use super::scenario::{LabService, SERVICE_CIDR, V4_PREFIX};

/// kube-proxy's name for the table, in the node's network namespace.
pub const TABLE: &str = "kube-proxy";

const MASQUERADE_MARK: &str = "0x4000";

fn chain_suffix(service: &LabService, protocol: &str, port_name: &str) -> String {
    format!("{}-{}-{}-{port_name}", service.namespace, service.name, protocol.to_lowercase())
}

/// The whole table for `services`.
pub fn ruleset(services: &[LabService]) -> String {
    let mut service_ips = Vec::new();
    let mut no_endpoints = Vec::new();
    let mut chains = String::new();
    for service in services {
        let backends = service.backends();
        for (port_name, port, protocol, target) in service.ports {
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
