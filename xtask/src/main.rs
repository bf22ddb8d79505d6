use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use xtask::lab::{self, Lab};
use xtask::nft::Enforcement;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "netiso build helpers and local lab")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// develop/debug scans production/api and floods one of its blocked ports, in the lab with the
    /// baseline enforced: lost events, exact counts, netiso's CPU, memory and store growth, API
    /// latency during the storm, and whether the records from before it are kept.
    Storm {
        /// New flows per second.
        #[arg(long, default_value_t = 4000)]
        rate: u32,
        /// Ports scanned (1 to N).
        #[arg(long, default_value_t = 20000)]
        ports: u16,
        /// Connection attempts to one blocked port, each from a fresh source port.
        #[arg(long, default_value_t = 20000)]
        attempts: u32,
        #[arg(long, default_value = "storm")]
        id: String,
        /// Options for `netiso run` beside the lab's own (after `--`), to measure other settings.
        #[arg(last = true)]
        netiso_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// The course scenario in network namespaces, policies enforced by nftables.
    Lab {
        #[command(subcommand)]
        action: LabAction,
        /// Lab instance name (network namespaces are named ni-ID-...).
        #[arg(long, default_value = "lab", global = true)]
        id: String,
    },
    /// One shot: lab up, netiso observing, traffic, what netiso saw and why, lab down.
    Demo {
        #[arg(long, default_value = "demo")]
        id: String,
    },
    /// Packets/s through a veth pair with and without netiso, and a drop flood; `bench storm`: a
    /// port scan and a connection flood in the lab.
    Bench {
        #[command(subcommand)]
        storm: Option<BenchCmd>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// The datapath suite (real programs and packets in namespaces) in a VM of each kernel series,
    /// booted by virtme-ng under QEMU (`scripts/setup --vm` installs them).
    Vm {
        /// Kernel series to run, e.g. 6.1; every one of 5.10, 6.1 and 6.12 when not given.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
        /// Seconds each VM may take, boot included (5.10 under TCG takes 250-400 s for the
        /// datapath suite, the drop totals and the node lab's datapath test).
        #[arg(long, default_value_t = 540)]
        timeout: u64,
    },
    /// netiso's image: a static (musl) release build alone in an image FROM scratch, tagged as the
    /// DaemonSet names it (`scripts/setup --image` installs podman and the musl target).
    Image,
    /// What killed runs left behind (network namespaces, their processes and tc programs, links,
    /// nft tables, pinned BPF objects named with the project's prefix), removed with --remove.
    Leftovers {
        #[arg(long)]
        remove: bool,
        #[arg(long, default_value = xtask::leftovers::PREFIX)]
        prefix: String,
    },
    /// Internal: UDP sender of the benchmark.
    #[command(hide = true)]
    BenchBlast {
        addr: std::net::SocketAddr,
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Internal: UDP sink of the benchmark.
    #[command(hide = true)]
    BenchSink { port: u16 },
    /// Internal: TCP/UDP echo server run inside a lab pod.
    #[command(hide = true)]
    LabServe { port: u16 },
    #[command(hide = true, name = "probe-tcp")]
    ProbeTcp {
        addr: String,
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    #[command(hide = true, name = "probe-udp")]
    ProbeUdp {
        addr: String,
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    #[command(hide = true, name = "probe-dns-udp")]
    ProbeDnsUdp {
        addr: String,
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    #[command(hide = true, name = "probe-dns-tcp")]
    ProbeDnsTcp {
        addr: String,
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the scenario (replacing an earlier one with the same id).
    Up {
        /// NetworkPolicies to enforce instead of the course baseline (file or directory).
        #[arg(long, value_name = "PATH", conflicts_with = "allow_all")]
        policies: Option<PathBuf>,
        /// Enforce no policy at all.
        #[arg(long)]
        allow_all: bool,
        /// What the node does to packets no policy admits.
        #[arg(long, value_enum, default_value_t)]
        enforcement: Enforcement,
        /// How the node's kube-proxy translates Services.
        #[arg(long, value_enum, default_value_t)]
        kube_proxy: lab::kube_proxy::Mode,
    },
    /// Replace the enforced policies.
    Apply {
        #[arg(long, value_name = "PATH")]
        policies: Option<PathBuf>,
        /// The course baseline plus the policies in PATH.
        #[arg(long)]
        with_baseline: bool,
    },
    /// Drive the scenario's traffic (pod to pod, through Services, from the node, to the world)
    /// and check each flow against what Kubernetes does under the policies.
    Traffic {
        /// Only the traffic the course means to keep (DNS, ingress-nginx to the apps).
        #[arg(long)]
        legitimate: bool,
    },
    /// Remove every namespace, link, nft table and process of the lab.
    Down,
}

fn out_dir(id: &str) -> PathBuf {
    lab::repo_root().join("lab-out").join(id)
}

/// The lab `id`, enforcing as it was brought up.
fn lab_for(id: &str) -> anyhow::Result<Lab> {
    let helper = std::env::current_exe().context("locating the xtask binary")?;
    Ok(Lab::new(id, &out_dir(id), &helper).with_recorded_enforcement())
}

fn probe(kind: &str, addr: &str, source_port: u16) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::from(lab::run_probe(kind, addr, source_port)?.exit_code()))
}

fn policies(
    path: Option<&PathBuf>,
    with_baseline: bool,
) -> anyhow::Result<Vec<k8s_openapi::api::networking::v1::NetworkPolicy>> {
    let mut out = if with_baseline || path.is_none() { lab::baseline_policies()? } else { Vec::new() };
    if let Some(path) = path {
        out.extend(lab::policies_from(path)?);
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Lab { action, id } => lab_action(action, &id),
        Cmd::Demo { id } => lab_for(&id).and_then(|lab| xtask::demo::run(&lab)),
        Cmd::Bench { storm: None, rounds, seconds } => bench(rounds, seconds),
        Cmd::Bench { storm: Some(BenchCmd::Storm { rate, ports, attempts, id, netiso_args }), .. } => {
            storm(&id, &xtask::storm::Options { rate, ports, attempts }, &netiso_args)
        }
        Cmd::Image => xtask::image::build().map(|image| {
            println!("{image}");
            ExitCode::SUCCESS
        }),
        Cmd::Leftovers { remove, prefix } => leftovers(remove, &prefix),
        Cmd::Vm { kernels, timeout } => vm(kernels, timeout),
        Cmd::BenchBlast { addr, seconds, size } => xtask::bench::blast(addr, seconds, size).map(|sent| {
            println!("{sent}");
            ExitCode::SUCCESS
        }),
        Cmd::BenchSink { port } => xtask::bench::sink(port).map(|_| ExitCode::SUCCESS),
        Cmd::LabServe { port } => xtask::probe::serve(port).map(|_| ExitCode::SUCCESS),
        Cmd::ProbeTcp { addr, source_port } => probe("probe-tcp", &addr, source_port),
        Cmd::ProbeUdp { addr, source_port } => probe("probe-udp", &addr, source_port),
        Cmd::ProbeDnsUdp { addr, source_port } => probe("probe-dns-udp", &addr, source_port),
        Cmd::ProbeDnsTcp { addr, source_port } => probe("probe-dns-tcp", &addr, source_port),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(rounds: usize, seconds: f64) -> anyhow::Result<ExitCode> {
    eprintln!("building netiso (release)");
    let netiso = xtask::build::netiso(true)?;
    let helper = std::env::current_exe()?;
    let f = xtask::bench::run(&netiso, &helper, rounds, seconds)?;
    let unaccounted = f.flood_nft_dropped as i64 - (f.flood_netiso_counted + f.flood_losses) as i64;
    println!("veth pair, UDP, {rounds} alternating rounds of {seconds} s each, medians:");
    for t in &f.throughput {
        println!(
            "  {:>4}-byte packets   without netiso {:>9.0} packets/s   with netiso {:>9.0} packets/s   ratio {:.3}",
            t.size,
            t.without,
            t.with,
            t.with / t.without
        );
    }
    let small = &f.throughput[0];
    println!(
        "  tc program          {:>12.0} ns/packet ({:.1}% of the {:.0} ns a {}-byte packet takes without netiso)",
        f.tc_ns_per_packet,
        100.0 * f.tc_ns_per_packet * small.without / 1e9,
        1e9 / small.without,
        small.size
    );
    println!("drop flood (nftables drop in the input path, {seconds} s):");
    println!("  dropped             {:>12.0} packets/s", f.flood_pps);
    println!("  nftables dropped    {:>12}", f.flood_nft_dropped);
    println!("  netiso counted      {:>12}", f.flood_netiso_counted);
    println!("  netiso losses       {:>12}", f.flood_losses);
    println!("  ring-buffer records {:>12}", f.flood_ring_events);
    println!("  unaccounted         {:>12}", unaccounted);
    println!("  netiso CPU          {:>11.1}% of one core", f.flood_cpu_percent);
    println!("  tracepoint program  {:>12.0} ns/drop", f.tracepoint_ns_per_drop);
    Ok(ExitCode::SUCCESS)
}

fn storm(id: &str, options: &xtask::storm::Options, netiso_args: &[String]) -> anyhow::Result<ExitCode> {
    eprintln!("building netiso (release)");
    let netiso = xtask::build::netiso(true)?;
    let helper = std::env::current_exe().context("locating the xtask binary")?;
    let lab = Lab::new(id, &out_dir(id), &helper);
    let netiso_args: Vec<&str> = netiso_args.iter().map(String::as_str).collect();
    xtask::storm::run(&lab, &netiso, options, &netiso_args)?.print(options);
    Ok(ExitCode::SUCCESS)
}

fn vm(mut kernels: Vec<String>, timeout: u64) -> anyhow::Result<ExitCode> {
    if kernels.is_empty() {
        kernels = xtask::vm::SERIES.iter().map(|s| s.to_string()).collect();
    }
    let outcomes = xtask::vm::run(&kernels, std::time::Duration::from_secs(timeout))?;
    let mut failed = 0;
    for o in &outcomes {
        let result = if o.passed { "passed" } else { "FAILED" };
        failed += usize::from(!o.passed);
        println!("vm: Linux {:<5} {:<24} {result} in {:.0} s", o.series, o.release, o.elapsed.as_secs_f64());
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn leftovers(remove: bool, prefix: &str) -> anyhow::Result<ExitCode> {
    use xtask::leftovers;
    let (found, verb) =
        if remove { (leftovers::remove(prefix)?, "removed") } else { (leftovers::find(prefix)?, "found") };
    if found.is_empty() {
        println!("leftovers: nothing named {prefix}* left behind");
    }
    for item in &found {
        println!("leftovers: {verb} {item}");
    }
    Ok(ExitCode::SUCCESS)
}

fn lab_action(action: LabAction, id: &str) -> anyhow::Result<ExitCode> {
    let lab = lab_for(id)?;
    match action {
        LabAction::Up { policies: path, allow_all, enforcement, kube_proxy } => {
            let set = if allow_all { Vec::new() } else { policies(path.as_ref(), false)? };
            let lab = lab.with_enforcement(enforcement).with_kube_proxy(kube_proxy);
            lab.up(&set)?;
            println!(
                "lab `{id}` is up: node namespace {}, manifests {}, policies enforced by {enforcement:?}, Services by kube-proxy in {kube_proxy:?} mode",
                lab.node_ns(),
                lab.manifests_path().display()
            );
            println!("observe it with: ip netns exec {} netiso run --log-format text", lab.node_ns());
        }
        LabAction::Apply { policies: path, with_baseline } => {
            lab.apply_policies(&policies(path.as_ref(), with_baseline)?)?;
            println!("lab `{id}` now enforces the policies in {}", lab.manifests_path().display());
        }
        LabAction::Traffic { legitimate } => {
            let probes = if legitimate { lab::legitimate_probes() } else { lab::all_probes() };
            let results = lab.traffic_of(probes)?;
            let mut mismatches = 0;
            for r in &results {
                let check = if r.observed == r.expected { "as Kubernetes does" } else { "CONTRARY TO KUBERNETES" };
                if r.observed != r.expected {
                    mismatches += 1;
                }
                println!("{:10} {}  ({check})", r.outcome.to_string(), r.probe);
            }
            if mismatches > 0 {
                anyhow::bail!("{mismatches} flows behaved contrary to what Kubernetes does under the policies");
            }
        }
        LabAction::Down => {
            lab.down()?;
            println!("lab `{id}` is down");
        }
    }
    Ok(ExitCode::SUCCESS)
}
