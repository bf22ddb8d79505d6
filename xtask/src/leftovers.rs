//! What a killed run (a CI timeout, a crashed test harness, an interrupted lab) leaves behind,
//! found by the project's name prefix and removed so that it never breaks the next run.
//!
//! Every network namespace of the lab, the tests and the benchmark is named `ni-...`. Removing one
//! kills the processes still running in it first (an orphaned `netiso run` holds TCX links and
//! programs; a lab's servers hold sockets), which releases their attachments. In the machine's own
//! namespace, links and pins under /sys/fs/bpf carry the prefix, nft tables the prefix with `_`,
//! and clsact filters of netiso's tc programs are found by program name: unlike TCX links they
//! outlive the process that attached them. podman containers of the image tests carry the prefix
//! too, and go first.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::programs::SchedClassifier;
use aya::programs::tc::{self, TcAttachType};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{netns, sh};

/// The prefix of every network namespace, link and pin the project creates.
pub const PREFIX: &str = "ni-";

/// The prefix of netiso's tc program names.
const PROGRAM_PREFIX: &str = "netiso_";

const BPFFS: &str = "/sys/fs/bpf";

/// One thing left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftover {
    Container(String),
    Namespace(String),
    Process {
        namespace: String,
        pid: i32,
        command: String,
    },
    /// A tc program on an interface: in a leftover namespace (`namespace` is set) or in the
    /// machine's own namespace.
    TcProgram {
        namespace: Option<String>,
        interface: String,
        hook: Hook,
        program: String,
        id: u32,
    },
    Link(String),
    NftTable {
        family: String,
        name: String,
    },
    Pin(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Tcx(TcDirection),
    Clsact(TcDirection),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

impl TcDirection {
    const BOTH: [TcDirection; 2] = [TcDirection::Ingress, TcDirection::Egress];

    fn attach_type(self) -> TcAttachType {
        match self {
            TcDirection::Ingress => TcAttachType::Ingress,
            TcDirection::Egress => TcAttachType::Egress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TcDirection::Ingress => "ingress",
            TcDirection::Egress => "egress",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Tcx(d) => write!(f, "TCX {}", d.name()),
            Hook::Clsact(d) => write!(f, "clsact {}", d.name()),
        }
    }
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Container(name) => write!(f, "podman container {name}"),
            Leftover::Namespace(name) => write!(f, "network namespace {name}"),
            Leftover::Process { namespace, pid, command } => write!(f, "process {pid} ({command}) in {namespace}"),
            Leftover::TcProgram { namespace, interface, hook, program, id } => {
                let place = namespace.as_deref().unwrap_or("the host namespace");
                write!(f, "{hook} program {program} (id {id}) on {interface} in {place}")
            }
            Leftover::Link(name) => write!(f, "link {name} in the host namespace"),
            Leftover::NftTable { family, name } => write!(f, "nft table {family} {name} in the host namespace"),
            Leftover::Pin(path) => write!(f, "pinned BPF object {}", path.display()),
        }
    }
}

/// Everything carrying `prefix` (for the whole project, [`PREFIX`]) on this machine.
pub fn find(prefix: &str) -> anyhow::Result<Vec<Leftover>> {
    let mut found: Vec<Leftover> = containers(prefix).into_iter().map(Leftover::Container).collect();
    for namespace in sh::netns_list()?.into_iter().filter(|n| n.starts_with(prefix)) {
        found.push(Leftover::Namespace(namespace.clone()));
        for pid in sh::netns_pids(&namespace) {
            let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned();
            found.push(Leftover::Process { namespace: namespace.clone(), pid, command });
        }
        found.extend(tc_programs(Some(&namespace))?);
    }
    found.extend(tc_programs(None)?);
    found.extend(host_links(prefix)?.into_iter().map(Leftover::Link));
    found.extend(nft_tables(&prefix.replace('-', "_"))?);
    found.extend(pins(Path::new(BPFFS), prefix)?.into_iter().map(Leftover::Pin));
    Ok(found)
}

/// Removes everything [`find`] finds and returns it.
pub fn remove(prefix: &str) -> anyhow::Result<Vec<Leftover>> {
    let found = find(prefix)?;
    for item in &found {
        match item {
            Leftover::Container(name) => {
                sh::run("podman", &[&crate::image::PODMAN[..], &["rm", "--force", "--time", "5", name]].concat())
                    .map(drop)?;
            }
            Leftover::Namespace(name) => {
                stop_processes(&found, name);
                sh::delete_netns(name).with_context(|| format!("removing network namespace {name}"))?;
            }
            Leftover::TcProgram { namespace: None, interface, hook: Hook::Clsact(direction), program, .. } => {
                let name = std::ffi::CString::new(interface.as_str())?;
                tc::qdisc_detach_program(name.as_c_str(), direction.attach_type().into(), program)
                    .with_context(|| format!("detaching {program} from {interface}"))?;
            }
            Leftover::Link(name) => sh::ip(&["link", "delete", name])?,
            Leftover::NftTable { family, name } => {
                sh::run("nft", &["delete", "table", family, name]).map(drop)?;
            }
            Leftover::Pin(path) => {
                let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
            // Processes and the attachments inside a namespace go with the namespace.
            Leftover::Process { .. } | Leftover::TcProgram { .. } => {}
        }
    }
    Ok(found)
}

/// Names of podman containers starting with `prefix`; none where podman is not installed.
fn containers(prefix: &str) -> Vec<String> {
    let filter = format!("name=^{prefix}");
    let args = [&crate::image::PODMAN[..], &["ps", "--all", "--filter", &filter, "--format", "{{.Names}}"]].concat();
    match std::process::Command::new("podman").args(args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Asks the namespace's processes to stop (a daemon detaches cleanly on SIGTERM) and kills
/// those still running after a grace period.
fn stop_processes(found: &[Leftover], namespace: &str) {
    let pids: Vec<Pid> = found
        .iter()
        .filter_map(|item| match item {
            Leftover::Process { namespace: ns, pid, .. } if ns == namespace => Some(Pid::from_raw(*pid)),
            _ => None,
        })
        .collect();
    for &pid in &pids {
        // A process that exited meanwhile gets ESRCH, which is fine.
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&pid| running(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub fn running(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// netiso's tc programs on the interfaces of a leftover namespace, or clsact filters in the host
/// namespace (`namespace` None): a TCX link there belongs to a process that still runs.
fn tc_programs(namespace: Option<&str>) -> anyhow::Result<Vec<Leftover>> {
    let interfaces = match namespace {
        Some(ns) => netns::run_in(ns, interfaces)??,
        None => interfaces()?,
    };
    let mut found = Vec::new();
    let mut push = |interface: &str, hook, program, id| {
        let (namespace, interface) = (namespace.map(str::to_owned), interface.to_owned());
        found.push(Leftover::TcProgram { namespace, interface, hook, program, id });
    };
    for (index, interface) in interfaces {
        if let Some(ns) = namespace {
            for (direction, program, id) in netns::run_in(ns, move || tcx_programs(index))? {
                push(&interface, Hook::Tcx(direction), program, id);
            }
        }
        for direction in TcDirection::BOTH {
            for (program, id) in clsact_programs(namespace, &interface, direction)? {
                push(&interface, Hook::Clsact(direction), program, id);
            }
        }
    }
    Ok(found)
}

fn interfaces() -> anyhow::Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().context("listing network interfaces")?;
    Ok(list.iter().map(|i| (i.index(), i.name().to_string_lossy().into_owned())).collect())
}

/// netiso's programs on the TCX hooks of interface `index` (a kernel without TCX has none).
fn tcx_programs(index: u32) -> Vec<(TcDirection, String, u32)> {
    let mut found = Vec::new();
    for direction in TcDirection::BOTH {
        let Ok((_, programs)) = SchedClassifier::query_tcx(index, direction.attach_type()) else {
            continue;
        };
        for program in programs {
            if let Some(name) = program.name_as_str().filter(|n| n.starts_with(PROGRAM_PREFIX)) {
                found.push((direction, name.to_owned(), program.id()));
            }
        }
    }
    found
}

/// netiso's programs among the clsact filters of `interface`, from `tc filter show`, whose
/// lines read `filter protocol all pref 1 bpf chain 0 handle 0x1 NAME direct-action ... id N ...`.
fn clsact_programs(
    namespace: Option<&str>,
    interface: &str,
    direction: TcDirection,
) -> anyhow::Result<Vec<(String, u32)>> {
    let mut args = Vec::new();
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    args.extend(["filter", "show", "dev", interface, direction.name()]);
    // An interface without a clsact qdisc has no filters to show, and says so with an error.
    let Ok(out) = sh::run("tc", &args) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = words.iter().find(|w| w.starts_with(PROGRAM_PREFIX)) else {
            continue;
        };
        let id = words.windows(2).find(|w| w[0] == "id").and_then(|w| w[1].parse().ok()).unwrap_or(0);
        found.push(((*name).to_owned(), id));
    }
    Ok(found)
}

/// Links of the host namespace named with `prefix` (a veth's `@peer` suffix removed).
fn host_links(prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = sh::run("ip", &["-o", "link", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// nft tables of the host namespace whose name starts with `prefix`.
fn nft_tables(prefix: &str) -> anyhow::Result<Vec<Leftover>> {
    let out = sh::run("nft", &["list", "tables"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["table", family, name] if name.starts_with(prefix) => {
                Some(Leftover::NftTable { family: family.to_owned(), name: name.to_owned() })
            }
            _ => None,
        })
        .collect())
}

/// Entries of a BPF filesystem named with `prefix` (none when it is not mounted).
fn pins(bpffs: &Path, prefix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(bpffs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", bpffs.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}
