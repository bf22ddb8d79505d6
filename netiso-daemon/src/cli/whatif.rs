//! `netiso whatif` and `netiso advise`: what a proposed policy set would break, and the smallest
//! allow policies that keep recorded traffic working, both decided on traffic netiso recorded.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::client::{self, Endpoint, Target};
use crate::inventory::manifests;
use crate::policy::whatif::{self, RecordedEnd, RecordedFlow, WhatIfReport};
use crate::policy::{ClusterState, Labels, Protocol};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct Window {
    #[command(flatten)]
    pub target: Target,
    /// Recorded traffic of this window (a duration ago, or an RFC 3339 time).
    #[arg(long, default_value = "24h")]
    pub since: String,
}

#[derive(Debug, Args)]
pub struct WhatIfArgs {
    /// Proposed NetworkPolicies: a file or a directory, as Flux would apply it.
    #[arg(long, value_name = "PATH")]
    pub policies: PathBuf,
    #[command(flatten)]
    pub window: Window,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
    /// Exit with status 2 when any recorded flow would become denied (for CI).
    #[arg(long)]
    pub fail_on_deny: bool,
}

#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// The namespace to advise for.
    #[arg(long)]
    pub namespace: String,
    #[command(flatten)]
    pub window: Window,
}

/// The cluster and the recorded flows of the window, from the daemons.
struct Recorded {
    state: ClusterState,
    dns: Labels,
    flows: Vec<RecordedFlow>,
}

fn end(v: &Value) -> Option<RecordedEnd> {
    Some(RecordedEnd {
        namespace: v["namespace"].as_str().map(str::to_owned),
        pod: v["pod"].as_str().map(str::to_owned),
        workload: v["workload"].as_str().map(str::to_owned),
        labels: serde_json::from_value(v["labels"].clone()).ok(),
        ip: v["ip"].as_str()?.parse().ok()?,
    })
}

/// A flow record as a flow to decide again; replies and protocols NetworkPolicy does not govern
/// are left out.
fn recorded_flow(v: &Value) -> Option<RecordedFlow> {
    if v["is_reply"].as_bool() == Some(true) {
        return None;
    }
    let protocol: Protocol = v["protocol"].as_str()?.parse().ok()?;
    Some(RecordedFlow {
        source: end(&v["source"])?,
        destination: end(&v["destination"])?,
        port: u16::try_from(v["destination"]["port"].as_u64()?).ok()?,
        protocol,
        recorded: v["verdict"].as_str()?.to_owned(),
    })
}

async fn fetch(window: &Window) -> anyhow::Result<Recorded> {
    let endpoints: Vec<Endpoint> = window.target.endpoints().await?;
    let mut inventory = None;
    let mut flows = Vec::new();
    let since = client::encode(&window.since);
    for endpoint in &endpoints {
        if inventory.is_none() {
            match client::get(endpoint, "/v1/inventory").await {
                Ok((200, body)) => {
                    inventory = Some(serde_json::from_slice::<Value>(&body).context("not an inventory")?)
                }
                Ok((status, body)) => {
                    eprintln!("netiso: {}: HTTP {status}: {}", endpoint.name(), String::from_utf8_lossy(&body).trim())
                }
                Err(e) => eprintln!("netiso: {}: {e:#}", endpoint.name()),
            }
        }
        match client::get(endpoint, &format!("/v1/flows?since={since}&limit={}", crate::export::http::MAX_LIMIT)).await
        {
            Ok((200, body)) => {
                let v: Value = serde_json::from_slice(&body)?;
                flows.extend(v["flows"].as_array().into_iter().flatten().filter_map(recorded_flow));
            }
            Ok((status, body)) => {
                eprintln!("netiso: {}: HTTP {status}: {}", endpoint.name(), String::from_utf8_lossy(&body).trim())
            }
            Err(e) => eprintln!("netiso: {}: {e:#}", endpoint.name()),
        }
    }
    let Some(inventory) = inventory else { bail!("no server answered with its inventory") };
    let state = ClusterState {
        namespaces: serde_json::from_value(inventory["namespaces"].clone()).context("inventory namespaces")?,
        pods: serde_json::from_value(inventory["pods"].clone()).context("inventory pods")?,
        policies: serde_json::from_value(inventory["policies"].clone()).context("inventory policies")?,
    };
    let dns = serde_json::from_value(inventory["dns_selector"].clone()).unwrap_or_default();
    Ok(Recorded { state, dns, flows })
}

fn table(out: &mut impl Write, title: &str, groups: &[whatif::FlowGroup]) -> std::io::Result<()> {
    writeln!(out, "{title}: {}", groups.len())?;
    for g in groups {
        let policies: Vec<String> = g.policies.iter().map(|p| p.to_string()).collect();
        writeln!(
            out,
            "  {} -> {} {}/{}  ({} flows)  {}",
            g.source,
            g.destination,
            g.protocol,
            g.port,
            g.flows,
            policies.join(", ")
        )?;
        if let Some(miss) = &g.nearest_miss {
            writeln!(out, "      nearest miss: {miss}")?;
        }
    }
    Ok(())
}

fn print_report(report: &WhatIfReport, format: Format) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(report)?)?,
        Format::Table => {
            for e in &report.proposed_errors {
                writeln!(out, "warning: {e}")?;
            }
            table(&mut out, "would become DENIED", &report.newly_denied)?;
            table(&mut out, "would become allowed", &report.newly_allowed)?;
            writeln!(
                out,
                "totals: {} recorded flows evaluated, {} would become denied, {} would become allowed, {} unchanged",
                report.evaluated,
                report.newly_denied.iter().map(|g| g.flows).sum::<usize>(),
                report.newly_allowed.iter().map(|g| g.flows).sum::<usize>(),
                report.unchanged
            )?;
        }
    }
    Ok(())
}

pub fn whatif(args: WhatIfArgs) -> anyhow::Result<ExitCode> {
    let proposed = manifests::load(&args.policies)
        .with_context(|| format!("reading proposed policies from {}", args.policies.display()))?;
    if proposed.state.policies.is_empty() {
        bail!("{} holds no NetworkPolicy", args.policies.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let recorded = runtime.block_on(fetch(&args.window))?;
    let report = whatif::replay(&recorded.state, &proposed.state.policies, &recorded.flows);
    print_report(&report, args.output)?;
    Ok(if args.fail_on_deny && !report.newly_denied.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

pub fn advise(args: AdviseArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let recorded = runtime.block_on(fetch(&args.window))?;
    let ns = args.namespace.as_str();
    let touching: Vec<RecordedFlow> = recorded
        .flows
        .into_iter()
        .filter(|f| f.source.namespace.as_deref() == Some(ns) || f.destination.namespace.as_deref() == Some(ns))
        .collect();
    let advice = whatif::advise(ns, &touching, &recorded.dns);
    // Check the advice with the what-if engine before offering it.
    let mut proposed = vec![whatif::default_deny(ns)];
    proposed.extend(advice.iter().cloned());
    let check = whatif::replay(&recorded.state, &proposed, &touching);
    let forwarded = touching.iter().filter(|f| f.recorded == "forwarded").count();
    let broken: Vec<&whatif::FlowGroup> = check.newly_denied.iter().collect();
    if !broken.is_empty() {
        for g in &broken {
            eprintln!(
                "netiso: the advice would still deny {} -> {} {}/{}",
                g.source, g.destination, g.protocol, g.port
            );
        }
        bail!("the advice does not keep every recorded flow of {ns} working; not printing it");
    }
    println!("# netiso advise --namespace {ns}: allow policies for a default deny in {ns}.");
    println!("# Checked with the what-if engine: with default-deny-all and these policies, none of the");
    println!("# {forwarded} recorded forwarded flows of {ns} (window: {}) would be denied.", args.window.since);
    for policy in &advice {
        print!("---\n{}", serde_yaml::to_string(policy)?);
    }
    eprintln!(
        "netiso: checked: 0 of {forwarded} recorded forwarded flows would be denied under default deny plus this advice"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::recorded_flow;

    #[test]
    fn a_port_out_of_range_is_not_wrapped_into_another_port() {
        let mut record = json!({
            "verdict": "forwarded",
            "protocol": "TCP",
            "source": {"ip": "10.244.0.40", "namespace": "ingress-nginx", "pod": "controller"},
            "destination": {"ip": "10.244.0.30", "namespace": "production", "pod": "api", "port": 8080},
        });
        assert_eq!(recorded_flow(&record).map(|f| f.port), Some(8080));
        record["destination"]["port"] = json!(65536 + 8080);
        assert!(recorded_flow(&record).is_none());
    }
}
