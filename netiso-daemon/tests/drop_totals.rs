//! Every dropped packet is counted, exactly, even when the drop map is too small to keep its flow:
//! a flood of fresh source ports to a port the node's nftables drops, against a drop map of 16
//! entries. The kernel's per-reason total equals the nftables rule's counter.
//!
//! Its own test binary: cargo runs binaries one at a time, so no other test's drops reach the
//! host-wide totals while it runs.

mod support;

use std::time::Duration;

use support::{
    Cleanup, connect, kernel_gives_drop_reasons, metric, nft, node_and_pod, start_daemon, tag, udp_flows_from_pod,
};

const PORT: u16 = 9471;
const PACKETS: u16 = 3000;

#[test]
fn every_dropped_packet_is_counted_when_the_drop_map_is_full() {
    let tag = tag("dt");
    let (node, pod, mut cleanup): (String, String, Cleanup) = node_and_pod(&tag);
    connect(&node, &pod);
    let rules = std::env::temp_dir().join(format!("{tag}.nft"));
    cleanup.files.push(rules.clone());
    std::fs::write(
        &rules,
        format!(
            "table inet {tag_table} {{\n counter blocked {{}}\n chain input {{\n  type filter hook input priority filter; policy accept;\n  udp dport {PORT} counter name blocked drop\n }}\n}}\n",
            tag_table = "netiso_test"
        ),
    )
    .unwrap();
    nft(&node, &["-f", rules.to_str().unwrap()]);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    let mut daemon = start_daemon(&node, &store, &["--drop-map-entries", "16", "--drain-interval", "200ms"]);

    // Before 5.17 the kernel gives no reason: every drop of the host shares one total.
    let reasons = kernel_gives_drop_reasons();
    let reason = if reasons {
        r#"reason_class="policy",reason="NETFILTER_DROP""#
    } else {
        r#"reason_class="other",reason="none""#
    };
    let series = format!("netiso_kernel_drops_total{{{reason}}}");
    let before = metric(&node, &series);
    udp_flows_from_pod(&pod, 30000, PACKETS, PORT);

    let counted = || metric(&node, &series) - before;
    assert!(
        support::wait_until(Duration::from_secs(60), || counted() >= u64::from(PACKETS)),
        "{} of {PACKETS} drops counted:\n{}",
        counted(),
        daemon.diagnostics().join("\n")
    );
    let nft_counter = nft(&node, &["list", "counter", "inet", "netiso_test", "blocked"]);
    assert!(nft_counter.contains(&format!("packets {PACKETS} ")), "{nft_counter}");
    if reasons {
        assert_eq!(counted(), u64::from(PACKETS), "as many as nftables dropped");
    }
    let lost = metric(&node, r#"netiso_datapath_lost_events_total{source="drop_map_full"}"#);
    assert!(lost > 0, "the drop map was full: detail was lost, the count was not");
    daemon.stop().unwrap();
}
