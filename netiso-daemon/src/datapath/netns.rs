//! Which network namespace a drop happened in. The drop tracepoint fires for every namespace on
//! the host; a drop is this node's when it happened in netiso's own namespace or in a pod's, one
//! on the far side of an interface pair (veth, netkit) whose near side netiso observes. A drop
//! anywhere else (another lab, a nested cluster, an overlapping address range) is not evidence
//! about this node's pods, however its addresses look.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::TryFutureExt;

/// Where `ip netns` and the container runtimes' CNI plugins name pod namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// How often drops from namespaces not known yet may trigger a new look at the pod namespaces.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// The pod namespaces known so far, and interface names looked up in them.
#[derive(Default)]
pub struct PodNamespaces {
    by_inode: HashMap<u32, String>,
    interface_names: Mutex<HashMap<(u32, u32), Option<String>>>,
    /// Interfaces came or went since the last look.
    pub stale: bool,
    refreshed: Option<Instant>,
}

impl PodNamespaces {
    /// The name (under [`NETNS_DIR`]) of pod namespace `inode`.
    pub fn name(&self, inode: u32) -> Option<&str> {
        self.by_inode.get(&inode).map(String::as_str)
    }

    /// Whether a new look may find namespaces not known yet: after interfaces changed, or
    /// otherwise at a bounded rate, as another namespace's drops keep arriving.
    pub fn due(&self) -> bool {
        self.stale || self.refreshed.is_none_or(|at| at.elapsed() >= REFRESH_EVERY)
    }

    /// Looks again at the namespaces behind the interfaces with these peer nsids.
    pub async fn refresh(&mut self, peer_ids: &HashSet<i32>) {
        match pods(peer_ids).await {
            Ok(found) => self.by_inode = found,
            Err(e) => tracing::warn!(error = %e, dir = NETNS_DIR, "cannot list the pods' network namespaces"),
        }
        self.interface_names.lock().expect("names lock").retain(|(inode, _), _| self.by_inode.contains_key(inode));
        self.stale = false;
        self.refreshed = Some(Instant::now());
    }

    /// The name of interface `ifindex` in pod namespace `inode`.
    pub fn interface_name(&self, inode: u32, ifindex: u32) -> Option<String> {
        let name = self.by_inode.get(&inode)?;
        let mut cache = self.interface_names.lock().expect("names lock");
        cache.entry((inode, ifindex)).or_insert_with(|| interface_name(name, ifindex)).clone()
    }
}

/// The inode number of this thread's network namespace, as the kernel's `ns.inum`. The thread's,
/// not the process's: a daemon started in-process on a thread that entered a namespace
/// observes that namespace.
pub fn own_inode() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino() as u32)
}

/// The namespaces under [`NETNS_DIR`] that are peers of this namespace's interfaces (`peer_ids`:
/// their nsids as this namespace knows them), by inode number, with their names.
pub async fn pods(peer_ids: &HashSet<i32>) -> std::io::Result<HashMap<u32, String>> {
    let mut found = HashMap::new();
    if peer_ids.is_empty() {
        return Ok(found);
    }
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A namespace without an nsid here has no interface pair with this namespace.
        let nsid = handle.link().get_netns_id(name.clone()).execute().map_err(std::io::Error::other).await;
        if let Ok(Some(id)) = nsid
            && peer_ids.contains(&id)
            && let Ok(meta) = std::fs::metadata(entry.path())
        {
            found.insert(meta.ino() as u32, name);
        }
    }
    task.abort();
    Ok(found)
}

/// The name of interface `ifindex` in namespace `name` (under [`NETNS_DIR`]).
pub fn interface_name(name: &str, ifindex: u32) -> Option<String> {
    let path = Path::new(NETNS_DIR).join(name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).ok()?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        nix::net::if_::if_indextoname(ifindex).ok().map(|n| n.to_string_lossy().into_owned())
    })
    .join()
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_has_the_inode_proc_shows() {
        let link = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_eq!(link.to_string_lossy(), format!("net:[{}]", own_inode().unwrap()));
    }
}
