//! The evidence store under a real full disk: the daemon says it is not ready while writes fail,
//! counts the failures, holds the records, and writes every one of them once space returns.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use netiso::evidence::store::{Query, Store};
use support::{connect, curl, node_and_pod, start_daemon, tag, udp_to_ports_from_pod, wait_until};

/// A tmpfs of its own, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_makes_the_daemon_unready_until_space_returns_and_loses_no_record() {
    let tag = tag("ns");
    let (node, pod, _cleanup) = node_and_pod(&tag);
    connect(&node, &pod);
    let fs = Tmpfs(std::env::temp_dir().join(&tag));
    std::fs::create_dir_all(&fs.0).unwrap();
    assert!(
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"]).arg(&fs.0).status().unwrap().success()
    );
    let store = fs.0.join("evidence.redb");
    // Every attempt a record of its own (not a scan's summary), so that records fill the disk.
    let mut daemon = start_daemon(&node, &store, &["--drain-interval", "200ms", "--blocked-log-interval", "0s"]);
    let readyz = || curl(&node, &["http://127.0.0.1:9962/readyz"]);
    assert!(wait_until(Duration::from_secs(10), || readyz().0 == 200), "{:?}", readyz());

    let filler = fs.0.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
    }
    // Enough new flows that their records outgrow the store file's free pages.
    const FIRST_PORT: u16 = 21000;
    const FLOWS: u16 = 600;
    udp_to_ports_from_pod(&pod, FIRST_PORT, FLOWS);
    assert!(
        wait_until(Duration::from_secs(30), || readyz().0 == 503),
        "not ready while writes fail: {:?}",
        daemon.diagnostics()
    );
    let (_, why) = readyz();
    assert!(why.contains("evidence store writes fail") && why.contains("No space left"), "{why}");
    let (_, metrics) = curl(&node, &["http://127.0.0.1:9962/metrics"]);
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("netiso_store_write_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "failed writes are counted: {metrics}");

    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || readyz().0 == 200),
        "ready again once space returns: {:?}",
        readyz()
    );
    daemon.stop().unwrap();
    let logged = daemon.diagnostics().iter().filter(|l| l.contains("evidence store writes fail;")).count();
    assert!((1..=2).contains(&logged), "failures are logged at a bounded rate, not per write: {logged}");

    let records =
        Store::open(&store, Default::default()).unwrap().query(&Query { limit: 0, ..Default::default() }).unwrap();
    let drops = records
        .iter()
        .filter(|r| {
            (FIRST_PORT..FIRST_PORT + FLOWS).contains(&r.destination.port)
                && r.verdict == netiso::evidence::record::FlowVerdict::Dropped
        })
        .count();
    assert_eq!(drops, FLOWS as usize, "every record held during the outage is written");
}
