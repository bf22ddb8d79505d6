//! `netiso run` on real packets in network namespaces of its own: interfaces are followed as they
//! come and go, and a full map loses nothing silently.

mod support;

use std::time::Duration;

use support::{Daemon, connect, ip, node_and_pod, start_daemon, tag, tc_programs, wait_until};

#[test]
fn interfaces_are_followed_and_a_full_map_loses_nothing_silently() {
    let tag = tag("nd");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    let mut daemon = start_daemon(&node, &store, &["--flow-map-entries", "4", "--drain-interval", "200ms"]);

    // A pod interface appears after netiso started.
    connect(&node, &pod);
    assert!(
        daemon.wait_log("observing interface", Duration::from_secs(10)),
        "vpod was not attached: {:?}",
        daemon.diagnostics()
    );

    // Eight flows from the pod, more than the flow map holds.
    support::udp_flows_from_pod(&pod, 40001, 8, 9100);
    let flows_from_pod = |daemon: &Daemon| {
        let records = daemon.records();
        records.iter().filter(|r| r["event"] == "flow" && r["src_ip"] == "10.77.0.2" && r["protocol"] == "UDP").count()
    };
    assert!(
        wait_until(Duration::from_secs(30), || flows_from_pod(&daemon) >= 8),
        "every flow is reported, in the map or as an overflow record: {:#?}",
        daemon.records()
    );

    ip(&["-n", &node, "link", "delete", "vpod"]);
    assert!(daemon.wait_log("interface gone; detached", Duration::from_secs(10)));
    let stats = daemon.stop().unwrap();
    let records = daemon.records().clone();

    let from_pod: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "flow" && r["src_ip"] == "10.77.0.2" && r["protocol"] == "UDP")
        .collect();
    assert_eq!(from_pod.len(), 8, "every flow is reported, in the map or as an overflow record: {records:#?}");
    let overflow_flows = records.iter().filter(|r| r["event"] == "flow" && r["overflow"] == true).count() as u64;
    assert!(overflow_flows > 0, "the map held at most 4 keys");
    assert_eq!(
        stats["flow_map_full"].as_u64(),
        Some(overflow_flows),
        "each map-full loss is counted and reported: {stats}"
    );
    assert_eq!(stats["ringbuf_full"].as_u64(), Some(0));
    assert!(
        !daemon.diagnostics().iter().any(|l| l.contains("netiso::kernel")),
        "the kernel programs' diagnostics are off unless asked for"
    );
}

/// With `NETISO_LOG=netiso::kernel=debug` the kernel programs log their rare paths through
/// aya-log: a full flow map is reported, at the first loss on a CPU and each time the count
/// doubles, not once per packet.
#[test]
fn kernel_diagnostics_name_a_full_map_at_debug_level_without_a_line_per_packet() {
    let tag = tag("nz");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    connect(&node, &pod);
    let mut daemon = Daemon::start_with(
        std::path::Path::new(env!("CARGO_BIN_EXE_netiso")),
        &node,
        &store,
        &["--flow-map-entries", "2", "--drain-interval", "200ms"],
        None,
        &[("NETISO_LOG", "info,netiso::kernel=debug")],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    support::udp_flows_from_pod(&pod, 44701, 16, 9471);
    let kernel_lines = |daemon: &Daemon| -> Vec<serde_json::Value> {
        daemon
            .diagnostics()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "netiso::kernel")
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), || kernel_lines(&daemon)
            .iter()
            .any(|v| v["message"].as_str().is_some_and(|m| m.starts_with("flow map full")))),
        "{:#?}",
        daemon.diagnostics()
    );
    let stats = daemon.stop().unwrap();
    let lines = kernel_lines(&daemon);
    let losses = stats["flow_map_full"].as_u64().unwrap();
    assert!(losses >= 14, "16 new flows, room for 2: {stats}");
    assert!((lines.len() as u64) < losses, "{} lines for {losses} losses: {lines:#?}", lines.len());
    assert!(lines.iter().all(|v| v["level"] == "DEBUG"), "{lines:#?}");
}

/// One log line per blocked conversation and interval, carrying the evidence fields: its attempts
/// from other source ports within the interval are counted on its record, not logged.
#[test]
fn a_blocked_conversation_is_logged_once_per_interval_and_its_record_counts_the_attempts() {
    let tag = tag("nl");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    connect(&node, &pod);
    let mut daemon = start_daemon(&node, &store, &["--drain-interval", "200ms", "--blocked-log-interval", "5s"]);
    let logged = |daemon: &Daemon| {
        daemon.diagnostics().iter().filter(|l| l.contains("flow blocked") && l.contains("9401")).count()
    };
    // Two attempts (two source ports) within one interval: one record and one line.
    support::udp_flows_from_pod(&pod, 44001, 2, 9401);
    assert!(wait_until(Duration::from_secs(20), || logged(&daemon) == 1), "{:?}", daemon.diagnostics());
    // The interval is time itself: once it has passed, the next attempt is logged again.
    std::thread::sleep(Duration::from_secs(6));
    support::udp_flows_from_pod(&pod, 44003, 1, 9401);
    assert!(wait_until(Duration::from_secs(20), || logged(&daemon) == 2), "{:?}", daemon.diagnostics());
    daemon.stop().unwrap();
    let lines: Vec<serde_json::Value> = daemon
        .diagnostics()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "flow blocked" && v["destination_port"] == 9401)
        .collect();
    assert_eq!(lines.len(), 2, "the repeat within the interval is not logged: {lines:#?}");
    let store = netiso::evidence::store::Store::open(&store, Default::default()).unwrap();
    let attempts = |line: &serde_json::Value| {
        let id = line["id"].as_str().unwrap().parse().unwrap();
        store.get(id).unwrap().map(|r| r.attempts)
    };
    assert_eq!(attempts(&lines[0]), Some(2), "the first line's record counts both attempts");
    assert_eq!(attempts(&lines[1]), Some(1));
    for key in ["id", "source", "destination", "protocol", "reason", "location", "attribution"] {
        assert!(lines[0].get(key).is_some(), "{key} missing: {}", lines[0]);
    }
    assert_eq!(lines[0]["reason"], "NO_SOCKET");
    assert_eq!(lines[0]["destination"], "10.77.0.1");
    // Before 5.17 the reason is inferred from where the packet was dropped, and said so, once.
    let given = support::kernel_gives_drop_reasons();
    assert_eq!(lines[0]["reason_inferred"], !given, "{}", lines[0]);
    let said = daemon.diagnostics().iter().filter(|l| l.contains("this kernel gives no drop reasons")).count();
    assert_eq!(said, usize::from(!given));
}

/// A daemon killed with SIGKILL leaves nothing the next start does not clean up: TCX links go with
/// the process; clsact filters (kernels before 6.6) stay, and the next start replaces them.
#[test]
fn a_killed_daemons_attachments_are_replaced_by_the_next_start() {
    let tag = tag("nx");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    connect(&node, &pod);
    let one_set = |programs: &[String]| {
        let hooks: Vec<&str> = programs.iter().filter_map(|p| p.split_once(' ').map(|(_, rest)| rest)).collect();
        hooks == ["egress netiso_to_pod", "ingress netiso_from_pod"]
    };

    let mut first = start_daemon(&node, &store, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || one_set(&tc_programs(&node, "vpod"))),
        "{:?}",
        tc_programs(&node, "vpod")
    );
    first.kill();
    let left = tc_programs(&node, "vpod");
    assert!(left.iter().all(|p| p.starts_with("clsact ")), "TCX links go with the process: {left:?}");

    let mut second = start_daemon(&node, &store, &["--drain-interval", "200ms"]);
    let attached = tc_programs(&node, "vpod");
    assert!(one_set(&attached), "one set of programs, the stale filters replaced: {attached:?}");
    if !left.is_empty() {
        assert!(second.wait_log("replacing a stale clsact filter", Duration::from_secs(5)));
    }
    support::udp_from_pod(&pod, 44201, 9421);
    assert!(
        wait_until(Duration::from_secs(20), || {
            second.records().iter().any(|r| r["event"] == "drop" && r["dst_port"] == 9421)
        }),
        "the new daemon records drops: {:?}",
        second.diagnostics()
    );
    second.stop().unwrap();
    assert_eq!(tc_programs(&node, "vpod"), Vec::<String>::new(), "a clean stop detaches everything");
}
