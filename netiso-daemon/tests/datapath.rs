//! `netiso run` on real packets in network namespaces of its own: interfaces are followed as they
//! come and go, and a full map loses nothing silently.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces, removed on drop (also when the test fails).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

struct Daemon {
    child: Child,
    stdout: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(netns: &str, store: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, env!("CARGO_BIN_EXE_netiso"), "run", "--log-format", "json", "--store"])
            .arg(store)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (out, err) = (stdout.clone(), stderr.clone());
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                out.lock().unwrap().push(serde_json::from_str(&line).expect("stdout is JSON lines"));
            }
        });
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                err.lock().unwrap().push(line);
            }
        });
        let daemon = Daemon { child, stdout, stderr };
        assert!(daemon.wait_log("datapath ready"), "not ready: {:?}", daemon.stderr.lock().unwrap());
        daemon
    }

    fn wait_log(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().iter().any(|l| l.contains(text)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn stop(&mut self) -> serde_json::Value {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit {status}: {:?}", self.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap();
        let last = stderr.iter().rev().find(|l| l.contains("stopped")).expect("final log line");
        serde_json::from_str(last).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn interfaces_are_followed_and_a_full_map_loses_nothing_silently() {
    let tag = format!("nd{}", std::process::id());
    let (node, pod) = (format!("{tag}-node"), format!("{tag}-pod"));
    ip(&["netns", "add", &node]);
    let _cleanup = Namespaces(vec![node.clone(), pod.clone()]);
    ip(&["netns", "add", &pod]);
    ip(&["-n", &node, "link", "set", "lo", "up"]);
    let store = std::env::temp_dir().join(format!("{tag}.redb"));
    let mut daemon = Daemon::start(&node, &store, &["--flow-map-entries", "4", "--drain-interval", "200ms"]);

    // A pod interface appears after netiso started.
    ip(&["-n", &node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod]);
    ip(&["-n", &node, "addr", "add", "10.77.0.1/24", "dev", "vpod"]);
    ip(&["-n", &node, "link", "set", "vpod", "up"]);
    ip(&["-n", &pod, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    assert!(daemon.wait_log("observing interface"), "vpod was not attached: {:?}", daemon.stderr.lock().unwrap());

    // Eight flows from the pod, more than the flow map holds.
    let sender = Command::new("ip")
        .args(["netns", "exec", &pod, "sh", "-c"])
        .arg("for p in 1 2 3 4 5 6 7 8; do echo x | nc -u -w0 -p 4000$p 10.77.0.1 9$p; done")
        .status()
        .unwrap();
    assert!(sender.success());
    std::thread::sleep(Duration::from_millis(800));

    ip(&["-n", &node, "link", "delete", "vpod"]);
    assert!(daemon.wait_log("interface gone; detached"));
    let stats = daemon.stop();
    let records = daemon.stdout.lock().unwrap().clone();

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
    let _ = std::fs::remove_file(&store);
}
