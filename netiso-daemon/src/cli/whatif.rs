//! `netiso whatif` and `netiso advise`: what a proposed policy set would break, and the smallest
//! allow policies that keep recorded traffic working, both decided on traffic netiso recorded.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::client::{self, Endpoint, Target, excerpt};
use crate::evidence::record::{FlowList, FlowRecord};
use crate::inventory::{InventoryView, manifests};
use crate::policy::whatif::{self, RecordedFlow, WhatIfReport};
use crate::policy::{ClusterState, Labels};

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

/// A flow record as flows to decide again: one, or a scan summary's, one per port. Replies and
/// protocols NetworkPolicy does not govern are left out.
fn recorded_flows_of(r: FlowRecord) -> Vec<RecordedFlow> {
    let Some(protocol) = r.protocol.policy().filter(|_| !r.is_reply) else { return vec![] };
    let ports: Vec<u16> = match &r.ports {
        Some(sweep) => sweep.ports().collect(),
        None => vec![r.destination.port],
    };
    ports
        .into_iter()
        .map(|port| RecordedFlow {
            port,
            source: r.source.clone(),
            destination: crate::cluster::Identity { port, ..r.destination.clone() },
            protocol,
            recorded: r.verdict.as_str().to_owned(),
        })
        .collect()
}

/// The flows of one page of a server's answer, and where the next page starts. A gate must judge
/// every recorded flow: an answer that holds more without saying where it continues is an error
/// (and one whose records cannot be read is not a `FlowList` at all).
fn recorded_flows(server: &str, answer: FlowList) -> anyhow::Result<(Vec<RecordedFlow>, Option<String>)> {
    let next = match (answer.more, answer.next) {
        (false, _) => None,
        (true, Some(next)) => Some(next),
        (true, None) => bail!(
            "{server} holds more than {} records in the window and names no next page; narrow --since so that every recorded flow is replayed",
            crate::evidence::record::MAX_LIMIT
        ),
    };
    Ok((answer.flows.into_iter().flat_map(recorded_flows_of).collect(), next))
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
                    inventory = Some(serde_json::from_slice::<InventoryView>(&body).with_context(|| {
                        format!("{} did not answer with its inventory: {}", endpoint.name(), excerpt(&body))
                    })?)
                }
                Ok((status, body)) => {
                    eprintln!("netiso: {}: HTTP {status}: {}", endpoint.name(), excerpt(&body))
                }
                Err(e) => eprintln!("netiso: {}: {e:#}", endpoint.name()),
            }
        }
        // Every server's flows, page by page, or no answer at all: a replay of part of the
        // traffic would pass what it did not see.
        let name = endpoint.name();
        let mut before: Option<String> = None;
        loop {
            let mut path = format!("/v1/flows?since={since}&limit={}", crate::evidence::record::MAX_LIMIT);
            if let Some(before) = &before {
                path.push_str(&format!("&before={}", client::encode(before)));
            }
            let (status, body) =
                client::get(endpoint, &path).await.with_context(|| format!("reading the recorded flows of {name}"))?;
            if status != 200 {
                bail!("{name} answered HTTP {status} for its recorded flows: {}", excerpt(&body));
            }
            let answer: FlowList = serde_json::from_slice(&body)
                .with_context(|| format!("{name} did not answer with readable flow records: {}", excerpt(&body)))?;
            let (page, next) = recorded_flows(&name, answer)?;
            flows.extend(page);
            match next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
    }
    let Some(inventory) = inventory else { bail!("no server answered with its inventory") };
    Ok(Recorded { state: inventory.state, dns: inventory.dns_selector, flows })
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
    for warning in &proposed.warnings {
        eprintln!("netiso: warning: {warning}");
    }
    if proposed.state.policies.is_empty() {
        bail!("{} holds no NetworkPolicy", args.policies.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let recorded = runtime.block_on(fetch(&args.window))?;
    let report = whatif::replay(&recorded.state, &proposed.state.policies, &recorded.flows);
    if !report.proposed_errors.is_empty() {
        for e in &report.proposed_errors {
            eprintln!("netiso: {e}");
        }
        bail!(
            "{} of the proposed policies in {} cannot be evaluated (above); the cluster would reject or apply them differently",
            report.proposed_errors.len(),
            args.policies.display()
        );
    }
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
    if !touching.iter().any(|f| f.recorded == "forwarded") {
        bail!(
            "no recorded forwarded flows of {ns} since {}: an allow set from no traffic would deny all of it; widen --since or let netiso observe longer",
            args.window.since
        );
    }
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
        print!("---\n{}", serde_saphyr::to_string(policy)?);
    }
    eprintln!(
        "netiso: checked: 0 of {forwarded} recorded forwarded flows would be denied under default deny plus this advice"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::recorded_flows;
    use crate::evidence::record::FlowList;

    fn record(id: &str, destination_port: Value) -> Value {
        json!({"id": id, "time": "2026-12-05T04:17:21Z", "last_seen": "2026-12-05T04:17:21Z", "node": "n1",
            "verdict": "forwarded", "protocol": "TCP", "packets": 1, "bytes": 60,
            "source": {"kind": "pod", "namespace": "ingress-nginx", "pod": "controller", "workload": null,
                "ip": "10.244.0.40", "port": 40000},
            "destination": {"kind": "pod", "namespace": "production", "pod": "api", "workload": null,
                "ip": "10.244.0.30", "port": destination_port},
            "reason": null,
            "policy": {"verdict": "allowed", "direction": null, "attribution": "not_isolated", "policies": [], "summary": ""}})
    }

    #[test]
    fn a_port_out_of_range_is_not_wrapped_into_another_port() {
        let list: FlowList = serde_json::from_value(json!({"flows": [record("1", json!(8080))]})).unwrap();
        assert_eq!(recorded_flows("n1", list).unwrap().0[0].port, 8080);
        let wrapped = serde_json::from_value::<FlowList>(json!({"flows": [record("1", json!(65536 + 8080))]}));
        assert!(wrapped.unwrap_err().to_string().contains("73616"));
    }

    #[test]
    fn a_scan_summary_is_replayed_port_by_port() {
        let mut summary = record("3", json!(0));
        summary["verdict"] = json!("dropped");
        summary["ports"] = json!({"count": 4, "ranges": "17-19,8080"});
        let list: FlowList = serde_json::from_value(json!({"flows": [summary]})).unwrap();
        let flows = recorded_flows("n1", list).unwrap().0;
        let ports: Vec<(u16, u16)> = flows.iter().map(|f| (f.port, f.destination.port)).collect();
        assert_eq!(ports, [(17, 17), (18, 18), (19, 19), (8080, 8080)]);
    }

    #[test]
    fn a_partial_or_unreadable_answer_fails_the_replay() {
        let paged: FlowList =
            serde_json::from_value(json!({"flows": [record("2", json!(8080))], "more": true, "next": "2"})).unwrap();
        assert_eq!(recorded_flows("n1", paged).unwrap().1.as_deref(), Some("2"), "the next page is read");
        let capped: FlowList =
            serde_json::from_value(json!({"flows": [record("1", json!(8080))], "more": true})).unwrap();
        let err = recorded_flows("n1", capped).unwrap_err();
        assert!(err.to_string().contains("n1 holds more than"), "{err}");
        let unreadable = json!({"flows": [record("1", json!(8080)), {"id": "2", "verdict": "forwarded"}]});
        assert!(serde_json::from_value::<FlowList>(unreadable).is_err());
        assert!(serde_json::from_value::<FlowList>(json!({"error": "x"})).is_err());
    }
}
