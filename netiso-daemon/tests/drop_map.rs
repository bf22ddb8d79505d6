//! The drop map is shared by the CPUs, its counts added atomically: what it counts is exact when
//! several CPUs drop packets of one key at once. Its own test binary, run on the host only: the
//! VM stage runs its kernels under emulation, where the flood costs minutes, and the datapath
//! suite there already loads the programs on each kernel.

mod support;

use std::time::Duration;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt};
use nix::unistd::Pid;
use support::{connect, node_and_pod, start_daemon, tag, wait_until};

/// The drop map is shared by the CPUs: one conversation dropped on every CPU at once (sockets
/// sharing its source port, each sending from its own CPU) is counted exactly, each packet once:
/// its record counts as many drops as nftables counted packets reaching the closed port.
#[test]
fn a_conversation_dropped_on_every_cpu_at_once_is_counted_exactly() {
    const PER_CPU: u64 = 5000;
    const SPORT: u16 = 45011;
    const DPORT: u16 = 9411;

    let tag = tag("nc");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    let rules = std::env::temp_dir().join(format!("{tag}.nft"));
    cleanup.files.extend([store.clone(), rules.clone()]);
    connect(&node, &pod);
    std::fs::write(
        &rules,
        format!(
            "table inet netiso_test {{\n counter arrived {{}}\n chain input {{\n  type filter hook input priority filter; policy accept;\n  udp dport {DPORT} counter name arrived\n }}\n}}\n"
        ),
    )
    .unwrap();
    support::nft(&node, &["-f", rules.to_str().unwrap()]);
    let mut daemon = start_daemon(&node, &store, &["--drain-interval", "200ms"]);
    let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..CpuSet::count()).filter(|&cpu| allowed.is_set(cpu).unwrap_or(false)).collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(cpus.len()));
    let senders: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let (pod, barrier) = (pod.clone(), barrier.clone());
            std::thread::spawn(move || {
                let ns = std::fs::File::open(format!("/run/netns/{pod}")).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let mut one = CpuSet::new();
                one.set(cpu).unwrap();
                sched_setaffinity(Pid::from_raw(0), &one).unwrap();
                let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::empty(), None).unwrap();
                setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
                bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(10, 77, 0, 2, SPORT)).unwrap();
                let socket = std::net::UdpSocket::from(fd);
                barrier.wait();
                for _ in 0..PER_CPU {
                    socket.send_to(b"x", ("10.77.0.1", DPORT)).unwrap();
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    // Packets the veth's backlog could not take on a busy machine never reach the port.
    let arrived = || {
        let counter = support::nft(&node, &["list", "counter", "inet", "netiso_test", "arrived"]);
        counter.split_once("packets ").and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    let recorded = || support::metric(&node, r#"netiso_drops_total{reason_class="socket",reason="NO_SOCKET"}"#);
    assert!(
        wait_until(Duration::from_secs(30), || arrived().is_some_and(|a| a >= 1000 && recorded() == a)),
        "{} drops recorded, {:?} packets of {} arrived from {} CPUs",
        recorded(),
        arrived(),
        PER_CPU * cpus.len() as u64,
        cpus.len()
    );
    daemon.stop().unwrap();
}
