//! `cargo xtask demo`: the whole story in one command.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::lab::{self, Lab};

fn run_cli(lab: &Lab, netiso: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = lab.in_node_output(netiso, args)?;
    anyhow::ensure!(out.status.success(), "netiso {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(lab: &Lab) -> anyhow::Result<ExitCode> {
    println!("== building netiso");
    let netiso = crate::build::netiso(false)?;
    println!(
        "== bringing up the lab: develop, staging, production with the course baseline; ingress-nginx; kube-system DNS"
    );
    let guard = lab.up_guarded(&lab::baseline_policies()?)?;
    story(lab, &netiso)?;
    guard.down()?;
    Ok(ExitCode::SUCCESS)
}

fn story(lab: &Lab, netiso: &std::path::Path) -> anyhow::Result<()> {
    println!(
        "== starting `netiso run` in the node namespace {} (API on 127.0.0.1:9963, metrics on 127.0.0.1:9962 there)",
        lab.node_ns()
    );
    let mut observer = lab.observe(netiso, &[])?;
    println!(
        "== driving the scenario's traffic: pod to pod, through Services, from the node, to the world (expected verdicts: what Kubernetes does under the policies)"
    );
    let results = lab.traffic_of(lab::all_probes())?;
    for r in &results {
        println!("   {:8} {}", r.outcome.to_string(), r.probe);
    }
    anyhow::ensure!(
        results.iter().all(|r| r.observed == r.expected),
        "some flows behaved contrary to what Kubernetes does under the policies"
    );
    // One drain interval and one store flush, so the last flows are queryable.
    std::thread::sleep(Duration::from_secs(2));

    println!("\n== what was blocked: netiso observe --verdict dropped");
    print!("{}", run_cli(lab, netiso, &["observe", "--verdict", "dropped", "--last", "10"])?);
    for protocol in ["TCP", "UDP"] {
        println!("\n== what was allowed: netiso observe --verdict forwarded --protocol {protocol}");
        print!(
            "{}",
            run_cli(lab, netiso, &["observe", "--verdict", "forwarded", "--protocol", protocol, "--last", "12"])?
        );
    }

    let listing = run_cli(
        lab,
        netiso,
        &[
            "observe",
            "--verdict",
            "dropped",
            "--from-pod",
            "develop/debug",
            "--to-pod",
            "production/api",
            "--to-port",
            "8080",
            "--protocol",
            "TCP",
            "-o",
            "json",
            "--last",
            "1",
        ],
    )?;
    let blocked: serde_json::Value =
        serde_json::from_str(listing.lines().next().context("the blocked flow was not recorded")?)?;
    let id = blocked["id"].as_str().context("record without id")?;
    println!("\n== the evidence for the blocked flow develop/debug -> production/api:8080: netiso evidence {id}");
    for line in run_cli(lab, netiso, &["evidence", id])?.lines() {
        println!("   {line}");
    }

    let metrics = run_cli(lab, std::path::Path::new("curl"), &["-s", "127.0.0.1:9962/metrics"])?;
    println!("\n== metrics (excerpt of http://127.0.0.1:9962/metrics in {})", lab.node_ns());
    for line in
        metrics.lines().filter(|l| l.starts_with("netiso_policy_drops_total") || l.starts_with("netiso_drops_total"))
    {
        println!("   {line}");
    }
    println!("\n== who talks to whom around production: netiso graph -n production");
    print!("{}", run_cli(lab, netiso, &["graph", "-n", "production", "--since", "1h"])?);
    println!("\n== what is blocked right now: netiso top");
    print!("{}", run_cli(lab, netiso, &["top", "--since", "1h", "--limit", "5"])?);
    observer.stop()?;
    println!("\nThe demo removes its lab now. To keep one running and query it yourself:");
    println!("  cargo xtask lab up && cargo xtask lab traffic");
    println!(
        "  ip netns exec ni-lab-node {} run --manifests lab-out/lab/cluster.yaml --store lab-out/lab/evidence.redb",
        netiso.display()
    );
    println!(
        "  ip netns exec ni-lab-node {} observe --verdict dropped   # API http://127.0.0.1:9963/v1/flows, metrics http://127.0.0.1:9962/metrics",
        netiso.display()
    );
    Ok(())
}
