//! Two labs with the same pod addresses on one host, as when another cluster's node or a nested
//! cluster shares the machine: the drop tracepoint fires for both, and each daemon records only
//! the drops of its own node and pods.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use xtask::lab::{self, Lab, ProbeKind, scenario};

/// Source ports: lab A's blocked flow and pod-namespace drop, then lab B's.
const A_BLOCKED: u16 = 45101;
const A_NO_SOCKET: u16 = 45102;
const B_BLOCKED: u16 = 45103;
const B_NO_SOCKET: u16 = 45104;

fn drop_from(records: &[Value], source_port: u16) -> Option<&Value> {
    records.iter().find(|r| r["event"] == "drop" && r["src_port"] == source_port)
}

#[test]
fn each_daemon_records_only_its_own_labs_drops() {
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    let (labs, _scratch): (Vec<Lab>, Vec<lab::Scratch>) =
        ["na", "nb"].iter().map(|p| lab::for_test(p, &helper)).unzip();
    let baseline = lab::baseline_policies().unwrap();
    let _guards: Vec<_> = labs.iter().map(|l| l.up_guarded(&baseline).expect("lab comes up")).collect();
    let mut observers: Vec<_> =
        labs.iter().map(|l| l.observe(&netiso, &["--drain-interval", "200ms"]).expect("netiso starts")).collect();

    let api = scenario::pod("production/api");
    let api_8080 = SocketAddr::new(api.ipv4(), 8080);
    // Nothing serves UDP 9999 on the api pod: the pod's own namespace drops it (no socket).
    let api_closed = SocketAddr::new(api.ipv4(), 9999);
    for (lab, blocked, no_socket) in [(&labs[0], A_BLOCKED, A_NO_SOCKET), (&labs[1], B_BLOCKED, B_NO_SOCKET)] {
        assert!(!lab.probe_from("develop/debug", ProbeKind::Tcp, api_8080, blocked), "the baseline blocks it");
        assert!(!lab.probe_from("ingress-nginx/controller", ProbeKind::Udp, api_closed, no_socket));
    }
    for (observer, own) in observers.iter().zip([[A_BLOCKED, A_NO_SOCKET], [B_BLOCKED, B_NO_SOCKET]]) {
        let seen = observer
            .wait_for(Duration::from_secs(20), |records| own.iter().all(|port| drop_from(records, *port).is_some()));
        assert!(seen, "own drops recorded: {:?}", observer.diagnostics());
    }
    // The final drain at stop reads everything the kernel counted, the other lab's drops included.
    let totals: Vec<Value> = observers.iter_mut().map(|o| o.stop().unwrap_or_else(|e| panic!("{e:#}"))).collect();

    for (i, ((lab, observer), stopped)) in labs.iter().zip(&observers).zip(&totals).enumerate() {
        let records = observer.records();
        let (own, other) = if i == 0 {
            ([A_BLOCKED, A_NO_SOCKET], [B_BLOCKED, B_NO_SOCKET])
        } else {
            ([B_BLOCKED, B_NO_SOCKET], [A_BLOCKED, A_NO_SOCKET])
        };
        for port in other {
            assert!(
                drop_from(&records, port).is_none(),
                "lab {}: the other lab's drop from port {port} is recorded",
                lab.id
            );
        }
        let blocked = drop_from(&records, own[0]).unwrap();
        assert_eq!(blocked["reason"], "NETFILTER_DROP", "{blocked}");
        assert!(blocked.get("netns").is_none(), "dropped in the node's own namespace: {blocked}");
        let no_socket = drop_from(&records, own[1]).unwrap();
        assert_eq!(no_socket["reason"], "NO_SOCKET", "{no_socket}");
        assert_eq!(no_socket["netns"], lab.pod_ns(api), "dropped in the api pod's namespace: {no_socket}");
        assert_eq!(no_socket["interface"], "eth0", "named as it is in that namespace: {no_socket}");

        assert!(stopped["foreign_drops"].as_u64() >= Some(2), "the other lab's drops are counted: {stopped}");

        // The evidence store attributes the pod-namespace drop to the api pod, and has nothing
        // of the other lab.
        let store = netiso::evidence::store::Store::open(&lab.store_path(), Default::default()).unwrap();
        let all = store.query(&Default::default()).unwrap();
        let mine = all.iter().find(|r| r.source.port == own[1]).expect("the no-socket drop is stored");
        assert_eq!(mine.destination.pod_key().as_deref(), Some("production/api"));
        assert!(all.iter().all(|r| !other.contains(&r.source.port)), "nothing of the other lab is stored");
    }
}
