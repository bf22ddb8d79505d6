//! Running the system tools the lab is made of (ip, nft), with their stderr in every error.

use std::process::{Command, Output};

use anyhow::{Context, bail};

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? run scripts/setup)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// `ip` with the given arguments.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(drop)
}

/// Names of the network namespaces on this machine.
pub fn netns_list() -> anyhow::Result<Vec<String>> {
    let out = run("ip", &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// PIDs of the processes running in a network namespace.
pub fn netns_pids(name: &str) -> Vec<i32> {
    run("ip", &["netns", "pids", name])
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in network namespace `name` and deletes it (with its links and nft
/// tables). A process still exiting can hold the namespace briefly, so deletion is retried.
pub fn delete_netns(name: &str) -> anyhow::Result<()> {
    for pid in netns_pids(name) {
        // A pid that exited meanwhile gets ESRCH, which is fine.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let mut last = Ok(());
    for _ in 0..20 {
        last = ip(&["netns", "delete", name]);
        if last.is_ok() || !netns_list()?.iter().any(|n| n == name) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    last
}
