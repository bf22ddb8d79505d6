//! `netiso top` and `netiso graph`: what is blocked right now, ranked, and who talks to whom,
//! over a window of every server's records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::client::Target;
use super::filters::Filters;
use super::lines::{self, TimeFormat};
use super::observe::{Listing, Window, collect};
use crate::cluster::{EndpointKind, Identity};
use crate::evidence::record::{Attribution, FlowRecord, FlowVerdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// Source pod to destination and port.
    Conversation,
    /// Source namespace to destination namespace.
    Namespace,
    /// Source pod to destination pod, any port.
    Pods,
    /// Destination protocol and port.
    Port,
    /// The denying side and the rule that came nearest; the kernel's reason for other drops.
    Policy,
}

impl Grouping {
    const ALL: [Grouping; 5] =
        [Grouping::Conversation, Grouping::Namespace, Grouping::Pods, Grouping::Port, Grouping::Policy];

    fn title(self) -> &'static str {
        match self {
            Grouping::Conversation => "CONVERSATION",
            Grouping::Namespace => "NAMESPACES",
            Grouping::Pods => "PODS",
            Grouping::Port => "PORT",
            Grouping::Policy => "DECIDED BY",
        }
    }

    /// The record's key in this grouping.
    fn key(self, r: &FlowRecord) -> String {
        match self {
            Grouping::Conversation => {
                format!("{} -> {} {}", who(&r.source), lines::destination(r), r.protocol)
            }
            Grouping::Namespace => format!("{} -> {}", namespace(&r.source), namespace(&r.destination)),
            Grouping::Pods => format!("{} -> {}", who(&r.source), who(&r.destination)),
            Grouping::Port => match &r.ports {
                Some(sweep) => format!("{}/{} ({} ports)", r.protocol, sweep.ranges, sweep.count),
                None => format!("{}/{}", r.protocol, r.destination.port),
            },
            Grouping::Policy => decided_by(r),
        }
    }
}

/// An end without its port: the pod, the Service, else the address.
fn who(id: &Identity) -> String {
    id.pod_key()
        .or_else(|| id.service.as_ref().map(|service| format!("service/{service}")))
        .unwrap_or_else(|| id.ip.to_string())
}

/// The end's namespace, or what it is when it has none: `node`, `world`.
fn namespace(id: &Identity) -> String {
    match (&id.namespace, id.kind) {
        (Some(ns), _) => ns.clone(),
        (None, EndpointKind::Node) => "node".into(),
        (None, EndpointKind::World) => "world".into(),
        (None, EndpointKind::Pod | EndpointKind::Service) => "unknown".into(),
    }
}

/// What decided: for a policy drop each denying side and the rule nearest to allowing it; for
/// any other drop the kernel's reason; for a forwarded flow what allowed it.
fn decided_by(r: &FlowRecord) -> String {
    match r.policy.attribution {
        Attribution::DeniedByNetworkPolicy => {
            let sides: Vec<String> = r
                .policy
                .denying_sides()
                .map(|(direction, side)| {
                    let namespace = side.namespace();
                    match &side.nearest {
                        Some(nearest) => format!("{} of {namespace}, nearest {nearest}", direction.as_str()),
                        None => format!("{} of {namespace}, no rule near", direction.as_str()),
                    }
                })
                .collect();
            if sides.is_empty() {
                lines::blame(r).unwrap_or_else(|| "NetworkPolicy".into())
            } else {
                sides.join(" and ")
            }
        }
        _ if r.verdict == FlowVerdict::Dropped => format!("not NetworkPolicy: {}", lines::why(r)),
        _ => lines::why(r),
    }
}

/// One row of a ranking.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ranked {
    pub key: String,
    /// Connection attempts (a flood's source ports each count).
    pub attempts: u64,
    pub packets: u64,
    pub records: u64,
    #[serde(with = "crate::evidence::record::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "crate::evidence::record::rfc3339")]
    pub last_seen: SystemTime,
    pub nodes: BTreeSet<String>,
}

/// The `limit` keys with the most attempts (then packets) in `grouping`.
pub fn rank(flows: &[FlowRecord], grouping: Grouping, limit: usize) -> Vec<Ranked> {
    let mut by_key: BTreeMap<String, Ranked> = BTreeMap::new();
    for r in flows {
        let key = grouping.key(r);
        let row = by_key.entry(key.clone()).or_insert_with(|| Ranked {
            key,
            attempts: 0,
            packets: 0,
            records: 0,
            first_seen: r.time,
            last_seen: r.last_seen,
            nodes: BTreeSet::new(),
        });
        row.attempts += r.attempts;
        row.packets += r.packets;
        row.records += 1;
        row.first_seen = row.first_seen.min(r.time);
        row.last_seen = row.last_seen.max(r.last_seen);
        row.nodes.insert(r.node.clone());
    }
    let mut rows: Vec<Ranked> = by_key.into_values().collect();
    rows.sort_by(|a, b| (b.attempts, b.packets).cmp(&(a.attempts, a.packets)).then_with(|| a.key.cmp(&b.key)));
    rows.truncate(limit);
    rows
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TopFormat {
    Text,
    Json,
}

/// The servers, the filters and the window a summary reads.
#[derive(Debug, Args)]
pub struct Span {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub filters: Filters,
    /// The window's start: a duration ago (15m) or an RFC 3339 time.
    #[arg(long, default_value = "1h")]
    pub since: String,
    #[arg(long)]
    pub until: Option<String>,
}

impl Span {
    /// The filters' parameters and the window's; `default_verdict` unless a verdict is chosen.
    fn params(&self, default_verdict: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
        let mut params = self.filters.params()?;
        if let Some(verdict) = default_verdict.filter(|_| !self.filters.choose_verdict()) {
            params.push(("verdict".into(), verdict.into()));
        }
        params.push(("since".into(), self.since.clone()));
        if let Some(until) = &self.until {
            params.push(("until".into(), until.clone()));
        }
        Ok(params)
    }

    /// Every server's records of the window.
    async fn read(&self, params: &[(String, String)]) -> anyhow::Result<Listing> {
        let endpoints = self.target.endpoints().await?;
        collect(&endpoints, params, Window::All).await
    }
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub span: Span,
    /// Rank by this only (every grouping when not given).
    #[arg(long, value_enum)]
    pub by: Option<Grouping>,
    /// Rows per grouping.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: TopFormat,
    #[arg(long, value_enum, ignore_case = true, default_value = "StampMilli")]
    pub time_format: TimeFormat,
}

#[derive(Serialize)]
struct TopAnswer {
    since: String,
    until: Option<String>,
    verdict: String,
    /// Records read across the servers.
    records: usize,
    servers: usize,
    rankings: BTreeMap<Grouping, Vec<Ranked>>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub fn top(args: TopArgs) -> anyhow::Result<ExitCode> {
    let params = args.span.params(Some("dropped"))?;
    let verdict = params.iter().find(|(k, _)| k == "verdict").map(|(_, v)| v.to_lowercase()).unwrap_or_default();
    runtime()?.block_on(async move {
        let listing = args.span.read(&params).await?;
        let groupings: Vec<Grouping> = args.by.map_or(Grouping::ALL.to_vec(), |by| vec![by]);
        let rankings: BTreeMap<Grouping, Vec<Ranked>> =
            groupings.iter().map(|g| (*g, rank(&listing.flows, *g, args.limit.max(1)))).collect();
        let answer = TopAnswer {
            since: args.span.since.clone(),
            until: args.span.until.clone(),
            verdict,
            records: listing.flows.len(),
            servers: listing.servers - listing.failures,
            rankings,
        };
        match args.output {
            TopFormat::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
            TopFormat::Text => print!("{}", top_text(&answer, &groupings, args.time_format)),
        }
        listing.complete()?;
        Ok(ExitCode::SUCCESS)
    })
}

fn top_text(answer: &TopAnswer, groupings: &[Grouping], time: TimeFormat) -> String {
    let mut out = String::new();
    let until = answer.until.as_deref().map(|u| format!(" until {u}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "{} flows since {}{until}: {} records from {} server{}",
        answer.verdict,
        answer.since,
        answer.records,
        answer.servers,
        if answer.servers == 1 { "" } else { "s" }
    );
    for grouping in groupings {
        let rows = &answer.rankings[grouping];
        let _ = writeln!(out);
        if rows.is_empty() {
            let _ = writeln!(out, "{}: none", grouping.title());
            continue;
        }
        let header = [grouping.title(), "ATTEMPTS", "PACKETS", "FIRST SEEN", "LAST SEEN", "NODES"].map(str::to_owned);
        let table: Vec<[String; 6]> = std::iter::once(header)
            .chain(rows.iter().map(|row| {
                [
                    row.key.clone(),
                    row.attempts.to_string(),
                    row.packets.to_string(),
                    time.format(row.first_seen),
                    time.format(row.last_seen),
                    row.nodes.iter().cloned().collect::<Vec<_>>().join(","),
                ]
            }))
            .collect();
        out.push_str(&lines::table(&table, [0; 6]));
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// A table of edges.
    Text,
    /// Graphviz: `netiso graph -o dot | dot -Tsvg > graph.svg`.
    Dot,
    /// A Mermaid flowchart, as GitHub and GitLab render in Markdown.
    Mermaid,
    Json,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub span: Span,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: GraphFormat,
}

/// Who talked to whom: workloads (a pod's owner, else the pod), Services and addresses, and the
/// ports between them, with what was forwarded and what was blocked.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `TCP/8080`, ...
    pub ports: BTreeSet<String>,
    /// Attempts forwarded and dropped.
    pub forwarded: u64,
    pub dropped: u64,
}

/// A graph node's name: `namespace/workload` (its owner's name), `service/namespace/name`, or the
/// address (`world` outside the cluster).
fn vertex(id: &Identity) -> String {
    match (&id.namespace, id.owner_name(), &id.service, id.kind) {
        (Some(ns), Some(name), _, _) => format!("{ns}/{name}"),
        (_, _, Some(service), _) => format!("service/{service}"),
        (_, _, _, EndpointKind::World) => format!("world {}", id.ip),
        _ => format!("{} {}", namespace(id), id.ip),
    }
}

pub fn edges(flows: &[FlowRecord]) -> Vec<Edge> {
    let mut by_pair: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for r in flows.iter().filter(|r| !r.is_reply) {
        let (from, to) = (vertex(&r.source), vertex(&r.destination));
        let edge = by_pair.entry((from.clone(), to.clone())).or_insert_with(|| Edge { from, to, ..Default::default() });
        edge.ports.insert(match &r.ports {
            Some(sweep) => format!("{}/{}", r.protocol, sweep.ranges),
            None => format!("{}/{}", r.protocol, r.destination.port),
        });
        match r.verdict {
            FlowVerdict::Forwarded => edge.forwarded += r.attempts,
            FlowVerdict::Dropped => edge.dropped += r.attempts,
        }
    }
    by_pair.into_values().collect()
}

fn ports(edge: &Edge) -> String {
    edge.ports.iter().cloned().collect::<Vec<_>>().join(",")
}

fn graph_text(edges: &[Edge]) -> String {
    let header = ["FROM", "TO", "PORTS", "FORWARDED", "BLOCKED"].map(str::to_owned);
    let rows: Vec<[String; 5]> = std::iter::once(header)
        .chain(
            edges
                .iter()
                .map(|e| [e.from.clone(), e.to.clone(), ports(e), e.forwarded.to_string(), e.dropped.to_string()]),
        )
        .collect();
    lines::table(&rows, [0; 5])
}

/// Vertices by namespace (the first part of their name), for clusters and subgraphs.
fn by_namespace(edges: &[Edge]) -> BTreeMap<String, BTreeSet<String>> {
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for vertex in edges.iter().flat_map(|e| [&e.from, &e.to]) {
        let group = match vertex.split_once('/') {
            Some(("service", rest)) => rest.split_once('/').map_or(rest, |(ns, _)| ns),
            Some((ns, _)) => ns,
            None => vertex.split_once(' ').map_or(vertex.as_str(), |(kind, _)| kind),
        };
        groups.entry(group.to_owned()).or_default().insert(vertex.clone());
    }
    groups
}

/// Graphviz: a cluster per namespace; blocked edges red and dashed, labelled with their ports.
fn dot(edges: &[Edge]) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::from("digraph netiso {\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];\n");
    for (i, (namespace, vertices)) in by_namespace(edges).iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_{i} {{\n    label={};", quote(namespace));
        for v in vertices {
            let _ = writeln!(out, "    {};", quote(v));
        }
        out.push_str("  }\n");
    }
    for e in edges {
        let style = match (e.forwarded, e.dropped) {
            (_, 0) => String::new(),
            (0, dropped) => {
                format!(", color=red, style=dashed, fontcolor=red, xlabel={}", quote(&format!("{dropped} blocked")))
            }
            (_, dropped) => format!(", color=orange, xlabel={}", quote(&format!("{dropped} blocked"))),
        };
        let _ = writeln!(out, "  {} -> {} [label={}{style}];", quote(&e.from), quote(&e.to), quote(&ports(e)));
    }
    out.push_str("}\n");
    out
}

/// Mermaid: a subgraph per namespace; blocked edges dotted and red.
fn mermaid(edges: &[Edge]) -> String {
    let groups = by_namespace(edges);
    let ids: BTreeMap<&String, String> =
        groups.values().flatten().enumerate().map(|(i, v)| (v, format!("n{i}"))).collect();
    let label = |s: &str| s.replace('"', "#quot;");
    let mut out = String::from("flowchart LR\n");
    for (i, (namespace, vertices)) in groups.iter().enumerate() {
        let _ = writeln!(out, "  subgraph g{i}[\"{}\"]", label(namespace));
        for v in vertices {
            let _ = writeln!(out, "    {}[\"{}\"]", ids[v], label(v));
        }
        out.push_str("  end\n");
    }
    let mut blocked = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let ports = label(&ports(e));
        if e.dropped > 0 {
            blocked.push(i.to_string());
            let _ = writeln!(out, "  {} -. \"{ports} ({} blocked)\" .-> {}", ids[&e.from], e.dropped, ids[&e.to]);
        } else {
            let _ = writeln!(out, "  {} -- \"{ports}\" --> {}", ids[&e.from], ids[&e.to]);
        }
    }
    if !blocked.is_empty() {
        let _ = writeln!(out, "  linkStyle {} stroke:red,color:red", blocked.join(","));
    }
    out
}

pub fn graph(args: GraphArgs) -> anyhow::Result<ExitCode> {
    let params = args.span.params(None)?;
    runtime()?.block_on(async move {
        let listing = args.span.read(&params).await?;
        let edges = edges(&listing.flows);
        match args.output {
            GraphFormat::Text => print!("{}", graph_text(&edges)),
            GraphFormat::Dot => print!("{}", dot(&edges)),
            GraphFormat::Mermaid => print!("{}", mermaid(&edges)),
            GraphFormat::Json => println!("{}", serde_json::to_string_pretty(&edges)?),
        }
        listing.complete()?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::cli::lines::tests::record;

    /// develop/debug's attempts at production/api:8080 on two nodes, one at :9090, and a DNS
    /// lookup nothing answered.
    fn flows() -> Vec<FlowRecord> {
        let at = |seconds: u64| std::time::UNIX_EPOCH + Duration::from_secs(1_796_540_000 + seconds);
        let denied = |id: u64, port: u16, attempts: u64, node: &str, seconds: u64| {
            let mut r = record();
            r.id = id;
            r.destination.port = port;
            r.attempts = attempts;
            r.packets = attempts * 2;
            r.node = node.into();
            (r.time, r.last_seen) = (at(seconds), at(seconds + 5));
            r.policy.ingress = Some(
                serde_json::from_value(json!({"pod": "production/api", "verdict": "denied",
                    "isolated_by": [{"namespace": "production", "name": "deny"}],
                    "nearest": {"policy": {"namespace": "production", "name": "allow-web"}, "rule": 0, "summary": ""}}))
                .unwrap(),
            );
            r
        };
        let mut no_socket = record();
        no_socket.id = 9;
        no_socket.protocol = crate::datapath::record::IpProtocol::Udp;
        no_socket.destination =
            serde_json::from_value(json!({"kind": "pod", "namespace": "kube-system", "pod": "coredns",
            "workload": "Deployment/coredns", "ip": "10.244.0.2", "port": 53}))
            .unwrap();
        no_socket.reason = Some("NO_SOCKET".into());
        no_socket.policy.attribution = Attribution::DroppedByKernelForNonPolicyReason;
        vec![denied(1, 8080, 3, "n1", 10), denied(2, 8080, 4, "n2", 20), denied(3, 9090, 1, "n1", 30), no_socket]
    }

    #[test]
    fn rankings_sum_attempts_and_packets_and_span_first_to_last_seen_across_nodes() {
        let flows = flows();
        let conversations = rank(&flows, Grouping::Conversation, 10);
        assert_eq!(conversations[0].key, "develop/debug -> production/api:8080 TCP");
        assert_eq!((conversations[0].attempts, conversations[0].packets, conversations[0].records), (7, 14, 2));
        assert_eq!(conversations[0].first_seen, flows[0].time);
        assert_eq!(conversations[0].last_seen, flows[1].last_seen);
        assert_eq!(conversations[0].nodes.iter().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(conversations.len(), 3);
        assert_eq!(rank(&flows, Grouping::Conversation, 1).len(), 1, "the limit");

        let keys = |g| rank(&flows, g, 10).into_iter().map(|r| (r.key, r.attempts)).collect::<Vec<_>>();
        assert_eq!(
            keys(Grouping::Namespace),
            [("develop -> production".into(), 8), ("develop -> kube-system".into(), 1)]
        );
        assert_eq!(keys(Grouping::Pods)[0], ("develop/debug -> production/api".into(), 8));
        assert_eq!(keys(Grouping::Port), [("TCP/8080".into(), 7), ("TCP/9090".into(), 1), ("UDP/53".into(), 1)]);
        assert_eq!(
            keys(Grouping::Policy),
            [
                ("ingress of production, nearest production/allow-web rule 0".into(), 8),
                ("not NetworkPolicy: nothing listens on the port".into(), 1)
            ]
        );
    }

    #[test]
    fn the_graph_joins_a_workloads_pods_and_marks_what_was_blocked() {
        let mut flows = flows();
        let mut allowed = record();
        allowed.verdict = FlowVerdict::Forwarded;
        allowed.protocol = crate::datapath::record::IpProtocol::Udp;
        allowed.policy.attribution = Attribution::AllowedByNetworkPolicy;
        allowed.source.workload = Some("Deployment/debug".into());
        allowed.destination = flows[3].destination.clone();
        allowed.destination.pod = Some("coredns-5d78c9869d-abcde".into());
        flows.push(allowed);
        let edges = edges(&flows);
        let dns = edges.iter().find(|e| e.to == "kube-system/coredns").unwrap();
        assert_eq!((dns.forwarded, dns.dropped, dns.ports.len()), (1, 1, 1), "{edges:?}");
        let api = edges.iter().find(|e| e.to == "production/api").unwrap();
        assert_eq!((api.forwarded, api.dropped, ports(api).as_str()), (0, 8, "TCP/8080,TCP/9090"));

        let text = graph_text(&edges);
        assert!(text.starts_with("FROM"), "{text}");
        let dot = dot(&edges);
        assert!(dot.starts_with("digraph netiso {") && dot.contains("subgraph cluster_"), "{dot}");
        assert!(
            dot.contains(r#""develop/debug" -> "production/api" [label="TCP/8080,TCP/9090", color=red, style=dashed"#),
            "{dot}"
        );
        let mermaid = mermaid(&edges);
        assert!(mermaid.starts_with("flowchart LR\n") && mermaid.contains("subgraph"), "{mermaid}");
        assert!(mermaid.contains(r#"-. "TCP/8080,TCP/9090 (8 blocked)" .->"#), "{mermaid}");
        assert!(mermaid.contains("linkStyle "), "{mermaid}");
    }
}
