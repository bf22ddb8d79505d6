//! `cargo xtask demo`: the whole story in one command.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context;

use crate::lab::{self, Lab};

fn show(r: &serde_json::Value) -> String {
    let endpoint = |ip: &serde_json::Value, port: &serde_json::Value| {
        let ip = ip.as_str().unwrap_or("?");
        if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
    };
    let flow = format!(
        "{} -> {} {}",
        endpoint(&r["src_ip"], &r["src_port"]),
        endpoint(&r["dst_ip"], &r["dst_port"]),
        r["protocol"].as_str().unwrap_or("?")
    );
    if r["event"] == "drop" {
        format!(
            "DROPPED   {flow:60} reason={} at {}",
            r["reason"].as_str().unwrap_or("?"),
            r["location"].as_str().unwrap_or("?")
        )
    } else {
        format!("DELIVERED {flow:60} {} pkts into the pod on {}", r["packets"], r["interface"].as_str().unwrap_or("?"))
    }
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
    println!("== starting `netiso run` in the node namespace {}", lab.node_ns());
    let mut observer = lab.observe(netiso, &[])?;
    println!("== driving the scenario's traffic (expected verdicts come from the policies)");
    let results = lab.traffic()?;
    for r in &results {
        println!("   {:8} {}", if r.observed { "ALLOWED" } else { "BLOCKED" }, r.probe);
    }
    anyhow::ensure!(results.iter().all(|r| r.observed == r.expected), "some flows behaved contrary to the policies");
    // Give the datapath one drain interval to report the last keys.
    std::thread::sleep(Duration::from_secs(2));
    let status = observer.stop()?;
    anyhow::ensure!(status.success(), "netiso run exited with {status}");
    let records = observer.records();
    let lab_record = |r: &&serde_json::Value| {
        r["src_ip"].as_str().is_some_and(|ip| ip.starts_with("10.244.") || ip.starts_with("fd00:10:244:"))
    };
    println!("\n== what netiso reported from the kernel (lab addresses only)");
    for r in records.iter().filter(lab_record).filter(|r| r["event"] == "drop") {
        println!("   {}", show(r));
    }
    // A flow seen entering its destination pod got through; one only seen leaving its source may
    // have been dropped on the way.
    for r in records.iter().filter(lab_record).filter(|r| r["event"] == "flow" && r["direction"] == "to_pod") {
        println!("   {}", show(r));
    }
    println!("\n== why develop/debug -> production/api:8080 was dropped (netiso explain)");
    let out = Command::new(netiso)
        .args(["explain", "--manifests"])
        .arg(lab.manifests_path())
        .args(["--from", "develop/debug", "--to", "production/api", "--port", "8080"])
        .output()
        .context("running netiso explain")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\nThe lab's manifests are in {}; run `cargo xtask lab up` to keep a lab running.", lab.out_dir.display());
    Ok(())
}
