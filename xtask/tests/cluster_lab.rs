//! The lab as a Kubernetes node: Services translated kube-proxy style, names resolved through the
//! kube-dns ClusterIP, the kubelet's probes from the node, egress masqueraded to a world behind a
//! lab router, and enforcement by drop, reject or TCP reset. Real packets decide each case as
//! Kubernetes does. CI runs these tests in their own stage (`scripts/ci --stage cluster-lab`).

mod cluster_lab {
    use std::path::Path;
    use std::process::Command;

    use serde_json::Value;
    use xtask::lab::kube_proxy::Mode;
    use xtask::lab::{self, End, Lab, ProbeKind, ProbeResult, scenario};
    use xtask::nft::Enforcement;
    use xtask::probe::Outcome;

    fn lab(prefix: &str, enforcement: Enforcement, kube_proxy: Mode) -> (Lab, lab::Scratch) {
        let (lab, scratch) = lab::for_test(prefix, Path::new(env!("CARGO_BIN_EXE_xtask")));
        (lab.with_enforcement(enforcement).with_kube_proxy(kube_proxy), scratch)
    }

    fn result<'a>(results: &'a [ProbeResult], from: &str, to: &str, kind: ProbeKind) -> &'a ProbeResult {
        results
            .iter()
            .find(|r| r.probe.to(from, to, kind, false))
            .unwrap_or_else(|| panic!("no probe {from} -> {to} {kind:?}"))
    }

    fn route_get(netns: &str, destination: &str) -> Result<String, String> {
        let out = Command::new("ip").args(["-n", netns, "route", "get", destination]).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[test]
    fn services_the_node_and_the_world_behave_as_on_a_kubernetes_node_under_each_enforcement() {
        for (enforcement, kube_proxy, blocked) in [
            (Enforcement::Drop, Mode::Nftables, Outcome::NoAnswer),
            (Enforcement::Reject, Mode::Nftables, Outcome::Unreachable),
            (Enforcement::TcpReset, Mode::Nftables, Outcome::Refused),
            (Enforcement::Drop, Mode::Iptables, Outcome::NoAnswer),
        ] {
            let (lab, _scratch) = lab("c", enforcement, kube_proxy);
            let _guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
            let results = lab.traffic_of(lab::all_probes()).unwrap();
            let contrary: Vec<String> = results
                .iter()
                .filter(|r| r.observed != r.expected)
                .map(|r| format!("{}: Kubernetes {}, packets {}", r.probe, r.expected, r.outcome))
                .collect();
            assert!(
                contrary.is_empty(),
                "{enforcement:?}, {kube_proxy:?}: the lab is not a node:\n{}",
                contrary.join("\n")
            );

            let dns = result(&results, "develop/debug", "service kube-system/kube-dns", ProbeKind::DnsUdp);
            assert_eq!(dns.outcome, Outcome::Through, "names resolve through the kube-dns ClusterIP");
            let service = result(&results, "ingress-nginx/controller", "service production/api", ProbeKind::Tcp);
            assert_eq!(service.outcome, Outcome::Through, "Service port 80 reaches the backend's 8080");
            let remote = result(&results, "ingress-nginx/controller", "service staging/docs", ProbeKind::Tcp);
            assert_eq!(remote.outcome, Outcome::Through, "a Service reaches its backend on the other node");
            for to in ["production/api", "staging/web", "service production/api"] {
                let kubelet = result(&results, "node", to, ProbeKind::Tcp);
                assert_eq!(kubelet.outcome, Outcome::Through, "the node reaches {to} whatever the policies");
            }
            let world = result(&results, "ingress-nginx/controller", "world", ProbeKind::Tcp);
            assert_eq!(world.outcome, Outcome::Through, "an unisolated pod reaches the world");
            let no_endpoints =
                result(&results, "ingress-nginx/controller", "service production/payments", ProbeKind::Tcp);
            assert_eq!(no_endpoints.outcome, Outcome::Refused, "kube-proxy rejects a Service without endpoints");
            for (from, to) in [("develop/debug", "production/api"), ("develop/debug", "world")] {
                let r = result(&results, from, to, ProbeKind::Tcp);
                assert_eq!(r.outcome, blocked, "{enforcement:?} of {from} -> {to}");
            }

            // The world answers pods only through both translations: it has no route back to
            // the pod network or the node's uplink, and nothing in the lab routes beyond it.
            let pod = scenario::pod("ingress-nginx/controller").ipv4().to_string();
            assert!(route_get(&lab.world_ns(), &pod).is_err(), "the world routes to pods");
            assert!(route_get(&lab.world_ns(), scenario::NODE_IP).is_err(), "the world routes to the node");
            for ns in [lab.router_ns(), lab.world_ns()] {
                assert!(route_get(&ns, "198.51.100.1").is_err(), "{ns} routes beyond the lab");
            }
            let node_route = route_get(&lab.node_ns(), "198.51.100.1").unwrap();
            assert!(node_route.contains("dev uplink"), "the node's default route is the lab router: {node_route}");
        }
    }

    #[test]
    fn netiso_on_the_node_records_service_node_and_world_traffic() {
        for mode in [Mode::Nftables, Mode::Iptables] {
            records_service_node_and_world_traffic(mode);
        }
    }

    fn records_service_node_and_world_traffic(kube_proxy: Mode) {
        let (lab, _scratch) = lab("r", Enforcement::TcpReset, kube_proxy);
        let _guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
        let netiso = xtask::build::netiso(false).expect("netiso builds");
        let mut daemon = lab.observe(&netiso, &[]).expect("netiso observes the node");
        let probes = lab::node_probes();
        let results = lab.traffic_of(probes.clone()).unwrap();
        assert!(results.iter().all(|r| r.observed == r.expected));

        // Every probe leaves a record from its real source; a blocked one a drop. A Service's flow
        // is recorded at its backend (or its drop after DNAT), naming the Service.
        let find = |from: &str, to: &str, kind: ProbeKind, verdict: &str| {
            let probe = probes.iter().find(|p| p.to(from, to, kind, false)).unwrap();
            let (source, destination) = (probe.from_ip().to_string(), probe.target().to_string());
            let service = match probe.to {
                End::Service(service) => Some(service.key()),
                _ => None,
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let out = lab
                    .in_node_output(&netiso, &["observe", "--since", "10m", "--last", "1000", "-o", "json"])
                    .unwrap();
                let found = String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
                    let record: Value = serde_json::from_str(line).ok()?;
                    let reached = match &service {
                        Some(service) => record["destination"]["service"] == service.as_str(),
                        None => record["destination"]["ip"] == destination.as_str(),
                    };
                    let matches = record["source"]["ip"] == source.as_str()
                        && reached
                        && record["source"]["port"] == probe.source_port
                        && record["verdict"] == verdict;
                    matches.then_some(record)
                });
                if let Some(record) = found {
                    return record;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no record of {probe}:\n{}",
                    daemon.diagnostics().join("\n")
                );
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        };
        let kubelet = find("node", "production/api", ProbeKind::Tcp, "forwarded");
        assert_eq!(kubelet["source"]["ip"], scenario::GATEWAY_V4, "kubelet probes come from the bridge address");
        assert_eq!(kubelet["source"]["kind"], "node", "the bridge address is the node's own: {kubelet}");
        assert_eq!(kubelet["source"]["node"], scenario::NODE_NAME);
        assert_eq!(kubelet["policy"]["attribution"], "node_traffic", "{kubelet}");
        assert_eq!(kubelet["observed_at"], "pod_ingress", "{kubelet}");
        let dns = find("develop/debug", "service kube-system/kube-dns", ProbeKind::DnsUdp, "forwarded");
        assert_eq!(dns["destination"]["pod"], "coredns", "{dns}");
        assert_eq!(dns["policy"]["attribution"], "allowed_by_network_policy", "judged at the backend: {dns}");
        let call = find("ingress-nginx/controller", "service production/api", ProbeKind::Tcp, "forwarded");
        assert_eq!(
            (call["destination"]["pod"].as_str(), call["destination"]["port"].as_u64()),
            (Some("api"), Some(8080))
        );
        // staging/docs runs on the other node: where its Service's traffic went, connection
        // tracking says.
        let remote = find("ingress-nginx/controller", "service staging/docs", ProbeKind::Tcp, "forwarded");
        let docs = scenario::pod("staging/docs");
        assert_eq!(remote["destination"]["ip"], docs.ipv4().to_string().as_str(), "{remote}");
        assert_eq!(
            (remote["destination"]["pod"].as_str(), remote["destination"]["node"].as_str()),
            (Some("docs"), Some(docs.node().name)),
            "{remote}"
        );
        assert_eq!(remote["destination"]["port"], 8080, "{remote}");
        assert_eq!(remote["policy"]["attribution"], "allowed_by_network_policy", "judged at the backend: {remote}");
        assert_eq!(remote["observed_at"], "pod_egress", "{remote}");
        let remote_denied = find("develop/debug", "service staging/docs", ProbeKind::Tcp, "dropped");
        assert_eq!(remote_denied["policy"]["attribution"], "denied_by_network_policy", "{remote_denied}");
        let denied = find("develop/debug", "service production/api", ProbeKind::Tcp, "dropped");
        assert_eq!(denied["policy"]["attribution"], "denied_by_network_policy", "{denied}");
        assert_eq!(denied["observed_at"], "node", "dropped by the node's enforcement: {denied}");
        let no_endpoints = find("ingress-nginx/controller", "service production/payments", ProbeKind::Tcp, "dropped");
        assert_eq!(no_endpoints["policy"]["attribution"], "service_without_endpoints", "{no_endpoints}");
        let rejected = find("develop/debug", "world", ProbeKind::Tcp, "dropped");
        let to_world = find("ingress-nginx/controller", "world", ProbeKind::Tcp, "forwarded");
        assert_eq!(to_world["is_reply"], false, "the request, recorded after its hold: {to_world}");

        // Held no longer than the allowed world flow sent with them: a blocked packet that left
        // its pod is a drop, never also a forwarded flow.
        let out = lab
            .in_node_output(
                &netiso,
                &["observe", "--since", "10m", "--last", "1000", "-o", "json", "--verdict", "forwarded"],
            )
            .unwrap();
        let forwarded: Vec<Value> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert!(!forwarded.is_empty());
        for (from, to) in [
            ("develop/debug", "world"),
            ("develop/debug", "service production/api"),
            ("ingress-nginx/controller", "service production/payments"),
        ] {
            let probe = probes.iter().find(|p| p.to(from, to, ProbeKind::Tcp, false)).unwrap();
            let listed = forwarded.iter().find(|r| {
                r["source"]["ip"] == probe.from_ip().to_string().as_str() && r["source"]["port"] == probe.source_port
            });
            assert!(listed.is_none(), "{probe} was blocked, yet listed as forwarded: {listed:?}");
        }

        // The reject answered develop/debug's SYN to the world with a reset in the world's name:
        // the reset is the firewall's, and the rejected SYN keeps its verdict and is counted.
        assert_eq!(rejected["policy"]["attribution"], "denied_by_network_policy", "{rejected}");
        assert_eq!(rejected["is_reply"], false);
        let reset = forwarded.iter().find(|r| {
            r["source"]["ip"] == scenario::WORLD_IP && r["destination"]["port"] == rejected["source"]["port"]
        });
        let reset = reset.unwrap_or_else(|| panic!("no record of the reset answering {rejected}"));
        assert_eq!(reset["policy"]["attribution"], "firewall_reply", "{reset}");
        // kube-proxy's reject of the Service without endpoints answered with an ICMP error.
        let controller = scenario::pod("ingress-nginx/controller").ipv4().to_string();
        let unreachable = forwarded
            .iter()
            .find(|r| r["protocol"] == "ICMP" && r["destination"]["ip"] == controller.as_str() && r["icmp_type"] == 3);
        let unreachable = unreachable.unwrap_or_else(|| panic!("no record of kube-proxy's ICMP error: {forwarded:?}"));
        assert_eq!(unreachable["policy"]["attribution"], "firewall_reply", "{unreachable}");
        let out = lab.in_node_output(Path::new("curl"), &["-s", "127.0.0.1:9962/metrics"]).unwrap();
        let metrics = String::from_utf8_lossy(&out.stdout);
        let counted = metrics.lines().any(|l| {
            l.starts_with("netiso_policy_drops_total{")
                && l.contains(r#"namespace="develop""#)
                && l.contains(r#"direction="egress""#)
                && l.contains("default-deny-all")
        });
        assert!(counted, "the rejected SYN is not among the policy drops:\n{metrics}");
        daemon.stop().expect("netiso stops cleanly");

        // Offline, from the manifests: the node's InternalIP is its own, any other address is not.
        let manifests = lab.manifests_path();
        let explain = |from: &str| {
            let args = ["explain", "--manifests", manifests.to_str().unwrap(), "--from", from, "--to"];
            let out = Command::new(&netiso)
                .args(args)
                .args(["production/api", "--port", "8080", "-o", "json"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        let from_node = explain(scenario::NODE_IP);
        assert_eq!(from_node["verdict"], "allowed", "{from_node}");
        assert_eq!(from_node["ingress"]["own_node"], scenario::NODE_NAME);
        assert_eq!(explain(scenario::ROUTER_IP)["verdict"], "denied", "the router is not the node");
    }

    /// Whether `record` is the request `probe` sent. kube-proxy masquerades the node's calls to a
    /// Service with a random source port: those are known by the backend they reached instead, from
    /// a port no other probe uses.
    fn is_request_of(record: &Value, probe: &lab::Probe, probes: &[lab::Probe]) -> bool {
        let source = &record["source"];
        let destination = &record["destination"];
        let from_its_socket = source["port"] == probe.source_port
            || matches!(probe.to, End::Service(service)
                if probes.iter().all(|other| source["port"] != other.source_port)
                    && service.backends().iter().any(|b| destination["ip"] == b.ipv4().to_string().as_str())
                    && destination["port"].as_u64()
                        == service.target_port(probe.port, probe.protocol().as_str()).map(u64::from));
        record["is_reply"] == false && source["ip"] == probe.from_ip().to_string().as_str() && from_its_socket
    }

    #[test]
    fn observed_without_policies_the_baseline_breaks_no_service_dns_or_kubelet_flow() {
        let (lab, _scratch) = lab("w", Enforcement::Drop, Mode::Nftables);
        let _guard = lab.up_guarded(&[]).expect("lab comes up with no policy");
        let netiso = xtask::build::netiso(false).expect("netiso builds");
        let mut daemon = lab.observe(&netiso, &[]).expect("netiso observes the node");
        // What the course keeps: names through kube-dns, ingress through the Services, the
        // kubelet's probes.
        let kept: Vec<_> = lab::node_probes()
            .into_iter()
            .filter(|p| match (p.from, p.to) {
                (_, End::Service(s)) if s.name == "kube-dns" => true,
                (End::Pod(pod), End::Service(s)) => pod.name == "controller" && s.name != "payments",
                (End::Node, _) => true,
                _ => false,
            })
            .collect();
        let results = lab.traffic_of(kept.clone()).unwrap();
        assert!(results.iter().all(|r| r.observed), "everything flows without policies");

        let baseline = lab.out_dir.join("baseline");
        std::fs::create_dir_all(&baseline).unwrap();
        for (i, policy) in lab::baseline_policies().unwrap().iter().enumerate() {
            std::fs::write(baseline.join(format!("{i}.yaml")), serde_saphyr::to_string(policy).unwrap()).unwrap();
        }
        let server = "http://127.0.0.1:9963";
        let whatif = [
            "whatif",
            "--policies",
            baseline.to_str().unwrap(),
            "--since",
            "1h",
            "-o",
            "json",
            "--fail-on-deny",
            "--server",
            server,
        ];
        // Every kept flow is recorded (as the request from its source socket) once its hold ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let listed =
                lab.in_node_output(&netiso, &["observe", "--since", "1h", "--last", "1000", "-o", "json"]).unwrap();
            let records: Vec<Value> =
                String::from_utf8_lossy(&listed.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            let missing: Vec<String> = kept
                .iter()
                .filter(|p| !records.iter().any(|r| is_request_of(r, p, &kept)))
                .map(|p| p.to_string())
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not recorded: {missing:?}\n{}",
                String::from_utf8_lossy(&listed.stdout)
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let out = lab.in_node_output(&netiso, &whatif).unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(out.status.code(), Some(0), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(report["newly_denied"].as_array().unwrap().is_empty(), "{report}");

        // staging's Services have backends on both nodes.
        for namespace in ["production", "staging"] {
            let advice = lab
                .in_node_output(&netiso, &["advise", "--namespace", namespace, "--since", "1h", "--server", server])
                .unwrap();
            let yaml = String::from_utf8_lossy(&advice.stdout);
            assert!(advice.status.success(), "{}", String::from_utf8_lossy(&advice.stderr));
            assert!(!yaml.contains("10.96."), "no ClusterIP in the advice for {namespace}:\n{yaml}");
            assert!(!yaml.contains(scenario::GATEWAY_V4), "no rule for the node's own probes:\n{yaml}");
            if namespace == "staging" {
                // Reached only through its Service on the other node: connection tracking named it.
                assert!(yaml.contains("app: docs"), "ingress-nginx's calls to staging/docs are kept:\n{yaml}");
            }
        }
        daemon.stop().expect("netiso stops cleanly");
    }
}
