//! What one connection tracking lookup costs: the question netiso asks when a flow left for a
//! ClusterIP and its backend is on another node. A namespace DNATs a ClusterIP as kube-proxy does
//! and tracks 1,000 translated UDP connections; the lookup asks for one of them (a hit) or for one
//! never sent (a miss). Needs root. Run with `cargo bench -p netiso-daemon --bench conntrack`.

use std::hint::black_box;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netiso::datapath::conntrack::{Connection, Conntrack};
use netiso::datapath::record::IpProtocol;

const CONNECTIONS: u16 = 1000;
const FIRST_PORT: u16 = 20_000;

const DNAT: &str = "table ip kube-proxy {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.96.88.1 udp dport 53 dnat to 10.88.0.1:5353
    }
}
";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {} (the benchmark needs root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node namespace and a pod namespace joined by a veth pair, removed on drop.
struct Namespaces {
    node: String,
    pod: String,
}

impl Namespaces {
    fn new() -> Self {
        let tag = format!("ni-bct{}", std::process::id());
        let ns = Namespaces { node: format!("{tag}-node"), pod: format!("{tag}-pod") };
        ip(&["netns", "add", &ns.node]);
        ip(&["netns", "add", &ns.pod]);
        ip(&["-n", &ns.node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &ns.pod]);
        ip(&["-n", &ns.node, "addr", "add", "10.88.0.1/24", "dev", "vpod"]);
        ip(&["-n", &ns.node, "link", "set", "vpod", "up"]);
        ip(&["-n", &ns.pod, "addr", "add", "10.88.0.2/24", "dev", "eth0"]);
        ip(&["-n", &ns.pod, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.pod, "route", "add", "default", "via", "10.88.0.1"]);
        let rules = std::env::temp_dir().join(format!("{}.nft", ns.node));
        std::fs::write(&rules, DNAT).expect("writing the rules");
        let loaded =
            Command::new("ip").args(["netns", "exec", &ns.node, "nft", "-f"]).arg(&rules).status().expect("nft runs");
        let _ = std::fs::remove_file(&rules);
        assert!(loaded.success(), "nft -f {}", rules.display());
        ns
    }

    /// Runs `f` on a thread inside namespace `netns`.
    fn inside<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let namespace = std::fs::File::open(format!("/run/netns/{netns}")).expect("the namespace exists");
        std::thread::spawn(move || {
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("the thread ran")
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn connection(port: u16) -> Connection {
    Connection {
        protocol: IpProtocol::Udp,
        source: SocketAddr::from(([10, 88, 0, 2], port)),
        destination: SocketAddr::from(([10, 96, 88, 1], 53)),
    }
}

fn conntrack(c: &mut Criterion) {
    let namespaces = Namespaces::new();
    Namespaces::inside(&namespaces.pod, || {
        for port in FIRST_PORT..FIRST_PORT + CONNECTIONS {
            let socket = UdpSocket::bind(("10.88.0.2", port)).expect("a source port");
            socket.send_to(b"query", "10.96.88.1:53").expect("sent");
        }
    });
    // The socket stays in the namespace it was opened in, whichever thread uses it.
    let mut table = Namespaces::inside(&namespaces.node, || Conntrack::open().expect("ctnetlink opens"));
    let backend = table.reply_source(&connection(FIRST_PORT)).expect("a lookup");
    assert_eq!(backend, Some(SocketAddr::from(([10, 88, 0, 1], 5353))), "the connections are tracked");

    let mut group = c.benchmark_group("conntrack lookup");
    group.throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function("tracked connection", |b| {
        b.iter(|| {
            next = (next + 1) % CONNECTIONS;
            black_box(table.reply_source(&connection(FIRST_PORT + next)).expect("a lookup"))
        })
    });
    group.bench_function("untracked connection", |b| {
        b.iter(|| black_box(table.reply_source(&connection(FIRST_PORT - 1)).expect("a lookup")))
    });
    group.finish();
}

criterion_group!(benches, conntrack);
criterion_main!(benches);
