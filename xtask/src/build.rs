//! Builds the `netiso` binary and tells where it is.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Builds `netiso` (debug, or release with `release`) and returns its path.
pub fn netiso(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--package", "netiso-daemon", "--bin", "netiso", "--message-format=json"]);
    if release {
        cmd.arg("--release");
    }
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
    let out = cmd.output().context("running cargo build")?;
    if !out.status.success() {
        bail!("building netiso failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "netiso"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build did not report the netiso executable")
}
