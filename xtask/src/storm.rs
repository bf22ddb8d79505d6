//! `cargo xtask bench storm`: the incident itself, measured. In the lab with the course baseline
//! enforced and netiso observing the node, a quiet baseline of the scenario's traffic is recorded
//! first; then develop/debug scans production/api (one SYN to each of `ports` ports) and floods one
//! blocked port with `attempts` connection attempts, each from a fresh source port, at `rate` new
//! flows per second. What the incident costs netiso, and what it loses, is read from its metrics,
//! its process and its store, and from nftables' own count of what it dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::{self, Lab, scenario};
use crate::{netns, sh};

const API: &str = "127.0.0.1:9963";
const METRICS: &str = "127.0.0.1:9962";
/// The blocked port the flood hits: production/api's own, which develop may not reach.
const FLOOD_PORT: u16 = 8080;
/// The `source` labels of `netiso_datapath_lost_events_total`.
const LOSS_CAUSES: [&str; 3] = ["ringbuf_full", "drop_map_full", "flow_map_full"];

pub struct Options {
    /// New flows per second, for the scan and the flood alike.
    pub rate: u32,
    /// Ports scanned, from 1.
    pub ports: u16,
    /// Connection attempts of the flood.
    pub attempts: u32,
}

pub struct Figures {
    pub attempts_sent: u64,
    pub send_seconds: f64,
    pub lost_events: u64,
    /// The same by cause: the ring buffer full, the drop map full, the flow map full.
    pub lost_by_cause: [u64; 3],
    /// Ring-buffer records: new keys announced, and packets the maps had no room for.
    pub ring_events: u64,
    /// `netiso_kernel_drops_total{reason="NETFILTER_DROP"}` over the storm.
    pub netiso_dropped: u64,
    /// The packets the lab's policy chains dropped over the storm (nftables' counters).
    pub nft_dropped: u64,
    /// Average over the storm, from its first packet until netiso had processed its last record.
    pub cpu_cores: f64,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub store_growth_mib: f64,
    pub records_processed: u64,
    /// Records the store lists after the storm that it did not before.
    pub records_stored: usize,
    /// The dropped packets the records account for.
    pub recorded_drops: u64,
    /// New records of the flood, and the attempts at its port that records count.
    pub flood_records: usize,
    pub flood_attempts_recorded: u64,
    /// New scan summaries, and the ports summaries gained.
    pub scan_summaries: usize,
    pub summarised_ports: u64,
    pub api_latency_max: Duration,
    pub api_queries: usize,
    pub pre_storm_records: usize,
    pub pre_storm_kept: usize,
}

/// Runs the storm against `netiso run` with `netiso_args` beside the lab's own.
pub fn run(lab: &Lab, netiso: &Path, options: &Options, netiso_args: &[&str]) -> anyhow::Result<Figures> {
    let _guard = lab.up_guarded(&lab::baseline_policies()?)?;
    let mut observer = lab.observe(netiso, netiso_args)?;
    let pid = observer.pid();

    eprintln!("quiet baseline: the scenario's traffic");
    lab.traffic_of(lab::all_probes())?;
    let pre_storm = wait_for_quiet(lab, Duration::from_secs(60))
        .and_then(|_| records(lab))
        .context("recording the quiet baseline")?;
    if pre_storm.is_empty() {
        bail!("the quiet baseline left no record");
    }

    let metrics_before = metrics(lab)?;
    let nft_before = nft_dropped(lab)?;
    let store_before = store_bytes(lab)?;
    let cpu_before = crate::bench::cpu_seconds(pid)?;
    let start = Instant::now();

    let probing = Arc::new(AtomicBool::new(true));
    let latencies = {
        let probing = probing.clone();
        let node = lab.node_ns();
        std::thread::spawn(move || api_latencies(&node, &probing))
    };

    let debug = lab.pod_ns(scenario::pod("develop/debug"));
    let api = scenario::pod("production/api").ipv4();
    eprintln!("scan: {} ports of production/api at {}/s", options.ports, options.rate);
    let scanned = send_syns(&debug, (1..=options.ports).map(move |port| SocketAddr::new(api, port)), options.rate)?;
    eprintln!("flood: {} attempts at production/api:{FLOOD_PORT} at {}/s", options.attempts, options.rate);
    let flooded =
        send_syns(&debug, (0..options.attempts).map(move |_| SocketAddr::new(api, FLOOD_PORT)), options.rate)?;
    let send_seconds = start.elapsed().as_secs_f64();

    wait_for_quiet(lab, Duration::from_secs(120)).context("waiting for netiso to process the storm")?;
    let window = start.elapsed().as_secs_f64();
    let cpu = crate::bench::cpu_seconds(pid)? - cpu_before;
    probing.store(false, Ordering::Relaxed);
    let latencies = latencies.join().map_err(|_| anyhow::anyhow!("the API prober panicked"))?;

    let metrics_after = metrics(lab)?;
    let delta = |name: &str, labels: &str| sum(&metrics_after, name, labels) - sum(&metrics_before, name, labels);
    let after = records(lab)?;
    // The storm's attempts may also count on a record from before it (the same conversation):
    // what it recorded is what every record gained.
    let gained = |of: fn(&Stored) -> u64| {
        after.iter().map(|(id, r)| of(r).saturating_sub(pre_storm.get(id).map_or(0, of))).sum::<u64>()
    };
    let new_records: Vec<&Stored> =
        after.iter().filter(|(id, _)| !pre_storm.contains_key(*id)).map(|(_, r)| r).collect();
    let figures = Figures {
        attempts_sent: scanned + flooded,
        send_seconds,
        lost_events: delta("netiso_datapath_lost_events_total", "") as u64,
        lost_by_cause: LOSS_CAUSES
            .map(|cause| delta("netiso_datapath_lost_events_total", &format!("\"{cause}\"")) as u64),
        ring_events: delta("netiso_datapath_ring_events_total", "") as u64,
        netiso_dropped: delta("netiso_kernel_drops_total", "reason=\"NETFILTER_DROP\"") as u64,
        nft_dropped: nft_dropped(lab)? - nft_before,
        cpu_cores: cpu / window,
        cpu_seconds: cpu,
        peak_rss_mib: peak_rss_kib(pid)? as f64 / 1024.0,
        store_growth_mib: (store_bytes(lab)? as f64 - store_before as f64) / (1024.0 * 1024.0),
        records_processed: delta("netiso_records_processed_total", "") as u64,
        records_stored: new_records.len(),
        recorded_drops: gained(|r| r.dropped_packets),
        flood_records: new_records.iter().filter(|r| r.flood_attempts > 0).count(),
        flood_attempts_recorded: gained(|r| r.flood_attempts),
        scan_summaries: new_records.iter().filter(|r| r.summarised_ports > 0).count(),
        summarised_ports: gained(|r| r.summarised_ports),
        api_latency_max: latencies.iter().copied().max().unwrap_or_default(),
        api_queries: latencies.len(),
        pre_storm_records: pre_storm.len(),
        pre_storm_kept: pre_storm.keys().filter(|id| after.contains_key(*id)).count(),
    };
    observer.stop()?;
    Ok(figures)
}

/// Opens a TCP connection to each address from network namespace `netns` at `rate` per second,
/// closing it at once: one SYN each, from a fresh source port (a socket closed before its
/// handshake completes sends nothing more). Returns how many were sent.
fn send_syns(
    netns: &str,
    targets: impl Iterator<Item = SocketAddr> + Send + 'static,
    rate: u32,
) -> anyhow::Result<u64> {
    netns::run_in(netns, move || -> anyhow::Result<u64> {
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let start = Instant::now();
        let mut sent = 0u64;
        for target in targets {
            let due = start + interval * sent as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            match socket.connect(&target.into()) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => sent += 1,
                Err(e) => return Err(e).with_context(|| format!("connecting to {target}")),
                Ok(()) => bail!("{target} accepted a connection the baseline should block"),
            }
        }
        Ok(sent)
    })?
}

/// Latencies of a listing of the newest 100 records, every half second while `probing`.
fn api_latencies(node: &str, probing: &AtomicBool) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while probing.load(Ordering::Relaxed) {
        let start = Instant::now();
        if let Ok((200, _)) = netns::get(node, API.parse().expect("valid"), "/v1/flows?limit=100") {
            latencies.push(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    latencies
}

/// Waits until netiso has processed everything the kernel handed it: its count of processed
/// records unchanged for two seconds.
fn wait_for_quiet(lab: &Lab, deadline: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    let mut last = (f64::NAN, Instant::now());
    loop {
        let processed = sum(&metrics(lab)?, "netiso_records_processed_total", "");
        if processed != last.0 {
            last = (processed, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("netiso was still processing after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn metrics(lab: &Lab) -> anyhow::Result<String> {
    let (status, body) = netns::get(&lab.node_ns(), METRICS.parse().expect("valid"), "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// The sum of every sample of metric `name` whose labels contain `labels`.
fn sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])) && line.contains(labels)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the storm's figures need of a stored record.
#[derive(Clone, Copy, Debug, Default)]
struct Stored {
    /// Its packets when it is a drop.
    dropped_packets: u64,
    /// Its attempts when it is a drop to the flooded port.
    flood_attempts: u64,
    /// The ports it summarises, when it is a scan's summary.
    summarised_ports: u64,
}

/// Every record in the node's store by id, page by page.
fn records(lab: &Lab) -> anyhow::Result<HashMap<String, Stored>> {
    let mut ids = HashMap::new();
    let mut before = String::new();
    loop {
        let path = format!("/v1/flows?since=24h&limit=10000{before}");
        let (status, body) = netns::get(&lab.node_ns(), API.parse().expect("valid"), &path)?;
        if status != 200 {
            bail!("{path} answered {status}: {body}");
        }
        let page: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{path}: not JSON"))?;
        let flows = page["flows"].as_array().with_context(|| format!("{path}: no flows"))?;
        ids.extend(flows.iter().filter_map(|f| {
            let mut stored = Stored::default();
            if f["verdict"] == "dropped" {
                stored.dropped_packets = f["packets"].as_u64().unwrap_or(0);
                if f["destination"]["port"] == FLOOD_PORT {
                    stored.flood_attempts = f["attempts"].as_u64().unwrap_or(1);
                }
                stored.summarised_ports = f["ports"]["count"].as_u64().unwrap_or(0);
            }
            Some((f["id"].as_str()?.to_owned(), stored))
        }));
        match page["next"].as_str() {
            Some(next) if page["more"] == true => before = format!("&before={next}"),
            _ => return Ok(ids),
        }
    }
}

/// Packets dropped by the lab's policy chains: the sum of their counters.
fn nft_dropped(lab: &Lab) -> anyhow::Result<u64> {
    let out = sh::run("ip", &["netns", "exec", &lab.node_ns(), "nft", "-j", "list", "table", "inet", lab::NFT_TABLE])?;
    let ruleset: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j: not JSON")?;
    let rules = ruleset["nftables"].as_array().context("nft -j: no nftables array")?;
    Ok(rules
        .iter()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|expr| expr["counter"]["packets"].as_u64())
        .sum())
}

fn store_bytes(lab: &Lab) -> anyhow::Result<u64> {
    let path = lab.store_path();
    Ok(std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len())
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

impl Figures {
    pub fn print(&self, options: &Options) {
        let rate = self.attempts_sent as f64 / self.send_seconds;
        println!(
            "storm: {} ports scanned and {} attempts at one blocked port, {} new flows in {:.1} s ({rate:.0}/s, asked {}/s)",
            options.ports, options.attempts, self.attempts_sent, self.send_seconds, options.rate
        );
        println!("  lost events                      {:>12}   (target 0)", self.lost_events);
        for (cause, lost) in LOSS_CAUSES.iter().zip(self.lost_by_cause) {
            println!("    {cause:<30} {lost:>12}");
        }
        println!("  ring-buffer records              {:>12}", self.ring_events);
        println!(
            "  dropped packets: netiso {:>8}   nftables {:>8}   (target equal)",
            self.netiso_dropped, self.nft_dropped
        );
        println!(
            "  daemon CPU, average              {:>12.2} cores   (target <= 0.5; {:.0} µs per new flow)",
            self.cpu_cores,
            self.cpu_seconds * 1e6 / self.attempts_sent.max(1) as f64
        );
        println!("  daemon peak RSS                  {:>12.1} MiB   (target <= 128)", self.peak_rss_mib);
        println!("  store growth                     {:>12.1} MiB   (target <= 16)", self.store_growth_mib);
        println!("  records processed                {:>12}", self.records_processed);
        println!(
            "  records stored                   {:>12}   (accounting for {} dropped packets)",
            self.records_stored, self.recorded_drops
        );
        println!(
            "  scan summaries                   {:>12}   (summarising {} ports)",
            self.scan_summaries, self.summarised_ports
        );
        println!(
            "  records of the flood             {:>12}   (counting {} attempts at its port)",
            self.flood_records, self.flood_attempts_recorded
        );
        println!(
            "  API latency during the storm     {:>12.3} s max over {} queries   (target < 1)",
            self.api_latency_max.as_secs_f64(),
            self.api_queries
        );
        println!(
            "  records from before the storm    {:>12} of {} kept   (target all)",
            self.pre_storm_kept, self.pre_storm_records
        );
    }
}

#[cfg(test)]
mod tests {
    use super::sum;

    #[test]
    fn a_metric_sums_its_samples_with_the_labels_asked_and_no_other_metric() {
        let text = "# TYPE netiso_lost counter\nnetiso_lost_total{source=\"a\"} 2\nnetiso_lost_total{source=\"b\"} 3\nnetiso_lost_total_other 7\nnetiso_records 4\nnetiso_records_bytes 9\n";
        assert_eq!(sum(text, "netiso_lost_total", ""), 5.0);
        assert_eq!(sum(text, "netiso_lost_total", "\"b\""), 3.0);
        assert_eq!(sum(text, "netiso_records", ""), 4.0);
    }
}
