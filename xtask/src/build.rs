//! Builds the `netiso` binary and test binaries, and tells where they are.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Names a `netiso` binary built beforehand, used instead of building one: set inside the VMs of
/// `cargo xtask vm`, where no cargo runs.
pub const PREBUILT_NETISO: &str = "NETISO_BIN";

/// Builds `netiso` (debug, or release with `release`) and returns its path.
pub fn netiso(release: bool) -> anyhow::Result<PathBuf> {
    if let Some(prebuilt) = std::env::var_os(PREBUILT_NETISO) {
        return Ok(PathBuf::from(prebuilt));
    }
    let mut args = vec!["build", "--package", "netiso-daemon", "--bin", "netiso"];
    if release {
        args.push("--release");
    }
    executable(&args, "netiso")
}

/// Builds integration test `test` of `package` without running it and returns its path.
pub fn test_binary(package: &str, test: &str) -> anyhow::Result<PathBuf> {
    executable(&["test", "--no-run", "--package", package, "--test", test], test)
}

/// Runs `cargo ARGS` and returns the executable it reports for target `target`.
pub fn executable(args: &[&str], target: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).args(["--quiet", "--message-format=json"]);
    // Run from a test, this process carries the test crate's package variables; build scripts
    // that watch them (ring's) would then rebuild here and again in the next plain `cargo` run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|p| name.starts_with(p))
            || name == "OUT_DIR"
        {
            cmd.env_remove(name.as_ref());
        }
    }
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        // With --message-format=json the compiler's diagnostics are on stdout, as JSON.
        let diagnostics: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-message")
            .filter_map(|msg| msg["message"]["rendered"].as_str().map(str::to_owned))
            .collect();
        bail!("`cargo {}` failed:\n{diagnostics}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == target
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("`cargo {}` did not report the {target} executable", args.join(" "))
}
