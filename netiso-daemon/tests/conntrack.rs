//! The connection tracking lookup against a real kernel: a node namespace DNATs a "ClusterIP" as
//! kube-proxy does, a pod sends to it, and the lookup names the address the packet was sent to.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;

use netiso::datapath::conntrack::{Connection, Conntrack, Translations};
use netiso::datapath::record::IpProtocol;
use support::{connect, node_and_pod, tag};

const DNAT: &str = "table ip kube-proxy {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.96.77.1 udp dport 80 dnat to 10.77.0.1:8080
    }
}
";

fn in_netns(netns: &str, program: &str, args: &[&str]) {
    let out = Command::new("ip").args(["netns", "exec", netns, program]).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `f` on a thread inside network namespace `netns`.
fn inside<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let namespace = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_translated_connection_names_where_it_was_sent() {
    let tag = tag("ct");
    let (node, pod, _cleanup) = node_and_pod(&tag);
    connect(&node, &pod);
    in_netns(&pod, "ip", &["route", "add", "default", "via", "10.77.0.1"]);
    let rules = std::env::temp_dir().join(format!("{tag}.nft"));
    std::fs::write(&rules, DNAT).unwrap();
    in_netns(&node, "nft", &["-f", rules.to_str().unwrap()]);
    std::fs::remove_file(&rules).unwrap();

    let sent = |source_port: u16, to: &str| {
        let to: SocketAddr = to.parse().unwrap();
        inside(&pod, move || {
            let socket = UdpSocket::bind(("10.77.0.2", source_port)).unwrap();
            socket.send_to(b"hello", to).unwrap();
        });
        Connection {
            protocol: IpProtocol::Udp,
            source: SocketAddr::from(([10, 77, 0, 2], source_port)),
            destination: to,
        }
    };
    let to_service = sent(47301, "10.96.77.1:80");
    let direct = sent(47302, "10.77.0.1:9");
    let untracked = Connection { source: SocketAddr::from(([10, 77, 0, 2], 47303)), ..to_service };

    let found = inside(&node, move || {
        let mut conntrack = Conntrack::open().unwrap();
        [to_service, direct, untracked]
            .map(|c| (conntrack.reply_source(&c).unwrap(), conntrack.translated_destination(&c)))
    });
    let backend: SocketAddr = "10.77.0.1:8080".parse().unwrap();
    assert_eq!(found[0], (Some(backend), Some(backend)), "the DNATed connection names its backend");
    assert_eq!(found[1], (Some(direct.destination), None), "a connection nobody translated reaches where it was sent");
    assert_eq!(found[2], (None, None), "a connection the kernel never tracked has no entry");
}
