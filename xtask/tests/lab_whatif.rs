//! Before a default deny lands: record the lab's traffic under allow-all, replay it against the
//! course's default deny (what breaks, and which policy breaks it), get advice, check that the
//! advice keeps everything recorded working, then enforce it and watch netiso see exactly that.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use xtask::lab::{self, Lab};

fn run(lab: &Lab, netiso: &Path, args: &[&str]) -> (i32, String, String) {
    let out = lab.in_node_output(netiso, args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The course's default deny (deploy/network-policies/base/default-deny.yaml) for each app
/// namespace, written as a directory of manifests.
fn write_default_deny(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let base =
        std::fs::read_to_string(lab::repo_root().join("deploy/network-policies/base/default-deny.yaml")).unwrap();
    for ns in ["develop", "staging", "production"] {
        let mut policy: serde_json::Value = serde_saphyr::from_str(&base).unwrap();
        policy["metadata"]["namespace"] = ns.into();
        std::fs::write(dir.join(format!("default-deny-{ns}.yaml")), serde_saphyr::to_string(&policy).unwrap()).unwrap();
    }
}

#[test]
fn whatif_predicts_the_default_deny_and_advice_keeps_recorded_traffic_working() {
    let (lab, scratch) = lab::for_test("w", Path::new(env!("CARGO_BIN_EXE_xtask")));
    let out = scratch.0.clone();
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    let guard = lab.up_guarded(&[]).expect("lab comes up with allow-all");
    let mut observer = lab.observe(&netiso, &[]).unwrap();
    let server = ["--server", "http://127.0.0.1:9963"];

    // 1. Allow-all: the course's legitimate traffic is recorded.
    for r in lab.traffic_of(lab::legitimate_probes()).unwrap() {
        assert!(r.observed && r.expected, "{} flows under allow-all", r.probe);
    }
    std::thread::sleep(Duration::from_secs(2));

    // 2. What-if of the default deny: DNS and ingress-nginx -> production/api break, and the
    //    default-deny policy is named.
    let deny = out.join("proposed-deny");
    write_default_deny(&deny);
    let mut args =
        vec!["whatif", "--policies", deny.to_str().unwrap(), "--since", "1h", "-o", "json", "--fail-on-deny"];
    args.extend(server);
    let (code, stdout, stderr) = run(&lab, &netiso, &args);
    assert_eq!(code, 2, "--fail-on-deny: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let denied = report["newly_denied"].as_array().unwrap();
    let find = |src: &str, dst: &str, port: u64, proto: &str| {
        denied.iter().find(|g| {
            g["source"].as_str().unwrap().starts_with(src)
                && g["destination"].as_str().unwrap().starts_with(dst)
                && g["port"] == port
                && g["protocol"] == proto
        })
    };
    for from in ["develop/debug", "staging/web", "production/api"] {
        let dns =
            find(from, "kube-system/coredns", 53, "UDP").unwrap_or_else(|| panic!("DNS from {from} breaks: {stdout}"));
        assert_eq!(dns["policies"][0]["name"], "default-deny-all");
    }
    let ingress =
        find("ingress-nginx/controller", "production/api", 8080, "TCP").expect("ingress to production/api breaks");
    assert_eq!(ingress["policies"][0]["namespace"], "production");
    assert_eq!(ingress["policies"][0]["name"], "default-deny-all");
    assert!(ingress["nearest_miss"].as_str().unwrap().contains("default deny"));
    let (code, table, _) = run(
        &lab,
        &netiso,
        &[&["whatif", "--policies", deny.to_str().unwrap(), "--since", "1h"][..], &server[..]].concat(),
    );
    assert_eq!(code, 0, "without --fail-on-deny the verdicts do not change the exit status");
    assert!(table.contains("would become DENIED") && table.contains("totals:"), "{table}");
    // The production baseline as Flux applies it (the overlay's kustomization, rendered) keeps
    // every legitimate flow working.
    let overlay = lab::repo_root().join("deploy/network-policies/overlays/production");
    let (code, stdout, stderr) = run(
        &lab,
        &netiso,
        &[
            &["whatif", "--policies", overlay.to_str().unwrap(), "--since", "1h", "-o", "json", "--fail-on-deny"][..],
            &server[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["newly_denied"].as_array().unwrap().is_empty() && report["evaluated"].as_u64().unwrap() >= 9,
        "{stdout}"
    );

    // 3. Advice per namespace, checked by netiso itself.
    let proposal = out.join("proposal");
    std::fs::create_dir_all(&proposal).unwrap();
    for f in std::fs::read_dir(&deny).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, proposal.join(f.file_name().unwrap())).unwrap();
    }
    for ns in ["develop", "staging", "production"] {
        let (code, yaml, stderr) =
            run(&lab, &netiso, &[&["advise", "--namespace", ns, "--since", "1h"][..], &server[..]].concat());
        assert_eq!(code, 0, "advise {ns}: {stderr}");
        assert!(stderr.contains("checked: 0 of"), "advise says it checked: {stderr}");
        assert!(yaml.contains("k8s-app: kube-dns"), "DNS by the kube-dns Service's selector:\n{yaml}");
        assert!(!yaml.contains("pod-template-hash"), "stable labels only:\n{yaml}");
        if ns == "production" {
            assert!(yaml.contains("kubernetes.io/metadata.name: ingress-nginx"), "ingress from ingress-nginx:\n{yaml}");
        }
        std::fs::write(proposal.join(format!("advice-{ns}.yaml")), yaml).unwrap();
    }

    // 4. Default deny plus the advice breaks nothing recorded...
    let (code, stdout, stderr) = run(
        &lab,
        &netiso,
        &[
            &["whatif", "--policies", proposal.to_str().unwrap(), "--since", "1h", "-o", "json", "--fail-on-deny"][..],
            &server[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["newly_denied"].as_array().unwrap().is_empty(), "{stdout}");
    assert!(report["evaluated"].as_u64().unwrap() >= 9);

    // ...and keeps develop/debug -> production/api denied.
    let proposed = lab::policies_from(&proposal).unwrap();
    lab.apply_policies(&proposed).unwrap();
    let engine = lab.engine().unwrap();
    let flow = netiso::policy::Flow {
        from: "develop/debug".parse().unwrap(),
        to: "production/api".parse().unwrap(),
        port: 8080,
        protocol: netiso::policy::Protocol::Tcp,
    };
    assert_eq!(engine.verdict(&flow).unwrap(), netiso::policy::Verdict::Denied);

    // 5. Enforced in the lab, the traffic behaves as predicted and netiso records exactly that.
    std::thread::sleep(Duration::from_secs(2)); // netiso reloads the manifests
    let results = lab.traffic().unwrap();
    for r in &results {
        assert_eq!(r.observed, r.expected, "{}", r.probe);
    }
    for r in results.iter().filter(|r| lab::legitimate_probes().iter().any(|l| l.source_port == r.probe.source_port)) {
        assert!(r.observed, "{} keeps working as whatif predicted", r.probe);
    }
    std::thread::sleep(Duration::from_secs(2));
    let (code, stdout, _) = run(
        &lab,
        &netiso,
        &[&["observe", "--verdict", "dropped", "--since", "1m", "--last", "100", "-o", "json"][..], &server[..]]
            .concat(),
    );
    assert_eq!(code, 0);
    let drops: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        drops.iter().any(|d| d["source"]["pod"] == "debug"
            && d["destination"]["pod"] == "api"
            && d["policy"]["attribution"] == "denied_by_network_policy"),
        "the blocked flow is recorded and attributed: {stdout}"
    );
    for d in &drops {
        let legit = d["destination"]["pod"] == "coredns" || d["source"]["pod"] == "controller";
        assert!(!legit, "no legitimate flow was dropped: {d}");
    }
    observer.stop().unwrap();
    guard.down().unwrap();
}
