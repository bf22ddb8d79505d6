//! End to end on real packets: the lab with the course baseline, `netiso run` in its node
//! namespace, the scenario's traffic, and what the kernel programs report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use xtask::lab::{self, ProbeKind};

/// Names of loaded BPF programs and maps, from bpftool.
fn loaded_bpf_names() -> Vec<String> {
    let mut names = Vec::new();
    for what in ["prog", "map"] {
        let out = Command::new("bpftool").args(["-j", what, "show"]).output().expect("bpftool runs");
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        names.extend(list.iter().filter_map(|v| v["name"].as_str().map(str::to_owned)));
    }
    names
}

const OURS: &[&str] =
    &["netiso_drop", "netiso_drop_loc", "netiso_from_pod", "netiso_to_pod", "DROPS", "FLOWS", "EVENTS", "LOSSES"];

fn matches(r: &Value, event: &str, src: &str, dst: &str, dst_port: u16, protocol: &str) -> bool {
    r["event"] == event
        && r["src_ip"] == src
        && r["dst_ip"] == dst
        && r["dst_port"] == dst_port
        && r["protocol"] == protocol
}

#[test]
fn the_lab_drops_and_flows_reach_netiso_from_the_kernel() {
    let (lab, _scratch) = lab::for_test("t", Path::new(env!("CARGO_BIN_EXE_xtask")));
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    let guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
    let mut observer = lab.observe(&netiso, &[]).expect("netiso starts");

    let results = lab.traffic().unwrap();
    for r in &results {
        assert_eq!(r.observed, r.expected, "{}: the lab's enforcement disagrees with the policies", r.probe);
    }
    let probes = lab::probes();
    let blocked_tcp = probes.iter().find(|p| p.to("develop/debug", "production/api", ProbeKind::Tcp, false)).unwrap();
    let blocked_tcp6 = probes.iter().find(|p| p.to("develop/debug", "production/api", ProbeKind::Tcp, true)).unwrap();
    let blocked_udp = probes.iter().find(|p| p.to("develop/debug", "production/api", ProbeKind::Udp, false)).unwrap();

    let wanted = |records: &[Value]| {
        let drop = |p: &lab::Probe, proto: &str| {
            records.iter().any(|r| {
                matches(r, "drop", &p.from_ip().to_string(), &p.target().to_string(), 8080, proto)
                    && r["src_port"] == p.source_port
                    && r["reason"] == "NETFILTER_DROP"
            })
        };
        let delivered = |src: &str, dst: &str, port: u16, proto: &str| {
            records.iter().any(|r| {
                matches(r, "flow", src, dst, port, proto)
                    && r["direction"] == "to_pod"
                    && r["packets"].as_u64() > Some(0)
            })
        };
        drop(blocked_tcp, "TCP")
            && drop(blocked_tcp6, "TCP")
            && drop(blocked_udp, "UDP")
            && delivered("10.244.0.40", "10.244.0.30", 8080, "TCP")
            && delivered("10.244.0.10", "10.244.0.53", 53, "UDP")
            && delivered("10.244.0.10", "10.244.0.53", 53, "TCP")
    };
    let seen = observer.wait_for(Duration::from_secs(10), wanted);
    // A clean exit that logged its totals after detaching.
    observer.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let records = observer.records();
    assert!(
        seen,
        "missing records; lab records were:\n{}",
        records
            .iter()
            .filter(|r| r["src_ip"].as_str().unwrap_or("").contains("244"))
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let drop_record =
        records.iter().find(|r| r["event"] == "drop" && r["src_port"] == blocked_tcp.source_port).unwrap();
    assert_eq!(drop_record["src_ip"], "10.244.0.10");
    assert_eq!(drop_record["dst_ip"], "10.244.0.30");
    assert_eq!(drop_record["dst_port"], 8080);
    assert_eq!(drop_record["protocol"], "TCP");
    // nftables drops in nft_do_chain; Linux 6.1 frees the packet in nf_hook_slow.
    let location = drop_record["location"].as_str().unwrap();
    assert!(["nft_do_chain+0x", "nf_hook_slow+0x"].iter().any(|f| location.starts_with(f)), "{drop_record}");
    // Before 5.17 the kernel gives no reason: NETFILTER_DROP is inferred from the location.
    let btf = netiso::datapath::btf::Btf::parse(&std::fs::read("/sys/kernel/btf/vmlinux").unwrap()).unwrap();
    let reasons_given = netiso::datapath::reasons::DropReasons::from_btf(&btf).given();
    assert_eq!(drop_record["reason_inferred"] == true, !reasons_given, "{drop_record}");

    // The kernel frees programs and maps asynchronously (RCU), shortly after the last reference.
    let ours = || loaded_bpf_names().into_iter().filter(|n| OURS.contains(&n.as_str())).collect::<Vec<_>>();
    let mut left = ours();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = ours();
    }
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");

    // The evidence store holds the same story with identities and attribution.
    let store = netiso::evidence::store::Store::open(&lab.store_path(), Default::default()).unwrap();
    let query = |filter: FlowFilter| store.query(&Query { filter, ..Default::default() }).unwrap();
    use netiso::evidence::filter::FlowFilter;
    use netiso::evidence::record::{Attribution, FlowVerdict};
    use netiso::evidence::store::Query;
    let dropped = query(FlowFilter {
        verdict: Some(FlowVerdict::Dropped),
        from_pod: Some("develop/debug".parse().unwrap()),
        to_pod: Some("production/api".parse().unwrap()),
        to_port: Some(8080),
        protocol: Some(netiso::datapath::record::IpProtocol::Tcp),
        ..Default::default()
    });
    let record =
        dropped.iter().find(|r| r.source.ip.to_string() == "10.244.0.10").expect("the blocked TCP flow is a record");
    assert_eq!(record.reason.as_deref(), Some("NETFILTER_DROP"));
    assert_eq!(record.policy.attribution, Attribution::DeniedByNetworkPolicy);
    assert_eq!(
        record.policy.direction,
        Some(netiso::evidence::record::PolicySides::Both),
        "develop's egress and production's ingress both deny"
    );
    let policies: Vec<String> = record.policy.policies.iter().map(|p| p.to_string()).collect();
    for name in ["production/default-deny-all", "production/allow-from-ingress-nginx", "develop/default-deny-all"] {
        assert!(policies.contains(&name.to_owned()), "{name} missing from {policies:?}");
    }
    assert_eq!(record.source.labels.as_ref().unwrap()["app"], "debug");
    let forwarded = |from: &str, to: &str, port: u16| {
        query(FlowFilter {
            verdict: Some(FlowVerdict::Forwarded),
            from_pod: Some(from.parse().unwrap()),
            to_pod: Some(to.parse().unwrap()),
            to_port: Some(port),
            ..Default::default()
        })
    };
    let ingress = forwarded("ingress-nginx/controller", "production/api", 8080);
    assert!(!ingress.is_empty(), "ingress-nginx -> production/api is recorded as forwarded");
    assert_eq!(ingress[0].policy.attribution, Attribution::AllowedByNetworkPolicy);
    assert!(ingress[0].policy.policies.iter().any(|p| p.name == "allow-from-ingress-nginx"));
    let dns = forwarded("develop/debug", "kube-system/coredns", 53);
    assert!(
        dns.iter().any(|r| r.protocol == netiso::datapath::record::IpProtocol::Udp)
            && dns.iter().any(|r| r.protocol == netiso::datapath::record::IpProtocol::Tcp),
        "DNS over UDP and TCP is recorded"
    );
    drop(store);

    guard.down().unwrap();
    let leftover: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with(&format!("ni-{}-", lab.id)))
                .map(str::to_owned)
                .collect()
        })
        .unwrap();
    assert!(leftover.is_empty(), "namespaces left: {leftover:?}");
}
