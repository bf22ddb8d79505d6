//! `netiso observe` and `netiso evidence`: what was blocked, where, and why, from one node or
//! every node. `observe` takes `hubble observe`'s flags.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, ValueEnum};

use super::client::{self, Endpoint, Target, encode, excerpt};
use crate::cluster::{EndpointKind, Identity};
use crate::evidence::record::{EvidenceBundle, FlowList, FlowRecord, FlowVerdict, MAX_LIMIT, StreamNotice};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Compact,
    Table,
    /// One JSON record per line.
    #[value(alias = "jsonpb")]
    Json,
    /// Each flow as `KEY: value` lines, as `hubble observe -o dict`.
    Dict,
}

/// How times print, by Hubble's names for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TimeFormat {
    /// `Dec  6 07:26:31.123`, local time.
    #[value(name = "StampMilli")]
    StampMilli,
    #[value(name = "RFC3339")]
    Rfc3339,
    #[value(name = "RFC3339Milli")]
    Rfc3339Milli,
    #[value(name = "RFC3339Micro")]
    Rfc3339Micro,
    #[value(name = "RFC3339Nano")]
    Rfc3339Nano,
    #[value(name = "RFC1123Z")]
    Rfc1123Z,
}

impl TimeFormat {
    /// `t` in the local time zone (the `TZ` variable, else the system's; UTC where none is set).
    pub fn format(self, t: SystemTime) -> String {
        self.format_in(t, jiff::tz::TimeZone::system())
    }

    fn format_in(self, t: SystemTime, zone: jiff::tz::TimeZone) -> String {
        let Ok(timestamp) = jiff::Timestamp::try_from(t) else { return format!("{t:?}") };
        let local = timestamp.to_zoned(zone);
        let rfc3339 = |fraction: &str| {
            let offset = if local.offset().seconds() == 0 { "Z".into() } else { local.strftime("%:z").to_string() };
            format!("{}{offset}", local.strftime(&format!("%Y-%m-%dT%H:%M:%S{fraction}")))
        };
        match self {
            TimeFormat::StampMilli => local.strftime("%b %e %H:%M:%S%.3f").to_string(),
            TimeFormat::Rfc3339 => rfc3339(""),
            TimeFormat::Rfc3339Milli => rfc3339("%.3f"),
            TimeFormat::Rfc3339Micro => rfc3339("%.6f"),
            TimeFormat::Rfc3339Nano => rfc3339("%.9f"),
            TimeFormat::Rfc1123Z => local.strftime("%a, %d %b %Y %H:%M:%S %z").to_string(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub target: Target,
    /// DROPPED or FORWARDED (any case; drop and forward too).
    #[arg(long, help_heading = "Filters")]
    pub verdict: Option<String>,
    /// Hubble's event type: drop (dropped flows) or trace (forwarded flows).
    #[arg(long = "type", short = 't', value_name = "TYPE", help_heading = "Filters")]
    pub event_type: Option<String>,
    /// Either end in this namespace.
    #[arg(long, short = 'n', help_heading = "Filters")]
    pub namespace: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_namespace: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_namespace: Option<String>,
    /// Either end: namespace/pod (a name prefix: production/api finds production/api-7d9f8-x2x4k),
    /// namespace/ (every pod of it), or a pod name prefix in any namespace.
    #[arg(long, help_heading = "Filters")]
    pub pod: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_pod: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_pod: Option<String>,
    /// Either end's labels match this selector: app=api,tier!=db,!canary.
    #[arg(long, short = 'l', help_heading = "Filters")]
    pub label: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_label: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_label: Option<String>,
    /// Either end's address: an address or a CIDR (10.244.0.0/16).
    #[arg(long, help_heading = "Filters")]
    pub ip: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_ip: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_ip: Option<String>,
    /// Either end's port (a port scan's destination ports included).
    #[arg(long, help_heading = "Filters")]
    pub port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub from_port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub to_port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub protocol: Option<String>,
    /// The kernel's drop reason, e.g. NETFILTER_DROP.
    #[arg(long, help_heading = "Filters")]
    pub reason: Option<String>,
    /// namespace/name of a NetworkPolicy.
    #[arg(long, help_heading = "Filters")]
    pub policy: Option<String>,
    /// Recorded on this node: a name, or a pattern like worker-*.
    #[arg(long, help_heading = "Filters")]
    pub node_name: Option<String>,
    /// Leave out the flows the next filter matches (--not --namespace kube-system); several
    /// negated filters leave out the flows matching all of them.
    #[arg(long, num_args = 0, default_missing_value = "true", action = ArgAction::Append, help_heading = "Filters")]
    pub not: Vec<bool>,
    /// RFC 3339 time or a duration ago (5m). Without --last or --first: every flow since then.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// The last N flows after merging every server (default 20, or the whole --since window).
    #[arg(long, conflicts_with_all = ["first", "all"])]
    pub last: Option<usize>,
    /// The first N flows (of the --since window, or of all that are kept).
    #[arg(long, conflicts_with_all = ["all", "follow"])]
    pub first: Option<usize>,
    /// Every flow kept that matches (up to 100,000 per server; the command says when it stops short).
    #[arg(long, conflicts_with = "follow")]
    pub all: bool,
    /// Keep printing new flows as they are recorded.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value = "compact")]
    pub output: Format,
    /// Print the node's name on compact lines (always when several servers answer).
    #[arg(long)]
    pub print_node_name: bool,
    #[arg(long, value_enum, ignore_case = true, default_value = "StampMilli")]
    pub time_format: TimeFormat,
    /// The filters a preceding --not negates, by argument id (from the command line's order).
    #[arg(skip)]
    pub negated: BTreeSet<String>,
}

/// The filter arguments, by id, and the API parameter each becomes.
const FILTERS: [(&str, &str); 21] = [
    ("verdict", "verdict"),
    ("event_type", "verdict"),
    ("namespace", "namespace"),
    ("from_namespace", "from-namespace"),
    ("to_namespace", "to-namespace"),
    ("pod", "pod"),
    ("from_pod", "from-pod"),
    ("to_pod", "to-pod"),
    ("label", "label"),
    ("from_label", "from-label"),
    ("to_label", "to-label"),
    ("ip", "ip"),
    ("from_ip", "from-ip"),
    ("to_ip", "to-ip"),
    ("port", "port"),
    ("from_port", "from-port"),
    ("to_port", "to-port"),
    ("protocol", "protocol"),
    ("reason", "reason"),
    ("policy", "policy"),
    ("node_name", "node"),
];

/// Which filters the command line's `--not`s negate: each the argument right after it, which
/// must be a filter.
pub fn negated(matches: &ArgMatches) -> Result<BTreeSet<String>, String> {
    let given: Vec<(usize, &str)> = matches
        .ids()
        .map(|id| id.as_str())
        .filter(|id| *id != "not" && matches.value_source(id) == Some(ValueSource::CommandLine))
        .filter_map(|id| Some((matches.indices_of(id)?.next()?, id)))
        .collect();
    let mut negated = BTreeSet::new();
    let nots = matches.indices_of("not").filter(|_| matches.value_source("not") == Some(ValueSource::CommandLine));
    for not in nots.into_iter().flatten() {
        let next = given.iter().filter(|(at, _)| *at > not).min_by_key(|(at, _)| *at);
        match next {
            Some((_, id)) if FILTERS.iter().any(|(filter, _)| filter == id) => negated.insert(id.to_string()),
            _ => return Err("--not goes right before the filter it negates: --not --namespace kube-system".into()),
        };
    }
    Ok(negated)
}

/// How many flows, and from which end of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Last(usize),
    First(usize),
    /// Every matching flow, up to a cap per server.
    All,
}

/// The most flows one server gives for --all or a --since window.
const MAX_FLOWS: usize = 100_000;

impl ObserveArgs {
    fn window(&self) -> Window {
        match (self.last, self.first) {
            (Some(n), _) => Window::Last(n),
            (None, Some(n)) => Window::First(n),
            (None, None) if self.all || (self.since.is_some() && !self.follow) => Window::All,
            (None, None) => Window::Last(20),
        }
    }

    /// The API parameters of the filters (`not.` before a negated one's).
    fn filter_params(&self) -> anyhow::Result<Vec<(String, String)>> {
        let event_type = match self.event_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("drop") => Some("dropped".to_owned()),
            Some("trace") => Some("forwarded".to_owned()),
            Some(other) => bail!("--type {other}: use drop (dropped flows) or trace (forwarded flows)"),
        };
        if let (Some(verdict), Some(_)) = (&self.verdict, &event_type) {
            bail!("--verdict {verdict} and --type both choose the verdict: give one");
        }
        let port = |p: Option<u16>| p.map(|p| p.to_string());
        let values = [
            self.verdict.clone(),
            event_type,
            self.namespace.clone(),
            self.from_namespace.clone(),
            self.to_namespace.clone(),
            self.pod.clone(),
            self.from_pod.clone(),
            self.to_pod.clone(),
            self.label.clone(),
            self.from_label.clone(),
            self.to_label.clone(),
            self.ip.clone(),
            self.from_ip.clone(),
            self.to_ip.clone(),
            port(self.port),
            port(self.from_port),
            port(self.to_port),
            self.protocol.clone(),
            self.reason.clone(),
            self.policy.clone(),
            self.node_name.clone(),
        ];
        let mut params: Vec<(String, String)> = FILTERS
            .iter()
            .zip(values)
            .filter_map(|((id, param), value)| {
                let name = if self.negated.contains(*id) { format!("not.{param}") } else { param.to_string() };
                Some((name, value?))
            })
            .collect();
        for (name, time) in [("since", &self.since), ("until", &self.until)] {
            if let Some(time) = time {
                params.push((name.into(), time.clone()));
            }
        }
        Ok(params)
    }

    /// The listing's path: the filters, then how much and where from.
    fn path(&self, filters: &[(String, String)], extra: &[(&str, String)]) -> String {
        let pairs =
            filters.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let encoded: Vec<String> = pairs.map(|(k, v)| format!("{k}={}", encode(v))).collect();
        format!("/v1/flows?{}", encoded.join("&"))
    }
}

/// Reads pages until it has `want` records or no more match; says whether more match beyond
/// what it returns. `page(cursor, limit)` asks for the page after `cursor`.
async fn pages<F, Fut>(mut page: F, want: usize) -> anyhow::Result<(Vec<FlowRecord>, bool)>
where
    F: FnMut(Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<FlowList>>,
{
    let mut flows = Vec::new();
    let mut cursor = None;
    loop {
        let limit = (want - flows.len()).clamp(1, MAX_LIMIT);
        let list = page(cursor.take(), limit).await?;
        flows.extend(list.flows);
        if !list.more {
            return Ok((flows, false));
        }
        if flows.len() >= want || list.next.is_none() {
            flows.truncate(want);
            return Ok((flows, true));
        }
        cursor = list.next;
    }
}

/// One page of a daemon's listing, or an error naming the daemon and what it answered.
async fn page_of(endpoint: &Endpoint, path: &str) -> anyhow::Result<FlowList> {
    match client::get(endpoint, path).await {
        Ok((200, body)) => serde_json::from_slice::<FlowList>(&body)
            .with_context(|| format!("{} answered with no flow listing: {}", endpoint.name(), excerpt(&body))),
        Ok((status, body)) => bail!("{} answered HTTP {status}: {}", endpoint.name(), excerpt(&body)),
        Err(e) => Err(e.context(endpoint.name())),
    }
}

/// How a flow prints.
#[derive(Clone, Copy, Debug)]
struct Style {
    format: Format,
    time: TimeFormat,
    node: bool,
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

fn summary(r: &FlowRecord) -> String {
    let mut line = format!("{} {}", r.protocol, r.verdict.as_str().to_uppercase());
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
    line
}

fn compact(r: &FlowRecord, style: Style) -> String {
    let node = if style.node { format!(" [{}]", r.node) } else { String::new() };
    format!("{}{node} {} -> {} {} id={}", style.time.format(r.time), end(&r.source), destination(r), summary(r), r.id)
}

/// Hubble's event type for the verdict.
fn event_type(r: &FlowRecord) -> &'static str {
    match r.verdict {
        FlowVerdict::Dropped => "drop",
        FlowVerdict::Forwarded => "trace",
    }
}

fn dict(r: &FlowRecord, style: Style) -> String {
    [
        ("TIMESTAMP", style.time.format(r.time)),
        ("LAST SEEN", style.time.format(r.last_seen)),
        ("SOURCE", end(&r.source)),
        ("DESTINATION", destination(r)),
        ("TYPE", event_type(r).to_owned()),
        ("VERDICT", r.verdict.as_str().to_uppercase()),
        ("SUMMARY", summary(r)),
        ("NODE", r.node.clone()),
        ("ID", r.id.to_string()),
    ]
    .iter()
    .map(|(key, value)| format!("{key:>11}: {value}"))
    .collect::<Vec<_>>()
    .join("\n")
}

const TABLE_HEADER: [&str; 7] = ["TIME", "SOURCE", "DESTINATION", "PROTO", "VERDICT", "REASON", "POLICIES"];

fn table_row(cells: [&str; 7]) -> String {
    let [time, source, destination, proto, verdict, reason, policies] = cells;
    format!("{time:<30} {source:<36} {destination:<36} {proto:<6} {verdict:<10} {reason:<16} {policies}")
}

/// Prints one flow; a dict after the first of a listing is set apart by a line.
fn print(out: &mut impl Write, style: Style, r: &FlowRecord, first: bool) -> std::io::Result<()> {
    match style.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?),
        Format::Compact => writeln!(out, "{}", compact(r, style)),
        Format::Dict if first => writeln!(out, "{}", dict(r, style)),
        Format::Dict => writeln!(out, "------------\n{}", dict(r, style)),
        Format::Table => writeln!(
            out,
            "{}",
            table_row([
                &style.time.format(r.time),
                &end(&r.source),
                &destination(r),
                &r.protocol.to_string(),
                r.verdict.as_str(),
                r.reason.as_deref().unwrap_or("-"),
                &policies(r),
            ])
        ),
    }
}

pub fn observe(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    let filters = args.filter_params()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let endpoints = args.target.endpoints().await?;
        let style =
            Style { format: args.output, time: args.time_format, node: args.print_node_name || endpoints.len() > 1 };
        let stdout = std::io::stdout();
        if args.output == Format::Table {
            writeln!(stdout.lock(), "{}", table_row(TABLE_HEADER))?;
        }
        let window = args.window();
        if args.follow {
            let history = match window {
                Window::Last(n) => n.clamp(1, MAX_LIMIT),
                _ => MAX_LIMIT,
            };
            let path = args.path(&filters, &[("limit", history.to_string()), ("follow", "true".into())]);
            // A stream that fails or ends (the daemon restarted) ends the command with its reason:
            // a watcher must not mistake silence for quiet.
            let mut streams = tokio::task::JoinSet::new();
            for endpoint in endpoints {
                let path = path.clone();
                streams.spawn(async move {
                    let name = endpoint.name();
                    client::stream_lines(&endpoint, &path, |line| follow_line(&name, style, line))
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
        let (want, order, cursor) = match window {
            Window::Last(n) => (n, "newest", "before"),
            Window::First(n) => (n, "oldest", "after"),
            Window::All => (MAX_FLOWS, "newest", "before"),
        };
        let mut flows: Vec<FlowRecord> = Vec::new();
        let mut failures = 0;
        for endpoint in &endpoints {
            let page = |at: Option<String>, limit: usize| {
                let mut extra = vec![("limit", limit.to_string()), ("order", order.to_owned())];
                extra.extend(at.map(|id| (cursor, id)));
                let path = args.path(&filters, &extra);
                async move { page_of(endpoint, &path).await }
            };
            match pages(page, want.max(1)).await {
                Ok((listed, more)) => {
                    if more && window == Window::All {
                        eprintln!(
                            "netiso: {} holds more than {MAX_FLOWS} matching flows; these are its newest {MAX_FLOWS}: narrow the filters or the --since/--until window",
                            endpoint.name()
                        );
                    }
                    flows.extend(listed);
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("netiso: {e:#}");
                }
            }
        }
        if failures == endpoints.len() {
            bail!("no server answered with flows (above)");
        }
        // Merged across servers and ordered by time; ids are nanosecond timestamps.
        flows.sort_by_key(|r| r.id);
        let shown = match window {
            Window::Last(n) => &flows[flows.len().saturating_sub(n)..],
            Window::First(n) => &flows[..n.min(flows.len())],
            Window::All => &flows[..],
        };
        let mut out = stdout.lock();
        for (i, r) in shown.iter().enumerate() {
            print(&mut out, style, r, i == 0)?;
        }
        if failures > 0 {
            bail!("{failures} of {} servers did not answer (above); the listing is partial", endpoints.len());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One line of a followed stream: a record to print, a notice from the server, or an error.
fn follow_line(server: &str, style: Style, line: &str) -> anyhow::Result<()> {
    if let Ok(notice) = serde_json::from_str::<StreamNotice>(line) {
        if notice.ends {
            bail!("{}", notice.error);
        }
        eprintln!("netiso: {server}: {}", notice.error);
        return Ok(());
    }
    match serde_json::from_str::<FlowRecord>(line) {
        Ok(r) => print(&mut std::io::stdout().lock(), style, &r, false)?,
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

    use super::*;

    const STYLE: Style = Style { format: Format::Compact, time: TimeFormat::Rfc3339, node: false };

    fn observe(args: &[&str]) -> Result<ObserveArgs, clap::Error> {
        let argv = ["netiso", "observe"].iter().chain(args);
        match crate::cli::parse_from(argv)?.command {
            crate::cli::Command::Observe(args) => Ok(*args),
            other => panic!("{other:?}"),
        }
    }

    fn params(args: &[&str]) -> Vec<(String, String)> {
        observe(args).unwrap().filter_params().unwrap()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn not_negates_the_filter_right_after_it() {
        let got = params(&[
            "--not",
            "--namespace",
            "kube-system",
            "--verdict",
            "DROPPED",
            "--pod=production/",
            "--not",
            "--to-port",
            "53",
            "--since",
            "5m",
        ]);
        assert_eq!(
            got,
            [
                pair("verdict", "DROPPED"),
                pair("not.namespace", "kube-system"),
                pair("pod", "production/"),
                pair("not.to-port", "53"),
                pair("since", "5m")
            ]
        );
        assert_eq!(
            params(&["-t", "DROP", "--not", "-n", "a", "--node-name", "w-*"]),
            [pair("verdict", "dropped"), pair("not.namespace", "a"), pair("node", "w-*")]
        );
        for misplaced in [&["--namespace", "a", "--not"][..], &["--not", "--since", "5m", "--namespace", "a"]] {
            let error = observe(misplaced).unwrap_err().to_string();
            assert!(error.contains("--not goes right before the filter it negates"), "{error}");
        }
        let both = observe(&["--verdict", "dropped", "--type", "trace"]).unwrap().filter_params().unwrap_err();
        assert!(both.to_string().contains("give one"), "{both}");
        let unknown = observe(&["--type", "l7"]).unwrap().filter_params().unwrap_err();
        assert!(unknown.to_string().contains("use drop"), "{unknown}");
    }

    #[test]
    fn the_window_is_the_last_20_the_first_or_last_n_or_all_since() {
        let window = |args: &[&str]| observe(args).unwrap().window();
        assert_eq!(window(&[]), Window::Last(20));
        assert_eq!(window(&["--last", "5"]), Window::Last(5));
        assert_eq!(window(&["--first", "5"]), Window::First(5));
        assert_eq!(window(&["--all"]), Window::All);
        assert_eq!(window(&["--since", "1h"]), Window::All);
        assert_eq!(window(&["--since", "1h", "--last", "3"]), Window::Last(3));
        assert!(observe(&["--first", "5", "--last", "5"]).is_err());
        assert!(observe(&["--all", "--follow"]).is_err());
    }

    #[tokio::test]
    async fn pages_are_read_until_enough_or_none_is_left() {
        let records: Vec<FlowRecord> = (1..=25u64)
            .map(|id| {
                let mut r = record();
                r.id = id;
                r
            })
            .collect();
        // Newest first, `limit` at a time below the cursor, as a daemon answers.
        let asked = std::cell::Cell::new(0);
        let page = |cursor: Option<String>, limit: usize| {
            asked.set(asked.get() + 1);
            let below = cursor.map_or(u64::MAX, |c| c.parse().unwrap());
            let matching: Vec<FlowRecord> = records.iter().rev().filter(|r| r.id < below).cloned().collect();
            let more = matching.len() > limit;
            let flows: Vec<FlowRecord> = matching.into_iter().take(limit).collect();
            let next = more.then(|| flows.last().unwrap().id.to_string());
            async move { Ok(FlowList { flows, more, next }) }
        };
        let (flows, more) = pages(page, 10).await.unwrap();
        assert_eq!((flows.len(), more, flows[0].id, flows[9].id), (10, true, 25, 16));
        let (flows, more) = pages(page, 100).await.unwrap();
        assert_eq!((flows.len(), more), (25, false));
        assert_eq!(flows.iter().map(|r| r.id).collect::<Vec<_>>(), (1..=25).rev().collect::<Vec<_>>());
        asked.set(0);
        let (flows, more) = pages(|cursor, _| page(cursor, 7), 20).await.unwrap();
        assert_eq!((flows.len(), more, asked.get()), (20, true, 3), "three pages of seven, cut to twenty");
    }

    #[test]
    fn times_print_in_hubbles_formats() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_796_540_018_123_456_789);
        let utc = jiff::tz::TimeZone::UTC;
        let tokyo = jiff::tz::TimeZone::fixed(jiff::tz::offset(9));
        for (format, zone, expected) in [
            (TimeFormat::StampMilli, utc.clone(), "Dec  6 06:53:38.123"),
            (TimeFormat::Rfc3339, utc.clone(), "2026-12-06T06:53:38Z"),
            (TimeFormat::Rfc3339Milli, tokyo.clone(), "2026-12-06T15:53:38.123+09:00"),
            (TimeFormat::Rfc3339Micro, utc.clone(), "2026-12-06T06:53:38.123456Z"),
            (TimeFormat::Rfc3339Nano, utc.clone(), "2026-12-06T06:53:38.123456789Z"),
            (TimeFormat::Rfc1123Z, tokyo, "Sun, 06 Dec 2026 15:53:38 +0900"),
        ] {
            assert_eq!(format.format_in(t, zone), expected, "{format:?}");
        }
        assert_eq!(observe(&["--time-format", "rfc3339nano"]).unwrap().time_format, TimeFormat::Rfc3339Nano);
    }

    #[test]
    fn a_dict_has_one_key_per_line_and_flows_are_set_apart() {
        let style = Style { format: Format::Dict, ..STYLE };
        let mut out = Vec::new();
        print(&mut out, style, &record(), true).unwrap();
        print(&mut out, style, &record(), false).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "  TIMESTAMP: 2026-12-05T04:17:21Z",
            "     SOURCE: develop/debug:40009",
            "DESTINATION: production/api:8080",
            "       TYPE: drop",
            "    VERDICT: DROPPED",
            "    SUMMARY: TCP DROPPED NETFILTER_DROP (denied_by_network_policy)",
            "       NODE: n1",
            "         ID: 1",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line} missing from\n{text}");
        }
        assert_eq!(text.lines().filter(|l| *l == "------------").count(), 1, "{text}");
        assert!(!text.starts_with("---"));
    }

    fn record() -> FlowRecord {
        serde_json::from_value(json!({
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
        .unwrap()
    }

    #[test]
    fn compact_lines_say_when_a_reason_was_inferred() {
        let mut record = record();
        assert!(
            compact(&record, STYLE).contains(" NETFILTER_DROP (denied_by_network_policy) id=1"),
            "{}",
            compact(&record, STYLE)
        );
        // A record written before the sides were kept names its policies.
        record.policy.policies = serde_json::from_value(json!([{"namespace": "production", "name": "deny"}])).unwrap();
        assert!(
            compact(&record, STYLE).contains(" (denied_by_network_policy) by production/deny id=1"),
            "{}",
            compact(&record, STYLE)
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
            compact(&record, STYLE).contains(
                " (denied_by_network_policy) denied by ingress of production/api (isolated by production/allow-web,production/deny; nearest production/allow-web rule 0) id=1"
            ),
            "{}",
            compact(&record, STYLE)
        );
        // A drop NetworkPolicy does not explain names no policy.
        record.policy.attribution = crate::evidence::record::Attribution::DroppedByKernelForNonPolicyReason;
        record.policy.policies.clear();
        assert!(
            compact(&record, STYLE).ends_with(" (dropped_by_kernel_for_non_policy_reason) id=1"),
            "{}",
            compact(&record, STYLE)
        );
        record.policy.attribution = crate::evidence::record::Attribution::DeniedByNetworkPolicy;
        record.reason_inferred = true;
        assert!(
            compact(&record, STYLE).contains(" NETFILTER_DROP (inferred) (denied_by_network_policy)"),
            "{}",
            compact(&record, STYLE)
        );
        // Reached through a Service: both the backend and the Service; an untranslated ClusterIP
        // by its Service's name.
        record.destination.service = Some("production/api".into());
        assert!(
            compact(&record, STYLE).contains(" -> production/api:8080 (service/production/api) "),
            "{}",
            compact(&record, STYLE)
        );
        record.destination = serde_json::from_value(json!({"kind": "service", "namespace": "production", "pod": null,
            "workload": null, "service": "production/payments", "ip": "10.96.0.40", "port": 80}))
        .unwrap();
        assert!(compact(&record, STYLE).contains(" -> service/production/payments:80 "), "{}", compact(&record, STYLE));
        assert!(!compact(&record, STYLE).contains("attempts"), "one attempt goes without saying");
        record.attempts = 20_000;
        assert!(compact(&record, STYLE).contains(" x20000 attempts id=1"), "{}", compact(&record, STYLE));
        record.destination.port = 0;
        record.ports = Some(crate::evidence::record::PortSweep { count: 19_983, ranges: "18-20000".into() });
        assert!(
            compact(&record, STYLE).contains(" -> service/production/payments:18-20000 (19983 ports) "),
            "{}",
            compact(&record, STYLE)
        );
    }
}
