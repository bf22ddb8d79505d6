//! `netiso run | head -1`: the reader of standard output goes away (and standard error may be
//! closed too). The daemon keeps recording and serving, and exits cleanly when told to.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{connect, curl, node_and_pod, tag, udp_flows_from_pod, wait_until};

/// The daemon, killed if the test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn closed_outputs_do_not_stop_recording() {
    let tag = tag("no");
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    cleanup.files.push(store.clone());
    connect(&node, &pod);
    let mut daemon = Running(
        Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_netiso"), "run", "--log-format", "json"])
            .args(["--drain-interval", "200ms", "--store"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let daemon = &mut daemon.0;
    assert!(wait_until(Duration::from_secs(30), || curl(&node, &["http://127.0.0.1:9962/readyz"]).0 == 200));

    // Read one record, then close both outputs, as `| head -1` and a closed terminal do.
    udp_flows_from_pod(&pod, 47001, 1, 9441);
    let mut first = String::new();
    BufReader::new(daemon.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with('{'), "{first}");
    drop(daemon.stderr.take());

    udp_flows_from_pod(&pod, 47002, 3, 9442);
    // Three attempts from fresh source ports: one record counting them.
    let attempts = || {
        let (_, body) = curl(&node, &["http://127.0.0.1:9963/v1/flows?verdict=dropped&port=9442"]);
        let list = serde_json::from_str::<serde_json::Value>(&body).ok()?;
        list["flows"].as_array()?.iter().map(|f| f["attempts"].as_u64().unwrap_or(1)).reduce(|a, b| a + b)
    };
    assert!(
        wait_until(Duration::from_secs(20), || attempts() == Some(3)),
        "records go on after the outputs closed: {:?}",
        attempts()
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon still runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "a clean exit, not a panic: {status}");
}
