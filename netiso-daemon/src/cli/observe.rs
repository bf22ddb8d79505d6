//! `netiso observe` and `netiso evidence`: what was blocked, where, and why, from one node or
//! every node.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::client::{self, Target, encode, excerpt};
use crate::cluster::{EndpointKind, Identity};
use crate::evidence::record::{EvidenceBundle, FlowList, FlowRecord, StreamNotice};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Compact,
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub target: Target,
    /// dropped or forwarded.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Either end in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    #[arg(long)]
    pub from_namespace: Option<String>,
    #[arg(long)]
    pub to_namespace: Option<String>,
    /// namespace/pod
    #[arg(long)]
    pub from_pod: Option<String>,
    /// namespace/pod
    #[arg(long)]
    pub to_pod: Option<String>,
    /// key=value or key
    #[arg(long)]
    pub from_label: Option<String>,
    /// key=value or key
    #[arg(long)]
    pub to_label: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub protocol: Option<String>,
    /// The kernel's drop reason, e.g. NETFILTER_DROP.
    #[arg(long)]
    pub reason: Option<String>,
    /// namespace/name of a NetworkPolicy.
    #[arg(long)]
    pub policy: Option<String>,
    /// RFC 3339 time or a duration ago (5m).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// The last N flows (after merging every server).
    #[arg(long, default_value_t = 20)]
    pub last: usize,
    /// Keep printing new flows as they are recorded.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value = "compact")]
    pub output: Format,
}

impl ObserveArgs {
    fn query(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        let mut add = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                pairs.push((k, v.clone()));
            }
        };
        add("verdict", &self.verdict);
        add("namespace", &self.namespace);
        add("from-namespace", &self.from_namespace);
        add("to-namespace", &self.to_namespace);
        add("from-pod", &self.from_pod);
        add("to-pod", &self.to_pod);
        add("from-label", &self.from_label);
        add("to-label", &self.to_label);
        add("protocol", &self.protocol);
        add("reason", &self.reason);
        add("policy", &self.policy);
        add("since", &self.since);
        add("until", &self.until);
        if let Some(port) = self.port {
            pairs.push(("port", port.to_string()));
        }
        pairs.push(("limit", self.last.clamp(1, crate::evidence::record::MAX_LIMIT).to_string()));
        if self.follow {
            pairs.push(("follow", "true".into()));
        }
        let encoded: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        format!("/v1/flows?{}", encoded.join("&"))
    }
}

/// One end as a responder reads it: the pod (and the Service it was reached through), the
/// Service of an untranslated ClusterIP, else the address.
fn end(id: &Identity) -> String {
    end_at(id, &id.port.to_string())
}

/// Ports of a scan summary as a line shows them: the ranges, shortened past a few.
fn port_ranges(r: &FlowRecord) -> Option<String> {
    const SHOWN: usize = 40;
    let sweep = r.ports.as_ref()?;
    let shown = match sweep.ranges.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &sweep.ranges[..cut]),
        None => sweep.ranges.clone(),
    };
    Some(format!("{shown} ({} ports)", sweep.count))
}

fn destination(r: &FlowRecord) -> String {
    match port_ranges(r) {
        Some(ports) => end_at(&r.destination, &ports),
        None => end(&r.destination),
    }
}

fn end_at(id: &Identity, port: &str) -> String {
    let at = match (&id.namespace, &id.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{port}"),
        _ if id.ip.is_ipv6() => format!("[{}]:{port}", id.ip),
        _ => format!("{}:{port}", id.ip),
    };
    match (&id.service, id.kind) {
        (Some(service), EndpointKind::Service) => format!("service/{service}:{port}"),
        (Some(service), _) => format!("{at} (service/{service})"),
        (None, _) => at,
    }
}

/// Who decided: the sides' words, or for records written before the sides were kept, the
/// policies they name.
fn blame(r: &FlowRecord) -> Option<String> {
    let names = policies(r);
    r.policy.blame().or_else(|| (!names.is_empty()).then(|| format!("by {names}")))
}

fn policies(r: &FlowRecord) -> String {
    r.policy.policies.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect::<Vec<_>>().join(",")
}

fn time(r: &FlowRecord) -> String {
    humantime::format_rfc3339_nanos(r.time).to_string()
}

fn compact(r: &FlowRecord) -> String {
    let mut line = format!(
        "{} {} {} -> {} {} {}",
        time(r),
        r.node,
        end(&r.source),
        destination(r),
        r.protocol,
        r.verdict.as_str().to_uppercase()
    );
    if let Some(reason) = &r.reason {
        line.push_str(&format!(" {reason}"));
        if r.reason_inferred {
            line.push_str(" (inferred)");
        }
    }
    line.push_str(&format!(" ({})", r.policy.attribution.as_str()));
    if let Some(blame) = blame(r) {
        line.push_str(&format!(" {blame}"));
    }
    if r.attempts > 1 {
        line.push_str(&format!(" x{} attempts", r.attempts));
    }
    line.push_str(&format!(" id={}", r.id));
    line
}

fn print(out: &mut impl Write, format: Format, r: &FlowRecord) -> std::io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?),
        Format::Compact => writeln!(out, "{}", compact(r)),
        Format::Table => writeln!(
            out,
            "{:<30} {:<36} {:<36} {:<6} {:<10} {:<16} {}",
            time(r),
            end(&r.source),
            destination(r),
            r.protocol,
            r.verdict.as_str(),
            r.reason.as_deref().unwrap_or("-"),
            policies(r)
        ),
    }
}

pub fn observe(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let endpoints = args.target.endpoints().await?;
        let path = args.query();
        let stdout = std::io::stdout();
        if args.output == Format::Table {
            writeln!(
                stdout.lock(),
                "{:<30} {:<36} {:<36} {:<6} {:<10} {:<16} POLICIES",
                "TIME",
                "SOURCE",
                "DESTINATION",
                "PROTO",
                "VERDICT",
                "REASON"
            )?;
        }
        if args.follow {
            // A stream that fails or ends (the daemon restarted) ends the command with its reason:
            // a watcher must not mistake silence for quiet.
            let mut streams = tokio::task::JoinSet::new();
            for endpoint in endpoints {
                let path = path.clone();
                let format = args.output;
                streams.spawn(async move {
                    let name = endpoint.name();
                    client::stream_lines(&endpoint, &path, |line| follow_line(&name, format, line))
                        .await
                        .with_context(|| format!("following {name}"))?;
                    bail!("the stream from {name} ended: the daemon restarted or the connection dropped")
                });
            }
            // Every stream ends in an error; the first one ends the command.
            if let Some(ended) = streams.join_next().await {
                ended??;
            }
            bail!("no daemon to follow");
        }
        let mut flows: Vec<FlowRecord> = Vec::new();
        let mut failures = 0;
        for endpoint in &endpoints {
            match client::get(endpoint, &path).await {
                Ok((200, body)) => match serde_json::from_slice::<FlowList>(&body) {
                    Ok(list) => flows.extend(list.flows),
                    Err(e) => {
                        failures += 1;
                        eprintln!(
                            "netiso: {} answered with no flow listing ({e}): {}",
                            endpoint.name(),
                            excerpt(&body)
                        );
                    }
                },
                Ok((status, body)) => {
                    failures += 1;
                    eprintln!("netiso: {} answered HTTP {status}: {}", endpoint.name(), excerpt(&body));
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("netiso: {}: {e:#}", endpoint.name());
                }
            }
        }
        if failures == endpoints.len() {
            bail!("no server answered with flows (above)");
        }
        // Merged across servers and ordered by time; ids are nanosecond timestamps.
        flows.sort_by_key(|r| r.id);
        let skip = flows.len().saturating_sub(args.last);
        let mut out = stdout.lock();
        for r in &flows[skip..] {
            print(&mut out, args.output, r)?;
        }
        if failures > 0 {
            bail!("{failures} of {} servers did not answer (above); the listing is partial", endpoints.len());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One line of a followed stream: a record to print, a notice from the server, or an error.
fn follow_line(server: &str, format: Format, line: &str) -> anyhow::Result<()> {
    if let Ok(notice) = serde_json::from_str::<StreamNotice>(line) {
        if notice.ends {
            bail!("{}", notice.error);
        }
        eprintln!("netiso: {server}: {}", notice.error);
        return Ok(());
    }
    match serde_json::from_str::<FlowRecord>(line) {
        Ok(r) => print(&mut std::io::stdout().lock(), format, &r)?,
        Err(e) => bail!("{server} sent something that is not a flow record ({e}): {}", excerpt(line.as_bytes())),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvidenceArgs {
    /// The flow record's id (from observe).
    pub id: String,
    #[command(flatten)]
    pub target: Target,
}

pub fn evidence(args: EvidenceArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let endpoints = args.target.endpoints().await?;
        let path = format!("/v1/flows/{}/evidence", encode(&args.id));
        let mut last_error = String::new();
        for endpoint in &endpoints {
            match client::get(endpoint, &path).await {
                Ok((200, body)) => match serde_json::from_slice::<EvidenceBundle>(&body) {
                    Ok(bundle) => {
                        println!("{}", serde_json::to_string_pretty(&bundle)?);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(e) => {
                        last_error =
                            format!("{} answered with no evidence bundle ({e}): {}", endpoint.name(), excerpt(&body))
                    }
                },
                Ok((status, body)) => {
                    last_error = format!("{} answered HTTP {status}: {}", endpoint.name(), excerpt(&body))
                }
                Err(e) => last_error = format!("{}: {e:#}", endpoint.name()),
            }
        }
        bail!("no server has record {}; last answer: {last_error}", args.id)
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::compact;
    use crate::evidence::record::FlowRecord;

    #[test]
    fn compact_lines_say_when_a_reason_was_inferred() {
        let mut record: FlowRecord = serde_json::from_value(json!({
            "id": "1",
            "time": "2026-12-05T04:17:21Z",
            "last_seen": "2026-12-05T04:17:21Z",
            "node": "n1",
            "verdict": "dropped",
            "protocol": "TCP",
            "source": {"kind": "pod", "namespace": "develop", "pod": "debug", "workload": null, "ip": "10.244.0.10", "port": 40009},
            "destination": {"kind": "pod", "namespace": "production", "pod": "api", "workload": null, "ip": "10.244.0.30", "port": 8080},
            "reason": "NETFILTER_DROP",
            "packets": 1,
            "bytes": 60,
            "policy": {"verdict": "denied", "direction": "both", "attribution": "denied_by_network_policy", "policies": [], "summary": ""},
        }))
        .unwrap();
        assert!(compact(&record).contains(" NETFILTER_DROP (denied_by_network_policy) id=1"), "{}", compact(&record));
        // A record written before the sides were kept names its policies.
        record.policy.policies = serde_json::from_value(json!([{"namespace": "production", "name": "deny"}])).unwrap();
        assert!(
            compact(&record).contains(" (denied_by_network_policy) by production/deny id=1"),
            "{}",
            compact(&record)
        );
        record.policy.ingress = Some(
            serde_json::from_value(json!({"pod": "production/api", "verdict": "denied",
                "isolated_by": [{"namespace": "production", "name": "deny"}, {"namespace": "production", "name": "allow-web"}],
                "nearest": {"policy": {"namespace": "production", "name": "allow-web"}, "rule": 0, "summary": ""}}))
            .unwrap(),
        );
        record.policy.egress = Some(
            serde_json::from_value(json!({"pod": "develop/debug", "verdict": "allowed", "isolated_by": []})).unwrap(),
        );
        assert!(
            compact(&record).contains(
                " (denied_by_network_policy) denied by ingress of production/api (isolated by production/allow-web,production/deny; nearest production/allow-web rule 0) id=1"
            ),
            "{}",
            compact(&record)
        );
        // A drop NetworkPolicy does not explain names no policy.
        record.policy.attribution = crate::evidence::record::Attribution::DroppedByKernelForNonPolicyReason;
        record.policy.policies.clear();
        assert!(compact(&record).ends_with(" (dropped_by_kernel_for_non_policy_reason) id=1"), "{}", compact(&record));
        record.policy.attribution = crate::evidence::record::Attribution::DeniedByNetworkPolicy;
        record.reason_inferred = true;
        assert!(
            compact(&record).contains(" NETFILTER_DROP (inferred) (denied_by_network_policy)"),
            "{}",
            compact(&record)
        );
        // Reached through a Service: both the backend and the Service; an untranslated ClusterIP
        // by its Service's name.
        record.destination.service = Some("production/api".into());
        assert!(compact(&record).contains(" -> production/api:8080 (service/production/api) "), "{}", compact(&record));
        record.destination = serde_json::from_value(json!({"kind": "service", "namespace": "production", "pod": null,
            "workload": null, "service": "production/payments", "ip": "10.96.0.40", "port": 80}))
        .unwrap();
        assert!(compact(&record).contains(" -> service/production/payments:80 "), "{}", compact(&record));
        assert!(!compact(&record).contains("attempts"), "one attempt goes without saying");
        record.attempts = 20_000;
        assert!(compact(&record).contains(" x20000 attempts id=1"), "{}", compact(&record));
        record.destination.port = 0;
        record.ports = Some(crate::evidence::record::PortSweep { count: 19_983, ranges: "18-20000".into() });
        assert!(
            compact(&record).contains(" -> service/production/payments:18-20000 (19983 ports) "),
            "{}",
            compact(&record)
        );
    }
}
