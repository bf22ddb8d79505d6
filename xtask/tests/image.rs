//! The image as shipped, run by podman with exactly what the DaemonSet gives its pod (user,
//! capabilities, read-only root, no privilege escalation, memory limit, host paths, seccomp
//! profile) in the lab's node network namespace: it loads its programs and records the blocked
//! flow, which the CLI then reads from its API. `cargo xtask image` builds the image first; CI
//! runs these tests in their own stage (`scripts/ci --stage image`).

mod image {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use serde_json::Value;
    use xtask::image::{PODMAN, Seccomp, Shipped, shipped};
    use xtask::lab::{self, Lab, ProbeKind};

    fn podman(args: &[&str]) -> std::process::Output {
        Command::new("podman").args(PODMAN).args(args).output().expect("podman runs (scripts/setup --image)")
    }

    /// A container removed when dropped, also when the test fails.
    struct Container(String);

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = podman(&["rm", "--force", "--time", "5", &self.0]);
        }
    }

    impl Container {
        fn logs(&self) -> String {
            let out = podman(&["logs", &self.0]);
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        }

        fn running(&self) -> bool {
            let out = podman(&["inspect", "--format", "{{.State.Running}}", &self.0]);
            String::from_utf8_lossy(&out.stdout).trim() == "true"
        }

        /// The container's process's effective capabilities, from /proc.
        fn effective_capabilities(&self) -> String {
            let out = podman(&["inspect", "--format", "{{.State.Pid}}", &self.0]);
            let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or_default().trim().to_owned()
        }
    }

    fn image_present(shipped: &Shipped) {
        let out = podman(&["image", "exists", &shipped.image]);
        assert!(out.status.success(), "no image {}: `cargo xtask image` builds it", shipped.image);
    }

    /// `netiso run` in the shipped container, observing the lab's node with the lab's manifests
    /// as its inventory (the lab has no API server), its state in `state`.
    fn start(lab: &Lab, shipped: &Shipped, seccomp: &Seccomp, state: &Path) -> Container {
        let name = lab::unique_id("ni-image");
        let mut args: Vec<String> = ["run", "--detach", "--name", &name].map(str::to_owned).to_vec();
        // podman's default limits exceed what a container without CAP_SYS_RESOURCE may set here;
        // a kubelet's containers inherit the runtime's own.
        args.extend(["--ulimit=nofile=20000:20000", "--ulimit=nproc=4096:4096"].map(str::to_owned));
        args.extend(shipped.podman_run_args(&lab.node_ns(), seccomp, &[("/var/lib/netiso", state)]).unwrap());
        let manifests = lab.manifests_path();
        let lab_dir = manifests.parent().unwrap();
        args.push(format!("--volume={}:/etc/netiso-lab:ro", lab_dir.display()));
        args.push(shipped.image.clone());
        args.extend(
            [
                "run",
                "--log-format=json",
                "--manifests=/etc/netiso-lab/cluster.yaml",
                "--node-name=lab",
                "--listen=127.0.0.1:9963",
                "--metrics-listen=127.0.0.1:9962",
                "--store=/var/lib/netiso/evidence.redb",
            ]
            .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&args);
        assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
        Container(name)
    }

    fn wait_for_log(container: &Container, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if container.logs().contains(text) {
                return true;
            }
            if !container.running() {
                return container.logs().contains(text);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    fn state_dir(scratch: &lab::Scratch) -> PathBuf {
        let state = scratch.0.join("state");
        std::fs::create_dir_all(&state).unwrap();
        state
    }

    /// Whether the container recorded the blocked develop/debug -> production/api attempt from
    /// `source_port`, with the policies that isolate production/api; the flows it listed.
    fn recorded_blocked(lab: &Lab, netiso: &Path, source_port: u16) -> (bool, String) {
        let args = [
            "observe",
            "--server",
            "http://127.0.0.1:9963",
            "--verdict",
            "dropped",
            "--from-pod",
            "develop/debug",
            "--to-pod",
            "production/api",
            "-o",
            "json",
        ];
        let out = lab.in_node_output(netiso, &args).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = stdout.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|f| {
            f["source"]["port"] == source_port
                && f["reason"] == "NETFILTER_DROP"
                && f["policy"]["attribution"] == "denied_by_network_policy"
                && f["policy"]["ingress"]["pod"] == "production/api"
        });
        (found, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Under the DaemonSet's profile (Unconfined) and under the confining profile shipped beside
    /// it, the image loads, attaches, and records a blocked flow with its policy.
    #[test]
    fn the_image_records_the_blocked_flow_with_the_daemonsets_privileges() {
        let shipped = shipped().unwrap();
        image_present(&shipped);
        let netiso = xtask::build::netiso(false).expect("netiso builds");
        let confining = Seccomp::File(lab::repo_root().join("deploy/netiso/seccomp/netiso.json"));
        let profiles = [shipped.seccomp().unwrap(), confining];
        assert_eq!(profiles[0], Seccomp::Unconfined, "the DaemonSet's choice, explained in its comment");
        let probes = lab::probes();
        let blocked = probes.iter().find(|p| p.to("develop/debug", "production/api", ProbeKind::Tcp, false)).unwrap();
        for seccomp in profiles {
            let (lab, scratch) = lab::for_test("i", Path::new(env!("CARGO_BIN_EXE_xtask")));
            let _guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
            let container = start(&lab, &shipped, &seccomp, &state_dir(&scratch));
            assert!(
                wait_for_log(&container, "datapath ready", Duration::from_secs(60)),
                "{seccomp:?}: the image did not get ready:\n{}",
                container.logs()
            );
            // BPF, PERFMON, NET_ADMIN and SYSLOG, nothing else.
            assert_eq!(container.effective_capabilities(), "000000c400001000", "{seccomp:?}");

            let mut listed = String::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut recorded = false;
            while !recorded && Instant::now() < deadline {
                let results = lab.traffic_of(vec![*blocked]).unwrap();
                assert_eq!(results[0].observed, results[0].expected, "the lab blocks it");
                (recorded, listed) = recorded_blocked(&lab, &netiso, blocked.source_port);
            }
            assert!(
                recorded,
                "{seccomp:?}: the blocked flow is not in the container's API:\n{listed}\n{}",
                container.logs()
            );
            assert!(container.running(), "{seccomp:?}: {}", container.logs());
        }
    }

    /// A container a killed test left behind is found by its name and removed, so the next run
    /// starts clean.
    #[test]
    fn a_container_left_behind_is_removed_with_the_leftovers() {
        let shipped = shipped().unwrap();
        image_present(&shipped);
        let prefix = lab::unique_id("ni-lo");
        let name = format!("{prefix}-netiso");
        let out = podman(&["create", "--name", &name, &shipped.image]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let _container = Container(name.clone());
        let found = xtask::leftovers::find(&prefix).unwrap();
        assert_eq!(found, [xtask::leftovers::Leftover::Container(name.clone())]);
        xtask::leftovers::remove(&prefix).unwrap();
        assert!(!podman(&["container", "exists", &name]).status.success(), "removed");
    }

    /// Why the DaemonSet chooses its profile: the runtime's default refuses bpf() to a process
    /// without CAP_SYS_ADMIN, and netiso says so instead of starting blind.
    #[test]
    fn the_runtimes_default_seccomp_profile_refuses_bpf() {
        let shipped = shipped().unwrap();
        image_present(&shipped);
        let (lab, scratch) = lab::for_test("j", Path::new(env!("CARGO_BIN_EXE_xtask")));
        let _guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
        let container = start(&lab, &shipped, &Seccomp::RuntimeDefault, &state_dir(&scratch));
        let deadline = Instant::now() + Duration::from_secs(60);
        while container.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
        }
        let logs = container.logs();
        assert!(!container.running() && !logs.contains("datapath ready"), "{logs}");
        assert!(logs.contains("seccomp"), "the error names the likely cause: {logs}");
    }
}
