//! What a killed run leaves behind is found and removed: a network namespace with its daemon
//! still running, holding TCX attachments, as when a test harness or CI is killed mid-test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use xtask::lab;
use xtask::leftovers::{self, Hook, Leftover, TcDirection};

fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes what carries `prefix` when the test ends, also when it fails.
struct Removal(String);

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = leftovers::remove(&self.0);
    }
}

fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs().filter_map(Result::ok).any(|p| p.id() == id)
}

#[test]
fn a_killed_runs_namespace_daemon_and_tcx_attachments_are_found_and_removed() {
    let prefix = format!("{}{}", leftovers::PREFIX, lab::unique_id("k"));
    let namespace = format!("{prefix}-node");
    let _removal = Removal(prefix.clone());
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    let store = std::env::temp_dir().join(format!("{prefix}.redb"));

    xtask::sh::ip(&["netns", "add", &namespace]).unwrap();
    xtask::sh::ip(&["-n", &namespace, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0"]).unwrap();
    xtask::sh::ip(&["-n", &namespace, "link", "set", "vpod", "up"]).unwrap();
    // A daemon this test does not own, as a killed harness leaves it: `setsid --fork` detaches it.
    let started = Command::new("setsid")
        .args(["--fork", "ip", "netns", "exec", &namespace])
        .arg(&netiso)
        .arg("run")
        .arg("--store")
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("setsid runs");
    assert!(started.success());

    let found = wait_for("the orphaned daemon's TCX attachments", Duration::from_secs(60), || {
        let found = leftovers::find(&prefix).unwrap();
        let tcx = found.iter().filter(|f| matches!(f, Leftover::TcProgram { hook: Hook::Tcx(_), .. })).count();
        (tcx >= 2).then_some(found)
    });
    assert_eq!(found[0], Leftover::Namespace(namespace.clone()), "{found:#?}");
    let daemon = found
        .iter()
        .find_map(|f| match f {
            Leftover::Process { namespace: ns, pid, command } if ns == &namespace && command == "netiso" => Some(*pid),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the daemon is found: {found:#?}"));
    let mut program_ids = Vec::new();
    for (direction, program) in [(TcDirection::Ingress, "netiso_from_pod"), (TcDirection::Egress, "netiso_to_pod")] {
        let id = found
            .iter()
            .find_map(|f| match f {
                Leftover::TcProgram { namespace: Some(ns), interface, hook, program: p, id }
                    if ns == &namespace && interface == "vpod" && *hook == Hook::Tcx(direction) && p == program =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{program} on vpod's TCX {direction:?} is found: {found:#?}"));
        assert!(program_loaded(id));
        program_ids.push(id);
    }

    let removed = leftovers::remove(&prefix).unwrap();
    assert!(removed.contains(&Leftover::Namespace(namespace.clone())), "{removed:#?}");
    assert!(removed.iter().any(|r| matches!(r, Leftover::Process { pid, .. } if *pid == daemon)), "{removed:#?}");

    assert!(!xtask::sh::netns_list().unwrap().contains(&namespace), "the namespace is gone");
    assert!(!leftovers::running(Pid::from_raw(daemon)), "the daemon is stopped");
    wait_for("the daemon's programs to be unloaded", Duration::from_secs(30), || {
        program_ids.iter().all(|&id| !program_loaded(id)).then_some(())
    });
    assert_eq!(leftovers::find(&prefix).unwrap(), Vec::new(), "nothing is left");
    let _ = std::fs::remove_file(&store);
}
