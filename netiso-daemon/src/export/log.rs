//! Records on stdout (one JSON object per line, or text) and diagnostics on stderr via tracing.

use std::io::Write;

use crate::datapath::{DatapathRecord, EventKind};

/// How records and diagnostics are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

pub fn init_diagnostics(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETISO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A closed stderr loses the diagnostics but must not stop the daemon: tracing would report
    // its failed writes with eprintln!, which panics then.
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Most "flow blocked" lines one source may cause per interval: a scan of thousands of ports is
/// thousands of distinct flows, and must not become as many lines.
pub const BLOCKED_LINES_PER_SOURCE: u32 = 10;

/// One log line per newly blocked flow, rate-limited per flow (source, destination, port,
/// protocol, reason; not the source port, which changes with every attempt): repeats within the
/// interval are counted and reported with the next line for that flow. Each source is also held
/// to [`BLOCKED_LINES_PER_SOURCE`] lines per interval; what it tried beyond them is counted and
/// reported with its next line (the records and metrics keep every attempt).
pub struct BlockedFlowLog {
    interval: std::time::Duration,
    last: std::collections::HashMap<String, (std::time::Instant, u64)>,
    sources: std::collections::HashMap<String, SourceBudget>,
}

/// A source's lines in its current interval, and its flows left unlogged since its last line.
struct SourceBudget {
    since: std::time::Instant,
    lines: u32,
    unlogged: u64,
}

fn end(id: &crate::cluster::Identity) -> String {
    id.pod_key().unwrap_or_else(|| id.ip.to_string())
}

impl BlockedFlowLog {
    pub fn new(interval: std::time::Duration) -> Self {
        BlockedFlowLog { interval, last: Default::default(), sources: Default::default() }
    }

    /// Logs `r` unless the same flow was logged within the interval or its source used up its
    /// lines; returns whether it logged.
    pub fn record(&mut self, r: &crate::evidence::record::FlowRecord) -> bool {
        self.record_at(r, std::time::Instant::now())
    }

    fn record_at(&mut self, r: &crate::evidence::record::FlowRecord, now: std::time::Instant) -> bool {
        let source = end(&r.source);
        let key = format!("{source}|{}|{}|{}|{:?}", end(&r.destination), r.destination.port, r.protocol, r.reason);
        if let Some((at, suppressed)) = self.last.get_mut(&key)
            && now.duration_since(*at) < self.interval
        {
            *suppressed += 1;
            return false;
        }
        let budget = self.sources.entry(source.clone()).or_insert(SourceBudget { since: now, lines: 0, unlogged: 0 });
        if now.duration_since(budget.since) >= self.interval {
            (budget.since, budget.lines) = (now, 0);
        }
        // A scan's summary is the bounded account of what its source tried: always logged.
        let scan = r.ports.as_ref();
        if budget.lines >= BLOCKED_LINES_PER_SOURCE && scan.is_none() {
            budget.unlogged += 1;
            return false;
        }
        budget.lines += 1;
        let unlogged_from_source = std::mem::take(&mut budget.unlogged);
        let suppressed = self.last.insert(key, (now, 0)).map(|(_, s)| s).unwrap_or(0);
        if self.last.len() > 100_000 {
            let interval = self.interval;
            self.last.retain(|_, (at, _)| now.duration_since(*at) < interval);
            self.sources.retain(|_, b| now.duration_since(b.since) < interval || b.unlogged > 0);
        }
        let policies: Vec<String> = r.policy.policies.iter().map(|p| p.to_string()).collect();
        // A scan's summary names its ports instead of one destination port.
        tracing::warn!(
            target: "netiso::blocked",
            id = %r.id,
            time = %humantime::format_rfc3339_nanos(r.time),
            source = %end(&r.source),
            source_ip = %r.source.ip,
            source_workload = r.source.workload.as_deref().unwrap_or(""),
            destination = %end(&r.destination),
            destination_ip = %r.destination.ip,
            destination_port = scan.is_none().then_some(r.destination.port),
            ports = scan.map(|ports| ports.ranges.as_str()),
            protocol = %r.protocol,
            reason = r.reason.as_deref().unwrap_or(""),
            reason_inferred = r.reason_inferred,
            location = r.location.as_deref().unwrap_or(""),
            attribution = ?r.policy.attribution,
            direction = r.policy.direction.map(|d| d.as_str()).unwrap_or(""),
            policies = %policies.join(","),
            blame = r.policy.blame().as_deref(),
            summary = %r.policy.summary,
            inventory_stale = r.inventory_stale,
            suppressed_repeats = suppressed,
            unlogged_from_source,
            "{}",
            if scan.is_some() { "port scan blocked" } else { "flow blocked" }
        );
        true
    }
}

/// Where `netiso run` prints new records: standard output, until writing fails (the reader went
/// away, as with `| head -1`). Recording goes on without printing, said once in the diagnostics.
pub struct RecordOutput {
    writer: RecordWriter,
    open: bool,
}

impl RecordOutput {
    pub fn stdout(format: LogFormat) -> Self {
        RecordOutput { writer: RecordWriter::new(format), open: true }
    }

    pub fn print(&mut self, record: &DatapathRecord) {
        if !self.open {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = self.writer.write(&mut out, record).and_then(|()| out.flush()) {
            self.open = false;
            tracing::warn!(error = %e, "standard output is closed: records are no longer printed, still stored and served by the API");
        }
    }
}

pub struct RecordWriter {
    format: LogFormat,
}

impl RecordWriter {
    pub fn new(format: LogFormat) -> Self {
        RecordWriter { format }
    }

    pub fn write(&self, out: &mut impl Write, record: &DatapathRecord) -> std::io::Result<()> {
        match self.format {
            LogFormat::Json => {
                serde_json::to_writer(&mut *out, record)?;
                writeln!(out)
            }
            LogFormat::Text => writeln!(out, "{}", text_line(record)),
        }
    }
}

fn endpoint(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
        std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
    }
}

/// One human-readable line, in the spirit of `hubble observe -o compact`.
pub fn text_line(r: &DatapathRecord) -> String {
    let time = humantime::format_rfc3339_millis(r.time);
    let flow = format!("{} -> {} {}", endpoint(r.src_ip, r.src_port), endpoint(r.dst_ip, r.dst_port), r.protocol);
    let iface = r.interface.clone().unwrap_or_else(|| format!("if{}", r.ifindex));
    match r.event {
        EventKind::Drop => format!(
            "{time} DROPPED {flow} reason={}{} at {} on {iface} ({} pkts)",
            r.reason.as_deref().unwrap_or("?"),
            if r.reason_inferred { " (inferred)" } else { "" },
            r.location.as_deref().unwrap_or("?"),
            r.packets
        ),
        EventKind::Flow => format!("{time} FORWARDED {flow} on {iface} ({} pkts, {} bytes)", r.packets, r.bytes),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cluster::Identity;
    use crate::evidence::record::{FlowRecord, FlowVerdict};
    use crate::evidence::tests::record;

    fn blocked(source: &str, port: u16) -> FlowRecord {
        let end = |ip: &str, port| Identity::world(ip.parse().unwrap(), port);
        record(1, FlowVerdict::Dropped, end(source, 40000), end("10.0.0.9", port), None)
    }

    #[test]
    fn a_scan_logs_a_few_lines_per_source_and_interval_and_counts_the_rest() {
        let mut log = BlockedFlowLog::new(Duration::from_secs(60));
        let start = Instant::now();
        let logged = (1..=1000).filter(|port| log.record_at(&blocked("10.0.0.1", *port), start)).count();
        assert_eq!(logged, BLOCKED_LINES_PER_SOURCE as usize, "a 1,000-port scan is a few lines");
        assert!(log.record_at(&blocked("10.0.0.2", 80), start), "another source still logs");
        assert!(!log.record_at(&blocked("10.0.0.1", 1), start), "a repeat of a logged flow waits for its interval");
        assert_eq!(log.sources["10.0.0.1"].unlogged, 990, "the scan's other ports are counted");
        let later = start + Duration::from_secs(61);
        assert!(log.record_at(&blocked("10.0.0.1", 2000), later), "the next interval logs again");
        assert_eq!(log.sources["10.0.0.1"].unlogged, 0, "its line carried the count of what was left unlogged");
        assert_eq!(log.sources["10.0.0.1"].lines, 1);
    }

    #[test]
    fn a_scan_summary_is_logged_when_its_source_used_up_its_lines() {
        let mut log = BlockedFlowLog::new(Duration::from_secs(60));
        let start = Instant::now();
        for port in 1..=BLOCKED_LINES_PER_SOURCE as u16 {
            assert!(log.record_at(&blocked("10.0.0.1", port), start));
        }
        let mut summary = blocked("10.0.0.1", 0);
        summary.ports = Some(crate::evidence::record::PortSweep { count: 100, ranges: "11-110".into() });
        assert!(log.record_at(&summary, start));
    }
}
