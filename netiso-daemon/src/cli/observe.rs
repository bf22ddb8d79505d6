//! `netiso observe` and `netiso evidence`: what was blocked, where, and why, from one node or
//! every node. `observe` takes `hubble observe`'s flags.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::client::{self, Endpoint, Target, encode, excerpt};
use super::filters::Filters;
use super::lines::{self, TABLE_HEADER, TimeFormat};
use crate::evidence::record::{EvidenceBundle, FlowList, FlowRecord, MAX_LIMIT, StreamNotice};

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

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub filters: Filters,
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
}

/// How many flows, and from which end of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Last(usize),
    First(usize),
    /// Every matching flow, up to a cap per server.
    All,
}

/// The most flows one server gives for --all or a --since window.
const MAX_FLOWS: usize = 100_000;

impl ObserveArgs {
    /// The filters' parameters and the window's.
    fn filter_params(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut params = self.filters.params()?;
        for (name, time) in [("since", &self.since), ("until", &self.until)] {
            if let Some(time) = time {
                params.push((name.into(), time.clone()));
            }
        }
        Ok(params)
    }

    fn window(&self) -> Window {
        match (self.last, self.first) {
            (Some(n), _) => Window::Last(n),
            (None, Some(n)) => Window::First(n),
            (None, None) if self.all || (self.since.is_some() && !self.follow) => Window::All,
            (None, None) => Window::Last(20),
        }
    }
}

/// The listing's path: the filters, then how much and where from.
pub fn flows_path(filters: &[(String, String)], extra: &[(&str, String)]) -> String {
    let pairs =
        filters.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().map(|(k, v)| (*k, v.as_str())));
    let encoded: Vec<String> = pairs.map(|(k, v)| format!("{k}={}", encode(v))).collect();
    format!("/v1/flows?{}", encoded.join("&"))
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

/// Prints a listing: a table's columns fit its widest cells, dicts are set apart by a line.
fn print_all(out: &mut impl Write, style: Style, records: &[FlowRecord]) -> std::io::Result<()> {
    if style.format == Format::Table {
        let header = TABLE_HEADER.map(str::to_owned);
        let rows: Vec<[String; 9]> =
            std::iter::once(header).chain(records.iter().map(|r| lines::table_cells(r, style.time))).collect();
        return write!(out, "{}", lines::table(&rows, [0; 9]));
    }
    for (i, r) in records.iter().enumerate() {
        if style.format == Format::Dict && i > 0 {
            writeln!(out, "------------")?;
        }
        print(out, style, r)?;
    }
    Ok(())
}

/// Columns of a followed table: rows print as they come, so the widths are set beforehand.
const FOLLOWED_WIDTHS: [usize; 9] = [19, 8, 30, 30, 5, 9, 24, 19, 0];

fn print(out: &mut impl Write, style: Style, r: &FlowRecord) -> std::io::Result<()> {
    match style.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?),
        Format::Compact => writeln!(out, "{}", lines::compact(r, style.time, style.node)),
        Format::Dict => writeln!(out, "{}", lines::dict(r, style.time)),
        Format::Table => write!(out, "{}", lines::table(&[lines::table_cells(r, style.time)], FOLLOWED_WIDTHS)),
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
        let window = args.window();
        if args.follow {
            if args.output == Format::Table {
                write!(stdout.lock(), "{}", lines::table(&[TABLE_HEADER.map(str::to_owned)], FOLLOWED_WIDTHS))?;
            }
            let history = match window {
                Window::Last(n) => n.clamp(1, MAX_LIMIT),
                _ => MAX_LIMIT,
            };
            let path = flows_path(&filters, &[("limit", history.to_string()), ("follow", "true".into())]);
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
        let listing = collect(&endpoints, &filters, window).await?;
        print_all(&mut stdout.lock(), style, &listing.flows)?;
        listing.complete()?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The flows of every server, merged and ordered by time, and how many servers did not answer
/// (each named on stderr).
pub struct Listing {
    pub flows: Vec<FlowRecord>,
    pub failures: usize,
    pub servers: usize,
}

impl Listing {
    /// An error when a server did not answer: what was printed is partial.
    pub fn complete(&self) -> anyhow::Result<()> {
        if self.failures > 0 {
            bail!("{} of {} servers did not answer (above); the listing is partial", self.failures, self.servers);
        }
        Ok(())
    }
}

/// Reads the window's flows from every server, page by page; an error only when no server answers.
pub async fn collect(endpoints: &[Endpoint], filters: &[(String, String)], window: Window) -> anyhow::Result<Listing> {
    let (want, order, cursor) = match window {
        Window::Last(n) => (n, "newest", "before"),
        Window::First(n) => (n, "oldest", "after"),
        Window::All => (MAX_FLOWS, "newest", "before"),
    };
    let mut flows: Vec<FlowRecord> = Vec::new();
    let mut failures = 0;
    for endpoint in endpoints {
        let page = |at: Option<String>, limit: usize| {
            let mut extra = vec![("limit", limit.to_string()), ("order", order.to_owned())];
            extra.extend(at.map(|id| (cursor, id)));
            let path = flows_path(filters, &extra);
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
    match window {
        Window::Last(n) => {
            flows.drain(..flows.len().saturating_sub(n));
        }
        Window::First(n) => flows.truncate(n),
        Window::All => {}
    }
    Ok(Listing { flows, failures, servers: endpoints.len() })
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
        Ok(r) if style.format == Format::Dict => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "------------")?;
            print(&mut out, style, &r)?;
        }
        Ok(r) => print(&mut std::io::stdout().lock(), style, &r)?,
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
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: EvidenceFormat,
    #[arg(long, value_enum, ignore_case = true, default_value = "StampMilli")]
    pub time_format: TimeFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EvidenceFormat {
    /// Readable, as `explain` prints.
    Text,
    Json,
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
                        match args.output {
                            EvidenceFormat::Text => print!("{}", lines::evidence_text(&bundle, args.time_format)),
                            EvidenceFormat::Json => println!("{}", serde_json::to_string_pretty(&bundle)?),
                        }
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
    use crate::cli::lines::tests::record;

    use super::*;

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
        assert_eq!(observe(&["--time-format", "rfc3339nano"]).unwrap().time_format, TimeFormat::Rfc3339Nano);
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
}
