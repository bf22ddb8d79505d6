//! `cargo xtask bench`: what netiso costs on the packet path, measured side by side in one run.
//!
//! Two namespaces joined by a veth pair; a UDP sender in one blasts 64-byte datagrams at a sink
//! in the other. Throughput is the receiving veth's packet counter over the send window, with and
//! without `netiso run` attached (alternating rounds, medians). The drop flood sends to a port
//! that nftables drops in the receiver's input path and compares nftables' count of dropped
//! packets with what netiso counted, its losses, and its CPU time.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::sh;
use netiso::daemon::process::Process;

const SINK_PORT: u16 = 5001;
const FLOOD_PORT: u16 = 5002;
const SENDER: &str = "10.250.0.1";
/// The sender and, since veth delivers on the sending CPU, the whole packet path run on one
/// CPU; the sink and netiso's daemon on another, so they do not steal from the measured path.
const PACKET_CPU: usize = 0;
const DAEMON_CPU: usize = 1;
const RECEIVER: &str = "10.250.0.2";

/// Sends UDP datagrams of `size` bytes (IP packet size) to `addr` for `seconds`; returns how many
/// were sent.
pub fn blast(addr: SocketAddr, seconds: f64, size: usize) -> anyhow::Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(addr)?;
    let payload = vec![0u8; size.clamp(28, 1500) - 28];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            if socket.send(&payload).is_ok() {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// Receives and discards UDP datagrams on `port` forever.
pub fn sink(port: u16) -> anyhow::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    socket.set_recv_buffer_size(8 << 20)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    let socket: UdpSocket = socket.into();
    let mut buf = [0u8; 2048];
    loop {
        let _ = socket.recv(&mut buf);
    }
}

struct Bench {
    sender_ns: String,
    receiver_ns: String,
    helper: std::path::PathBuf,
    /// netiso's evidence store for the run (removed afterwards).
    store: std::path::PathBuf,
}

impl Bench {
    fn setup(id: &str, helper: &Path) -> anyhow::Result<Self> {
        let bench = Bench {
            sender_ns: format!("{}bench{id}-tx", crate::leftovers::PREFIX),
            receiver_ns: format!("{}bench{id}-rx", crate::leftovers::PREFIX),
            helper: helper.into(),
            store: std::env::temp_dir().join(format!("netiso-bench-{id}.redb")),
        };
        bench.teardown();
        sh::ip(&["netns", "add", &bench.sender_ns])?;
        sh::ip(&["netns", "add", &bench.receiver_ns])?;
        sh::ip(&[
            "-n",
            &bench.receiver_ns,
            "link",
            "add",
            "veth-rx",
            "type",
            "veth",
            "peer",
            "name",
            "veth-tx",
            "netns",
            &bench.sender_ns,
        ])?;
        for (ns, dev, addr) in [(&bench.sender_ns, "veth-tx", SENDER), (&bench.receiver_ns, "veth-rx", RECEIVER)] {
            sh::ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            sh::ip(&["-n", ns, "link", "set", dev, "up"])?;
            sh::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let rules = std::env::temp_dir().join(format!("netiso-bench-{id}.nft"));
        std::fs::write(
            &rules,
            format!(
                "table inet netiso_bench {{\n\tchain input {{\n\t\ttype filter hook input priority filter;\n\t\tudp dport {FLOOD_PORT} counter drop\n\t}}\n}}\n"
            ),
        )?;
        let loaded = sh::run("ip", &["netns", "exec", &bench.receiver_ns, "nft", "-f", &rules.to_string_lossy()]);
        let _ = std::fs::remove_file(&rules);
        loaded?;
        use std::os::unix::process::CommandExt;
        Command::new("ip")
            .args(["netns", "exec", &bench.receiver_ns, "taskset", "-c", &DAEMON_CPU.to_string()])
            .arg(&bench.helper)
            .args(["bench-sink", &SINK_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the sink")?;
        Ok(bench)
    }

    fn teardown(&self) {
        let _ = std::fs::remove_file(&self.store);
        for ns in [&self.sender_ns, &self.receiver_ns] {
            if let Err(e) = sh::delete_netns(ns) {
                eprintln!("removing {ns}: {e:#}");
            }
        }
    }

    fn rx_packets(&self) -> anyhow::Result<u64> {
        let out = sh::run(
            "ip",
            &["netns", "exec", &self.receiver_ns, "cat", "/sys/class/net/veth-rx/statistics/rx_packets"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Packets per second through the veth pair while blasting `port` for `seconds` with packets
    /// of `size` bytes.
    fn blast(&self, port: u16, seconds: f64, size: usize) -> anyhow::Result<f64> {
        let before = self.rx_packets()?;
        let start = Instant::now();
        let out = sh::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.sender_ns,
                "taskset",
                "-c",
                &PACKET_CPU.to_string(),
                &self.helper.to_string_lossy(),
                "bench-blast",
                &format!("{RECEIVER}:{port}"),
                &seconds.to_string(),
                "--size",
                &size.to_string(),
            ],
        )?;
        let elapsed = start.elapsed().as_secs_f64();
        let _sent: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        Ok((self.rx_packets()? - before) as f64 / elapsed)
    }

    fn nft_dropped(&self) -> anyhow::Result<u64> {
        let out = sh::run("ip", &["netns", "exec", &self.receiver_ns, "nft", "list", "table", "inet", "netiso_bench"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let packets = text
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("nft counter not found")?;
        Ok(packets)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU seconds a process's threads have run, from /proc/PID/task/*/schedstat (nanoseconds).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        total_ns += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total_ns as f64 / 1e9)
}

/// Run count and total run time of the loaded programs named `name`, from bpftool (needs
/// kernel.bpf_stats_enabled=1 while they run).
fn program_stats(name: &str) -> anyhow::Result<(u64, u64)> {
    let out = sh::run("bpftool", &["-j", "prog", "show"])?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .iter()
        .filter(|p| p["name"] == name)
        .fold((0, 0), |(c, t), p| (c + p["run_cnt"].as_u64().unwrap_or(0), t + p["run_time_ns"].as_u64().unwrap_or(0))))
}

/// Keeps kernel.bpf_stats_enabled on while alive and restores the previous value.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?.trim().to_owned();
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        Ok(BpfStats(previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// Packet sizes of the throughput rounds: the worst case for per-packet cost, and a full frame.
pub const PACKET_SIZES: [usize; 2] = [64, 1500];

pub struct Throughput {
    pub size: usize,
    /// Median packets/s.
    pub without: f64,
    pub with: f64,
}

pub struct Figures {
    pub throughput: Vec<Throughput>,
    pub flood_pps: f64,
    pub flood_nft_dropped: u64,
    pub flood_netiso_counted: u64,
    pub flood_losses: u64,
    pub flood_ring_events: u64,
    pub flood_cpu_percent: f64,
    /// Average run time of the tc program per packet, and of the tracepoint per dropped packet
    /// (nanoseconds, from kernel.bpf_stats_enabled; includes the stats' own clock reads).
    pub tc_ns_per_packet: f64,
    pub tracepoint_ns_per_drop: f64,
}

pub fn run(netiso: &Path, helper: &Path, rounds: usize, seconds: f64) -> anyhow::Result<Figures> {
    let id = format!("{}", std::process::id() % 100000);
    let bench = Bench::setup(&id, helper)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut throughput = Vec::new();
    for size in PACKET_SIZES {
        let mut without = Vec::new();
        let mut with = Vec::new();
        for round in 0..rounds {
            eprintln!("{size}-byte packets, round {}/{rounds}: without netiso", round + 1);
            without.push(bench.blast(SINK_PORT, seconds, size)?);
            eprintln!("{size}-byte packets, round {}/{rounds}: with netiso", round + 1);
            let mut observer = Process::start_on_cpu(netiso, &bench.receiver_ns, &bench.store, &[], Some(DAEMON_CPU))?;
            with.push(bench.blast(SINK_PORT, seconds, size)?);
            observer.stop()?;
        }
        throughput.push(Throughput { size, without: median(without), with: median(with) });
    }

    eprintln!("per-packet program cost");
    let tc_ns_per_packet = {
        let _stats = BpfStats::enable()?;
        let mut observer = Process::start_on_cpu(netiso, &bench.receiver_ns, &bench.store, &[], Some(DAEMON_CPU))?;
        bench.blast(SINK_PORT, seconds, PACKET_SIZES[0])?;
        let (runs, ns) = program_stats("netiso_from_pod")?;
        observer.stop()?;
        ns as f64 / runs.max(1) as f64
    };

    eprintln!("drop flood");
    let stats = BpfStats::enable()?;
    let mut observer = Process::start_on_cpu(
        netiso,
        &bench.receiver_ns,
        &bench.store,
        &["--drop-reasons", "NETFILTER_DROP"],
        Some(DAEMON_CPU),
    )?;
    let pid = observer.pid();
    let nft_before = bench.nft_dropped()?;
    let cpu_before = cpu_seconds(pid)?;
    let start = Instant::now();
    let flood_pps = bench.blast(FLOOD_PORT, seconds, PACKET_SIZES[0])?;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let (tracepoint_runs, tracepoint_ns) = program_stats("netiso_drop")?;
    drop(stats);
    let window = start.elapsed().as_secs_f64();
    // Let one drain interval pass so the map's counts are read before stopping.
    std::thread::sleep(Duration::from_millis(1500));
    let nft_dropped = bench.nft_dropped()? - nft_before;
    let totals = observer.stop()?;
    let total = |field: &str| totals[field].as_u64().unwrap_or(0);
    Ok(Figures {
        throughput,
        flood_pps,
        flood_nft_dropped: nft_dropped,
        flood_netiso_counted: total("dropped_packets"),
        flood_losses: total("losses"),
        flood_ring_events: total("ring_events"),
        flood_cpu_percent: 100.0 * cpu / window,
        tc_ns_per_packet,
        tracepoint_ns_per_drop: tracepoint_ns as f64 / tracepoint_runs.max(1) as f64,
    })
}
