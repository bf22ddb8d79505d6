//! The datapath suite on the kernels clusters run: Debian's 5.10, 6.1 and 6.12 kernels booted
//! under QEMU by virtme-ng, with the host's files visible, running test binaries built on the
//! host. `scripts/setup --vm` installs QEMU, virtme-ng and the kernels.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::build;

/// Where `scripts/setup --vm` unpacks the kernels, one directory per release holding `boot/`
/// and `lib/modules/` as the Debian package lays them out. Not under /var/cache: the guest
/// mounts a fresh tmpfs there and would not find the modules.
pub const KERNELS_DIR: &str = "/opt/netiso-vm/kernels";

/// The kernel series the suite runs on (the host kernel runs the whole suite directly).
pub const SERIES: [&str; 3] = ["5.10", "6.1", "6.12"];

/// Test binaries run in the VMs: package, integration test, and the series it runs on. The whole
/// lab (`lab_datapath`, two minutes a kernel under QEMU without KVM) runs on the older kernels,
/// whose verifier and drop sites differ; 6.12 is near the host's own, which runs it directly.
const SUITE: [(&str, &str, &[&str]); 3] = [
    ("netiso-daemon", "datapath", &SERIES),
    ("netiso-daemon", "drop_totals", &SERIES),
    ("xtask", "lab_datapath", &["5.10", "6.1"]),
];

pub struct Kernel {
    pub release: String,
    pub image: PathBuf,
}

/// The unpacked kernel of `series` ("6.1" matches 6.1.0-50-amd64, not 6.12.x).
pub fn find_kernel(series: &str) -> anyhow::Result<Kernel> {
    let missing =
        || format!("no Linux {series} kernel in {KERNELS_DIR}: install the kernels with `scripts/setup --vm`");
    let entries = std::fs::read_dir(KERNELS_DIR).with_context(missing)?;
    let mut releases: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|release| in_series(release, series))
        .collect();
    releases.sort();
    let release = releases.pop().with_context(missing)?;
    let image = Path::new(KERNELS_DIR).join(&release).join("boot").join(format!("vmlinuz-{release}"));
    if !image.exists() {
        bail!("{} is missing: reinstall the kernels with `scripts/setup --vm`", image.display());
    }
    Ok(Kernel { release, image })
}

/// Whether kernel `release` belongs to `series`.
fn in_series(release: &str, series: &str) -> bool {
    release.strip_prefix(series).is_some_and(|rest| rest.starts_with(['.', '-', '+']))
}

pub struct Outcome {
    pub series: String,
    pub release: String,
    pub passed: bool,
    pub elapsed: Duration,
}

/// Builds netiso and the suite's test binaries, then runs them in one VM per kernel series, each
/// within `timeout`. The guests' output goes to this process's stdout and stderr.
pub fn run(series: &[String], timeout: Duration) -> anyhow::Result<Vec<Outcome>> {
    let kernels = series.iter().map(|s| find_kernel(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let netiso = build::netiso(false)?;
    let mut steps = Vec::new();
    for (package, test, on) in SUITE {
        let binary = build::test_binary(package, test)?;
        let dir = crate::lab::repo_root().join(package);
        let step = format!(
            "; cd {}; echo 'vm: running {package} --test {test}'; {}={} {} --test-threads=1",
            quote(&dir),
            build::PREBUILT_NETISO,
            quote(&netiso),
            quote(&binary)
        );
        steps.push((on, step));
    }
    let mut outcomes = Vec::new();
    for (series, kernel) in series.iter().zip(kernels) {
        let script: String = std::iter::once("set -e")
            .chain(steps.iter().filter(|(on, _)| on.contains(&series.as_str())).map(|(_, step)| step.as_str()))
            .collect();
        println!("vm: booting Linux {series} ({})", kernel.release);
        let start = Instant::now();
        let mut boot = boot(&kernel, &script, timeout)?;
        // A guest that ends before running anything did not boot (qemu or vng failed to start,
        // seen once in some dozens of boots): that says nothing of netiso, so it boots again once.
        if !boot.started && !boot.status.success() {
            println!("vm: Linux {series} ended before running the suite ({}); booting it again", boot.status);
            boot = self::boot(&kernel, &script, timeout)?;
        }
        let elapsed = start.elapsed();
        if boot.status.code() == Some(124) {
            println!("vm: Linux {series} did not finish within {} s", timeout.as_secs());
        } else if !boot.status.success() {
            println!("vm: Linux {series} ended with {}", boot.status);
        }
        outcomes.push(Outcome {
            series: series.clone(),
            release: kernel.release,
            passed: boot.status.success(),
            elapsed,
        });
    }
    Ok(outcomes)
}

/// How one boot of a guest ended.
struct Boot {
    status: std::process::ExitStatus,
    /// The guest ran the suite's first step.
    started: bool,
}

/// Runs `script` in a guest of `kernel`, within `timeout`, its output copied to this process's.
fn boot(kernel: &Kernel, script: &str, timeout: Duration) -> anyhow::Result<Boot> {
    let mut vm = Command::new("timeout")
        .args(["--kill-after=10", &timeout.as_secs().to_string(), "vng", "--disable-kvm", "--rw", "--run"])
        .arg(&kernel.image)
        .args(["--memory", "2G", "--cpus", "2", "--"])
        .arg(script)
        // vng saves the terminal's settings and fails without a standard input.
        .stdin(Stdio::null())
        // Through pipes: given a file as its output, the guest opens that path itself (it sees
        // the host's files) and truncates what was written before.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running vng (install it with `scripts/setup --vm`)")?;
    let started = Arc::new(AtomicBool::new(false));
    let copies = [
        copy_lines(vm.stdout.take().expect("piped"), std::io::stdout, Some(started.clone())),
        copy_lines(vm.stderr.take().expect("piped"), std::io::stderr, None),
    ];
    let status = vm.wait().context("waiting for vng")?;
    for copy in copies {
        let _ = copy.join();
    }
    Ok(Boot { status, started: started.load(Ordering::Relaxed) })
}

/// Copies `from` to an output of this process, line by line as the guest writes them; sets
/// `started` at the suite's first step.
fn copy_lines<W: std::io::Write + 'static>(
    from: impl std::io::Read + Send + 'static,
    to: fn() -> W,
    started: Option<Arc<AtomicBool>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if let Some(started) = &started
                && line.starts_with("vm: running ")
            {
                started.store(true, Ordering::Relaxed);
            }
            let _ = writeln!(to(), "{line}");
        }
    })
}

/// `path` quoted for the guest's shell.
fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_never_boots_is_told_from_a_failed_suite() {
        let kernel = Kernel { release: "0.0".into(), image: PathBuf::from("/nonexistent/vmlinuz") };
        let boot = boot(&kernel, "echo 'vm: running nothing'", Duration::from_secs(60)).unwrap();
        assert!(!boot.status.success() && !boot.started, "{}", boot.status);
    }

    #[test]
    fn releases_belong_to_their_series_only() {
        assert!(in_series("6.1.0-50-amd64", "6.1"));
        assert!(!in_series("6.12.95+deb12-amd64", "6.1"));
        assert!(in_series("6.12.95+deb12-amd64", "6.12"));
        assert!(in_series("5.10.0-32-amd64", "5.10"));
        assert!(!in_series("5.1.0-1-amd64", "5.10"));
    }

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
