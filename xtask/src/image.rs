//! netiso's image and the DaemonSet's container run from it: a static (musl) release build of
//! `netiso`, alone in an image `FROM scratch` (Containerfile) built by podman from a context that
//! holds only that binary; and podman arguments that give a container exactly what the shipped
//! DaemonSet gives its pod: the image, user, capabilities, read-only root, privilege escalation,
//! memory limit, host paths and seccomp profile.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::lab::repo_root;
use crate::sh;

/// The static build's target (`scripts/setup --image` installs it and musl-tools).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// podman as this machine runs it: runc, and cgroupfs for this host's cgroup layout.
pub const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

/// Builds the static binary and the image, tagged with the DaemonSet's image reference.
pub fn build() -> anyhow::Result<String> {
    let binary = crate::build::executable(
        &["build", "--release", "--locked", "--package", "netiso-daemon", "--bin", "netiso", "--target", MUSL_TARGET],
        "netiso",
    )?;
    if elf_interpreter(&binary)? {
        bail!("{} is dynamically linked: a FROM scratch image cannot run it", binary.display());
    }
    let context = repo_root().join("target").join("image-context");
    if context.exists() {
        std::fs::remove_dir_all(&context).with_context(|| format!("removing {}", context.display()))?;
    }
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    std::fs::copy(&binary, context.join("netiso")).context("copying netiso into the image context")?;
    std::fs::copy(repo_root().join("Containerfile"), context.join("Containerfile"))
        .context("copying the Containerfile")?;
    let image = shipped()?.image;
    let context = context.to_str().context("the image context's path is not UTF-8")?;
    // The previous build goes first, so that rebuilding leaves no untagged image behind (a
    // container still using it keeps it, and is removed with the leftovers).
    let _ = std::process::Command::new("podman").args(PODMAN).args(["rmi", &image]).output();
    let mut args = PODMAN.to_vec();
    args.extend(["build", "--quiet", "--file", "Containerfile", "--tag", &image, context]);
    sh::run("podman", &args)?;
    Ok(image)
}

/// Whether an ELF file asks for a program interpreter (the dynamic loader).
fn elf_interpreter(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> anyhow::Result<u64> {
        let slice = bytes.get(at..at + len).with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
        Ok(slice.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (table, entry_size, entries) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for index in 0..entries {
        let at = usize::try_from(table + index * entry_size).context("program header offset")?;
        if field(at, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The DaemonSet's pod and container, as shipped in deploy/netiso/base.
pub struct Shipped {
    pub image: String,
    pod: PodSpec,
    container: Container,
}

/// Reads deploy/netiso/base/daemonset.yaml.
pub fn shipped() -> anyhow::Result<Shipped> {
    let path = repo_root().join("deploy/netiso/base/daemonset.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let daemonset: DaemonSet = serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let pod = daemonset.spec.and_then(|s| s.template.spec).context("the DaemonSet has no pod template")?;
    let container = pod.containers.first().cloned().context("the DaemonSet has no container")?;
    let image = container.image.clone().context("the DaemonSet's container names no image")?;
    Ok(Shipped { image, pod, container })
}

/// The seccomp profile `podman run` gets for the shipped one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seccomp {
    /// The runtime's default profile (`RuntimeDefault`, or none given).
    RuntimeDefault,
    Unconfined,
    /// A profile file (`Localhost`, read from deploy/netiso/seccomp).
    File(PathBuf),
}

impl Shipped {
    /// The seccomp profile the container gets: the container's, else the pod's.
    pub fn seccomp(&self) -> anyhow::Result<Seccomp> {
        let profile = self
            .container
            .security_context
            .as_ref()
            .and_then(|c| c.seccomp_profile.clone())
            .or_else(|| self.pod.security_context.as_ref().and_then(|p| p.seccomp_profile.clone()));
        Ok(match profile {
            None => Seccomp::RuntimeDefault,
            Some(p) => match p.type_.as_str() {
                "RuntimeDefault" => Seccomp::RuntimeDefault,
                "Unconfined" => Seccomp::Unconfined,
                "Localhost" => {
                    let name = p.localhost_profile.context("a Localhost seccomp profile names no file")?;
                    let file = Path::new(&name).file_name().context("the Localhost profile's name")?;
                    Seccomp::File(repo_root().join("deploy/netiso/seccomp").join(file))
                }
                other => bail!("unknown seccomp profile type {other}"),
            },
        })
    }

    /// `podman run` arguments (before the image) for the shipped container: its user,
    /// capabilities, root filesystem, privilege escalation, memory limit and host paths, in
    /// network namespace `netns` (the node's: hostNetwork), with `seccomp`. Host paths found in
    /// `relocate` are mounted from the given directory instead (the node's state directory, for
    /// a test).
    pub fn podman_run_args(
        &self,
        netns: &str,
        seccomp: &Seccomp,
        relocate: &[(&str, &Path)],
    ) -> anyhow::Result<Vec<String>> {
        if self.pod.host_network != Some(true) {
            bail!("the DaemonSet no longer uses the host's network: update the podman arguments");
        }
        let context = self.container.security_context.clone().context("the container has no securityContext")?;
        let mut args: Vec<String> = vec![format!("--network=ns:/run/netns/{netns}")];
        if let Some(user) = context.run_as_user {
            args.push(format!("--user={user}:{user}"));
        }
        if context.privileged == Some(true) {
            args.push("--privileged".into());
        }
        if context.allow_privilege_escalation == Some(false) {
            args.push("--security-opt=no-new-privileges".into());
        }
        if context.read_only_root_filesystem == Some(true) {
            // Kubernetes mounts no tmpfs on a read-only root; podman would.
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        let capabilities = context.capabilities.unwrap_or_default();
        for cap in capabilities.drop.unwrap_or_default() {
            args.push(format!("--cap-drop={cap}"));
        }
        for cap in capabilities.add.unwrap_or_default() {
            args.push(format!("--cap-add={cap}"));
        }
        if let Some(memory) =
            self.container.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory"))
        {
            args.push(format!("--memory={}", memory_bytes(&memory.0)?));
        }
        args.push(match seccomp {
            Seccomp::RuntimeDefault => "--security-opt=seccomp=/usr/share/containers/seccomp.json".into(),
            Seccomp::Unconfined => "--security-opt=seccomp=unconfined".into(),
            Seccomp::File(path) => format!("--security-opt=seccomp={}", path.display()),
        });
        let volumes = self.pod.volumes.clone().unwrap_or_default();
        for mount in self.container.volume_mounts.clone().unwrap_or_default() {
            let volume =
                volumes.iter().find(|v| v.name == mount.name).with_context(|| format!("volume {}", mount.name))?;
            let host = volume.host_path.as_ref().with_context(|| format!("volume {} is not a hostPath", mount.name))?;
            let source = relocate
                .iter()
                .find(|(path, _)| *path == host.path)
                .map_or_else(|| PathBuf::from(&host.path), |(_, dir)| dir.to_path_buf());
            let mut options = vec![if mount.read_only == Some(true) { "ro" } else { "rw" }];
            match mount.mount_propagation.as_deref() {
                None | Some("None") => {}
                Some("HostToContainer") => options.push("rslave"),
                Some("Bidirectional") => options.push("rshared"),
                Some(other) => bail!("unknown mountPropagation {other}"),
            }
            args.push(format!("--volume={}:{}:{}", source.display(), mount.mount_path, options.join(",")));
        }
        Ok(args)
    }
}

/// A Kubernetes memory quantity (`512Mi`, `1Gi`, `500M`, `1000000`) in bytes.
fn memory_bytes(quantity: &str) -> anyhow::Result<u64> {
    let split = quantity.find(|c: char| !c.is_ascii_digit()).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: u64 = number.parse().with_context(|| format!("memory limit `{quantity}`"))?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => bail!("memory limit `{quantity}`: unknown suffix {other}"),
    };
    Ok(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(memory_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(memory_bytes("1G").unwrap(), 1_000_000_000);
        assert!(memory_bytes("5Xi").is_err());
    }

    #[test]
    fn the_shipped_container_translates_into_podman_arguments() {
        let shipped = shipped().unwrap();
        let state = Path::new("/tmp/state");
        let args = shipped.podman_run_args("ni-node", &Seccomp::Unconfined, &[("/var/lib/netiso", state)]).unwrap();
        for expected in [
            "--network=ns:/run/netns/ni-node",
            "--user=0:0",
            "--read-only",
            "--cap-drop=ALL",
            "--cap-add=BPF",
            "--security-opt=no-new-privileges",
            "--memory=536870912",
            "--volume=/tmp/state:/var/lib/netiso:rw",
            "--volume=/run/netns:/run/netns:ro,rslave",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
    }

    #[test]
    fn a_dynamically_linked_binary_is_told_apart() {
        assert!(elf_interpreter(Path::new("/bin/sh")).unwrap(), "/bin/sh uses the dynamic loader");
    }
}
