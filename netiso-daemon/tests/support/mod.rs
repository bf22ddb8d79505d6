//! Helpers shared by the integration tests: network namespaces that clean up after themselves,
//! a `netiso run` process with its output collected, and a fake Kubernetes API server.

#![allow(dead_code)]

pub mod apiserver;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A short tag for the names (network namespaces, files) of one test, unique across tests and
/// concurrent runs. It starts with `ni-`, the prefix `cargo xtask leftovers` removes when a killed
/// run left something behind.
pub fn tag(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let sequence = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("ni-{prefix}{}x{}{sequence}", std::process::id() % 100_000, nanos % 10_000)
}

/// Network namespaces and files removed on drop, also when the test fails.
pub struct Cleanup {
    pub namespaces: Vec<String>,
    pub files: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A "node" namespace with netiso's view and a "pod" namespace joined to it by a veth pair:
/// node side `vpod` 10.77.0.1, pod side `eth0` 10.77.0.2.
pub fn node_and_pod(tag: &str) -> (String, String, Cleanup) {
    let (node, pod) = (format!("{tag}-node"), format!("{tag}-pod"));
    ip(&["netns", "add", &node]);
    let cleanup = Cleanup { namespaces: vec![node.clone(), pod.clone()], files: vec![] };
    ip(&["netns", "add", &pod]);
    ip(&["-n", &node, "link", "set", "lo", "up"]);
    (node, pod, cleanup)
}

pub fn connect(node: &str, pod: &str) {
    ip(&["-n", node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", pod]);
    ip(&["-n", node, "addr", "add", "10.77.0.1/24", "dev", "vpod"]);
    ip(&["-n", node, "link", "set", "vpod", "up"]);
    ip(&["-n", pod, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    ip(&["-n", pod, "link", "set", "eth0", "up"]);
}

/// nft inside network namespace `netns`: its output.
pub fn nft(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", netns, "nft"]).args(args).output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the metric line of daemon metrics in `netns` that starts with `series`; 0 while it
/// does not exist.
pub fn metric(netns: &str, series: &str) -> u64 {
    let (_, text) = curl(netns, &["http://127.0.0.1:9962/metrics"]);
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok()).map_or(0, |v| v as u64)
}

/// curl inside network namespace `netns`: (HTTP status, body).
pub fn curl(netns: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "-k", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Sends `count` UDP datagrams from the pod namespace, each from its own source port starting at
/// `first_port`, to 10.77.0.1:`dport`, where nothing listens: `count` distinct dropped flows.
pub fn udp_flows_from_pod(pod: &str, first_port: u16, count: u16, dport: u16) {
    let path = format!("/run/netns/{pod}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        for port in first_port..first_port + count {
            let socket = std::net::UdpSocket::bind(("10.77.0.2", port)).unwrap();
            socket.send_to(b"x", ("10.77.0.1", dport)).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Sends one UDP datagram from the pod namespace to each of `count` ports of 10.77.0.1 from
/// `first_dport` on, where nothing listens: `count` distinct dropped conversations.
pub fn udp_to_ports_from_pod(pod: &str, first_dport: u16, count: u16) {
    let path = format!("/run/netns/{pod}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let socket = std::net::UdpSocket::bind(("10.77.0.2", 0)).unwrap();
        for port in first_dport..first_dport + count {
            socket.send_to(b"x", ("10.77.0.1", port)).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Sends one UDP datagram from the pod namespace (source port `sport`) to 10.77.0.1:`dport`,
/// where nothing listens: the node drops it with NO_SOCKET.
/// Sent from a socket of this process (`nc -u -w0` may exit before sending on a loaded machine).
pub fn udp_from_pod(pod: &str, sport: u16, dport: u16) {
    udp_flows_from_pod(pod, sport, 1, dport);
}

/// netiso's tc programs on interface `interface` of network namespace `netns`, as
/// "HOOK DIRECTION PROGRAM": TCX links (Linux >= 6.6) and clsact filters, sorted.
pub fn tc_programs(netns: &str, interface: &str) -> Vec<String> {
    use aya::programs::SchedClassifier;
    use aya::programs::tc::TcAttachType;
    let directions = [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")];
    let (ns, name) = (netns.to_owned(), std::ffi::CString::new(interface).unwrap());
    let mut found = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut found = Vec::new();
        for (attach_type, direction) in directions {
            // A kernel without TCX answers with an error: nothing attached there.
            for program in SchedClassifier::query_tcx(name.as_c_str(), attach_type).map(|(_, p)| p).unwrap_or_default()
            {
                found.push(format!("tcx {direction} {}", program.name_as_str().unwrap_or_default()));
            }
        }
        found
    })
    .join()
    .unwrap();
    for (_, direction) in directions {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "tc", "filter", "show", "dev", interface, direction])
            .output()
            .expect("tc runs");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(program) = line.split_whitespace().find(|w| w.starts_with("netiso_")) {
                found.push(format!("clsact {direction} {program}"));
            }
        }
    }
    found.retain(|p| p.contains(" netiso_"));
    found.sort();
    found
}

/// Whether the running kernel gives drop reasons (Linux >= 5.17); before, netiso infers them.
pub fn kernel_gives_drop_reasons() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF");
    netiso::datapath::reasons::DropReasons::from_btf(&netiso::datapath::btf::Btf::parse(&btf).unwrap()).given()
}

/// Waits up to `timeout` for `condition`.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

pub use netiso::daemon::process::Process as Daemon;

/// `netiso run --log-format json --store STORE ARGS` in `netns`, once its programs are attached.
pub fn start_daemon(netns: &str, store: &Path, args: &[&str]) -> Daemon {
    Daemon::start(Path::new(env!("CARGO_BIN_EXE_netiso")), netns, store, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A CA and a server certificate for 127.0.0.1 signed by it, written as PEM files.
pub fn write_certificate(
    dir: &std::path::Path,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {tag}"));
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key)).unwrap();
    let (ca_file, cert_file, key_file) = (dir.join(format!("ca-{tag}.pem")), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (ca_file, cert_file, key_file)
}
