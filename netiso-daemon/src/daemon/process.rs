//! `netiso run` as a child process inside a network namespace, with its records (stdout) and
//! diagnostics (stderr) collected: how the lab, the benchmarks and the integration tests that need
//! a process of its own (signals, restarts, limits) start the daemon.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a start may take until the programs are attached, and a stop after SIGTERM (writing
/// what it holds and detaching): generous, as the datapath suite also runs in VMs of other kernels
/// on a shared machine, several times slower than the host.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Process {
    child: Child,
    records: Arc<Mutex<Vec<serde_json::Value>>>,
    diagnostics: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts `NETISO run --log-format json --store STORE ARGS` in `netns` and waits until its
    /// programs are attached.
    pub fn start(netiso: &Path, netns: &str, store: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on_cpu(netiso, netns, store, args, None)
    }

    /// As [`Process::start`], pinned to one CPU when given (for benchmarks).
    pub fn start_on_cpu(
        netiso: &Path,
        netns: &str,
        store: &Path,
        args: &[&str],
        cpu: Option<usize>,
    ) -> anyhow::Result<Self> {
        Self::start_with(netiso, netns, store, args, cpu, &[])
    }

    /// As [`Process::start_on_cpu`], with these environment variables set (`NETISO_LOG`).
    pub fn start_with(
        netiso: &Path,
        netns: &str,
        store: &Path,
        args: &[&str],
        cpu: Option<usize>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("ip");
        command.envs(env.iter().copied());
        command.args(["netns", "exec", netns]);
        if let Some(cpu) = cpu {
            command.args(["taskset", "-c", &cpu.to_string()]);
        }
        let mut child = command
            .arg(netiso)
            .args(["run", "--log-format", "json", "--store"])
            .arg(store)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting netiso run")?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let diagnostics = Arc::new(Mutex::new(Vec::new()));
        let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let (out, err) = (records.clone(), diagnostics.clone());
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    match serde_json::from_str(&line) {
                        Ok(record) => out.lock().expect("records").push(record),
                        Err(e) => panic!("netiso printed a record that is not JSON ({e}): {line}"),
                    }
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    err.lock().expect("diagnostics").push(line);
                }
            }),
        ];
        let mut process = Process { child, records, diagnostics, readers };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if process.logged("datapath ready") {
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                process.join_readers();
                bail!("netiso run exited ({status}) before it was ready:\n{}", process.diagnostics().join("\n"));
            }
            if Instant::now() > deadline {
                process.kill();
                bail!("netiso run was not ready after {START_TIMEOUT:?}:\n{}", process.diagnostics().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// netiso's process id (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The records printed so far, one JSON value per line.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.records.lock().expect("records").clone()
    }

    /// The diagnostic lines logged so far.
    pub fn diagnostics(&self) -> Vec<String> {
        self.diagnostics.lock().expect("diagnostics").clone()
    }

    fn logged(&self, text: &str) -> bool {
        self.diagnostics.lock().expect("diagnostics").iter().any(|l| l.contains(text))
    }

    /// Waits until `predicate` holds for the records so far, or the timeout passes.
    pub fn wait_for(&self, timeout: Duration, predicate: impl Fn(&[serde_json::Value]) -> bool) -> bool {
        poll(timeout, || predicate(&self.records.lock().expect("records")))
    }

    /// Waits until a diagnostic line contains `text`, or the timeout passes.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> bool {
        poll(timeout, || self.logged(text))
    }

    /// SIGKILL, as the OOM killer or a node's crash would: no chance to detach anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
    }

    /// SIGTERM, then a clean exit within 15 s; returns the final log line (the datapath's totals).
    /// Records and diagnostics stay readable afterwards.
    pub fn stop(&mut self) -> anyhow::Result<serde_json::Value> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).context("signalling netiso")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("netiso did not stop within {STOP_TIMEOUT:?} of SIGTERM:\n{}", self.diagnostics().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.join_readers();
        let diagnostics = self.diagnostics();
        if !status.success() {
            bail!("netiso exited with {status}:\n{}", diagnostics.join("\n"));
        }
        let last = diagnostics
            .iter()
            .rev()
            .find(|l| l.contains("stopped; all programs detached"))
            .with_context(|| format!("netiso logged no final line:\n{}", diagnostics.join("\n")))?;
        serde_json::from_str(last).with_context(|| format!("the final line is not JSON: {last}"))
    }

    /// Waits for both pipes to close, so that everything printed is collected.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Checks `condition` every 50 ms until it holds or `timeout` passes; once more at the end.
fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

impl Drop for Process {
    fn drop(&mut self) {
        // A test or lab that fails midway must not leave netiso running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
