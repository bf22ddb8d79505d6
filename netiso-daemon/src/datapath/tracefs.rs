//! Finds (and if needed mounts) tracefs, and checks the kfree_skb tracepoint's layout.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}); mount it with `mount -t tracefs nodev /sys/kernel/tracing` (in Kubernetes, mount the host's /sys/kernel/tracing)"
    )]
    NotMounted(std::io::Error),
    #[error("the tracepoint {0} does not exist on this kernel: netiso needs Linux >= 5.17 with the skb tracepoints")]
    MissingTracepoint(String),
    #[error(
        "the kfree_skb tracepoint has no field `{field}` at offset {expected} (format: {path}); this kernel's layout is not supported"
    )]
    Layout { field: &'static str, expected: usize, path: String },
}

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn mounted() -> Option<PathBuf> {
    CANDIDATES.iter().map(Path::new).find(|p| p.join("events").is_dir()).map(Path::to_path_buf)
}

/// The tracefs root, mounting tracefs at /sys/kernel/tracing when no mount is found.
pub fn root() -> Result<PathBuf, TracefsError> {
    if let Some(path) = mounted() {
        return Ok(path);
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", CANDIDATES[0]])
        .status()
        .map_err(TracefsError::NotMounted)?;
    if !status.success() {
        return Err(TracefsError::NotMounted(std::io::Error::other(format!("mount exited with {status}"))));
    }
    mounted().ok_or_else(|| TracefsError::NotMounted(std::io::Error::other("no events directory after mount")))
}

pub fn format_path(category: &str, name: &str) -> Result<String, TracefsError> {
    let path = root()?.join("events").join(category).join(name).join("format");
    if !path.exists() {
        return Err(TracefsError::MissingTracepoint(format!("{category}/{name}")));
    }
    Ok(path.display().to_string())
}

/// Checks that the kfree_skb fields the program reads sit where it reads them.
pub fn check_kfree_skb_layout(format: &str, path: &str) -> Result<(), TracefsError> {
    for (field, expected) in [("skbaddr", 8), ("location", 16), ("protocol", 32), ("reason", 36)] {
        let found = format.lines().any(|line| {
            let declares = line.split(';').next().is_some_and(|decl| {
                decl.trim_end().ends_with(&format!(" {field}")) || decl.trim_end().ends_with(&format!("*{field}"))
            });
            declares && line.contains(&format!("offset:{expected};"))
        });
        if !found {
            return Err(TracefsError::Layout { field, expected, path: path.to_owned() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_kfree_skb_matches_the_program() {
        let path = format_path("skb", "kfree_skb").unwrap();
        let format = std::fs::read_to_string(&path).unwrap();
        check_kfree_skb_layout(&format, &path).unwrap();
    }

    #[test]
    fn an_old_layout_without_reason_is_refused() {
        let old = "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n";
        let err = check_kfree_skb_layout(old, "old").unwrap_err();
        assert!(matches!(err, TracefsError::Layout { field: "protocol", .. }), "{err}");
    }
}
