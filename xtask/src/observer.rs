//! Runs `netiso run` inside the lab's node namespace and collects what it reports.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct Observer {
    child: Child,
    records: Arc<Mutex<Vec<serde_json::Value>>>,
    diagnostics: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Observer {
    /// Starts `netiso run --log-format json --store STORE` in `netns` and waits until its
    /// programs are attached.
    pub fn start(netiso: &Path, netns: &str, store: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(netiso, netns, store, extra_args, None)
    }

    /// As [`Observer::start`], with the daemon pinned to one CPU (for benchmarks).
    pub fn start_on(
        netiso: &Path,
        netns: &str,
        store: &Path,
        extra_args: &[&str],
        cpu: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]);
        if let Some(cpu) = cpu {
            command.args(["taskset", "-c", &cpu.to_string()]);
        }
        let mut child = command
            .arg(netiso)
            .args(["run", "--log-format", "json", "--store"])
            .arg(store)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting netiso run")?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let diagnostics = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out = records.clone();
        let err = diagnostics.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str(&line) {
                        out.lock().expect("records").push(v);
                    }
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    err.lock().expect("diagnostics").push(line);
                }
            }),
        ];
        let mut observer = Observer { child, records, diagnostics, readers };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if observer.diagnostics().iter().any(|l| l.contains("datapath ready")) {
                return Ok(observer);
            }
            if let Some(status) = observer.child.try_wait()? {
                observer.join_readers();
                bail!("netiso run exited ({status}) before it was ready:\n{}", observer.diagnostics().join("\n"));
            }
            if Instant::now() > deadline {
                let _ = observer.child.kill();
                let _ = observer.child.wait();
                observer.join_readers();
                bail!("netiso run was not ready after 20 s:\n{}", observer.diagnostics().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        self.records.lock().expect("records").clone()
    }

    pub fn diagnostics(&self) -> Vec<String> {
        self.diagnostics.lock().expect("diagnostics").clone()
    }

    /// Waits until `predicate` holds for the records so far, or the timeout passes.
    pub fn wait_for(&self, timeout: Duration, predicate: impl Fn(&[serde_json::Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if predicate(&self.records()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        predicate(&self.records())
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status. Records and diagnostics
    /// stay readable afterwards.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).context("signalling netiso")?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("netiso did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.join_readers();
        Ok(status)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A test that fails midway must not leave netiso running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
