//! Evidence outlives the daemon: records written before a restart are queryable after it.

mod support;

use std::time::Duration;

use netiso::evidence::store::{Query, Store};
use support::{connect, curl, node_and_pod, start_daemon, tag, udp_from_pod, wait_until};

#[test]
fn records_survive_a_daemon_restart() {
    let tag = tag("nr");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    connect(&node, &pod);
    let args = ["--drain-interval", "200ms"];

    let mut first = start_daemon(&node, &store, &args);
    // Stopped once the drop is stored: what is asserted is that records survive, not how fast.
    let stored = |port: u16| {
        let (_, body) = curl(&node, &[&format!("http://127.0.0.1:9963/v1/flows?verdict=dropped&port={port}")]);
        body.contains(&format!("\"port\":{port}"))
    };
    udp_from_pod(&pod, 42001, 9101);
    assert!(wait_until(Duration::from_secs(30), || stored(9101)));
    first.stop().unwrap();
    let before = Store::open(&store, Default::default()).unwrap().query(&Query::default()).unwrap();
    assert!(before.iter().any(|r| r.destination.port == 9101), "the first run stored its drop");

    let mut second = start_daemon(&node, &store, &args);
    udp_from_pod(&pod, 42002, 9102);
    assert!(wait_until(Duration::from_secs(30), || stored(9102)));
    second.stop().unwrap();

    let after = Store::open(&store, Default::default()).unwrap().query(&Query::default()).unwrap();
    for r in &before {
        let same = after.iter().find(|a| a.id == r.id).unwrap_or_else(|| panic!("record {} lost in the restart", r.id));
        assert_eq!(same.destination.port, r.destination.port);
        assert_eq!(same.reason, r.reason);
    }
    assert!(after.iter().any(|r| r.destination.port == 9102), "the second run adds to the same store");
    let max_before = before.iter().map(|r| r.id).max().unwrap();
    assert!(
        after.iter().filter(|r| r.destination.port == 9102).all(|r| r.id > max_before),
        "ids continue after a restart"
    );
}
