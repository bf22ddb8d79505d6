//! The kernel side of netiso as seen from user space: loads the eBPF programs with offsets and
//! reason names from the running kernel, attaches them, and turns the kernel maps and ring buffer
//! into a stream of [`DatapathRecord`]s.

pub mod btf;
pub mod conntrack;
pub mod drain;
pub mod interfaces;
pub mod kallsyms;
pub mod kernel_log;
pub mod netns;
pub mod privileges;
pub mod reasons;
pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aya::maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::tc::{SchedClassifierLinkId, TcAttach, TcAttachType, TcError};
use aya::programs::{BtfTracePoint, LinkOrder, ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use netiso_common::{
    Counters, DROP_TOTAL_NO_REASON, DROP_TOTAL_SLOTS, DropKey, DropTotal, EVENT_DROP, EVENT_FLAG_MAP_FULL,
    EVENT_FLAG_NEW_KEY, Event, FlowKey, FlowTuple, KernelOffsets, LOSS_COUNTERS, MAX_DROP_REASONS, NEW_KEYS_PENDING,
    REASON_NONE,
};
use nix::time::{ClockId, clock_gettime};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use self::btf::{Btf, BtfError};
use self::drain::{Change, Ledger, idle_limit, loss_deltas, sum};
use self::interfaces::{Link, LinkChange};
use self::kallsyms::Kallsyms;
use self::netns::PodNamespaces;
use self::reasons::{DropReasons, ReasonClass, ReasonError, ReasonSelection, classify, infer};
pub use self::record::{DatapathRecord, Direction, EventKind};
use self::record::{IpProtocol, tcp_flag_names, tuple_addrs};

/// The compiled eBPF object, built from netiso-ebpf by this crate's build script.
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netiso-probes"));

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "cannot read the kernel's BTF at {BTF_PATH} ({0}); netiso needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(std::io::Error),
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("kernel BTF: {0}")]
    KernelBtf(#[source] aya::BtfError),
    #[error(transparent)]
    Reasons(#[from] ReasonError),
    #[error("loading the eBPF programs was refused ({0}); run as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")]
    Privilege(String),
    #[error(
        "loading the eBPF programs was refused ({0}) although netiso holds CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: \
         a seccomp filter refuses bpf() (container runtimes' default profiles do without CAP_SYS_ADMIN); run netiso \
         with seccompProfile Unconfined, as the DaemonSet does, or with deploy/netiso/seccomp/netiso.json"
    )]
    Seccomp(String),
    #[error(
        "netiso run lacks {}: run it as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (in Kubernetes: securityContext.capabilities.add)",
        .0.join(", ")
    )]
    MissingCapabilities(Vec<&'static str>),
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("no interface named `{0}` in this network namespace; check the name with `ip link` or use a glob pattern")]
    UnknownInterface(String),
    #[error("invalid interface pattern `{pattern}`: {source}")]
    Pattern { pattern: String, source: glob::PatternError },
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("cannot read this thread's network namespace (/proc/thread-self/ns/net): {0}")]
    Netns(std::io::Error),
    #[error("ring buffer: {0}")]
    RingBuffer(std::io::Error),
}

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Interfaces to observe besides every veth, by name or glob (`eth*`).
    pub interface_patterns: Vec<String>,
    /// Drop reasons to keep: names, classes, `default` or `all` (see [`DropReasons::select`]).
    pub drop_reasons: String,
    pub drop_map_entries: u32,
    pub flow_map_entries: u32,
    /// How often user space reads the kernel maps.
    pub drain_interval: Duration,
    /// Keys with no packet for this long are removed from the kernel maps.
    pub idle_timeout: Duration,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            interface_patterns: Vec::new(),
            drop_reasons: "default".into(),
            drop_map_entries: 32_768,
            flow_map_entries: 65_536,
            drain_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of the datapath's own health, shared with the metrics exporter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathStats {
    pub interfaces_attached: u64,
    pub ringbuf_full: u64,
    pub drop_map_full: u64,
    pub flow_map_full: u64,
    pub unparsed: u64,
    pub ring_events: u64,
    pub records: u64,
    /// Packets counted in the drop and flow maps (and overflow records), over the daemon's life.
    pub dropped_packets: u64,
    pub flow_packets: u64,
    /// Dropped packets in network namespaces that are neither this node's nor its pods'.
    pub foreign_drops: u64,
    /// Every IP packet the kernel dropped on the host since the programs were loaded, by the
    /// kernel's reason name ([`NO_REASON`] where it gives none), counted in the kernel: complete
    /// whatever became of the packets' detail.
    pub kernel_drops: BTreeMap<String, DropTotal>,
}

/// The reason of kernel drop totals on kernels that give none (before 5.17).
pub const NO_REASON: &str = "none";

impl DatapathStats {
    pub fn losses(&self) -> u64 {
        self.ringbuf_full + self.drop_map_full + self.flow_map_full
    }
}

/// Reads the sk_buff and net_device offsets the drop program needs from the kernel's BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    Ok(KernelOffsets {
        skb_head: btf.member_offset("sk_buff", "head")?,
        skb_len: btf.member_offset("sk_buff", "len")?,
        skb_network_header: btf.member_offset("sk_buff", "network_header")?,
        skb_transport_header: btf.member_offset("sk_buff", "transport_header")?,
        skb_dev: btf.member_offset("sk_buff", "dev")?,
        skb_iif: btf.member_offset("sk_buff", "skb_iif")?,
        net_device_ifindex: btf.member_offset("net_device", "ifindex")?,
        skb_protocol: btf.member_offset("sk_buff", "protocol")?,
        net_device_net: btf.member_offset("net_device", "nd_net")? + btf.member_offset("possible_net_t", "net")?,
        net_inum: btf.member_offset("net", "ns")? + btf.member_offset("ns_common", "inum")?,
    })
}

/// Whether the kernel has `bpf_ktime_get_coarse_ns` (Linux >= 5.11).
fn coarse_clock_supported() -> bool {
    use aya::sys::{BpfHelper, is_helper_supported};
    is_helper_supported(aya::programs::ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_ktime_get_coarse_ns)
        .unwrap_or(false)
}

/// The drop program for a kernel whose `kfree_skb` tracepoint passes `args` arguments.
fn drop_program(args: usize) -> &'static str {
    if args >= 3 { "netiso_drop" } else { "netiso_drop_loc" }
}

struct Attached {
    name: String,
    peer_netns_id: Option<i32>,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

const FLOW_PROGRAMS: [(&str, TcAttachType); 2] =
    [("netiso_from_pod", TcAttachType::Ingress), ("netiso_to_pod", TcAttachType::Egress)];

/// Loaded and attached programs. Dropping it detaches everything and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    kernel_log: Option<aya_log::EbpfLogger<kernel_log::Forward>>,
    reasons: DropReasons,
    /// Applied in user space where the kernel gives no reasons to filter by.
    selection: ReasonSelection,
    /// This process's network namespace (inode number).
    own_netns: u32,
    pod_namespaces: PodNamespaces,
    symbols: Kallsyms,
    patterns: Vec<glob::Pattern>,
    attached: HashMap<u32, Attached>,
    config: DatapathConfig,
    stats: Arc<Mutex<DatapathStats>>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = format!("{e:?}");
    text.contains("PermissionDenied") || text.contains("EPERM") || text.contains("Operation not permitted")
}

impl Datapath {
    /// Loads the programs and attaches the drop tracepoint. Interfaces are attached by [`run`].
    pub async fn load(config: DatapathConfig) -> Result<Self, DatapathError> {
        let missing = privileges::missing();
        if !missing.is_empty() {
            return Err(DatapathError::MissingCapabilities(missing));
        }
        let patterns = config
            .interface_patterns
            .iter()
            .map(|p| glob::Pattern::new(p).map_err(|source| DatapathError::Pattern { pattern: p.clone(), source }))
            .collect::<Result<Vec<_>, _>>()?;
        // A literal name that does not exist is a typo, not a pattern waiting for a match.
        let links = interfaces::list().await.map_err(DatapathError::Netlink)?;
        for p in &config.interface_patterns {
            let literal = !p.contains(['*', '?', '[']);
            if literal && !links.iter().any(|l| &l.name == p) {
                return Err(DatapathError::UnknownInterface(p.clone()));
            }
        }

        let btf_data = std::fs::read(BTF_PATH).map_err(DatapathError::NoBtf)?;
        let btf = Btf::parse(&btf_data)?;
        let offsets = kernel_offsets(&btf)?;
        let drop_program = drop_program(btf.tracepoint_args("kfree_skb")?);
        let reasons = DropReasons::from_btf(&btf);
        let selection = ReasonSelection::parse(&config.drop_reasons, &reasons)?;
        let keep = reasons.kept_values(&selection);
        if !reasons.given() {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            tracing::warn!(
                kernel = release.trim(),
                "this kernel gives no drop reasons (they came with Linux 5.17): a drop's reason is inferred from \
                 where the packet was dropped when that says it (netfilter, tc, no socket), marked reason_inferred, \
                 and left unknown otherwise; --drop-reasons applies to the inferred reasons"
            );
        }
        let kernel_btf = aya::Btf::parse(&btf_data, aya::Endianness::default()).map_err(DatapathError::KernelBtf)?;

        let log_level = kernel_log::level();
        let mut ebpf = EbpfLoader::new()
            .btf(&kernel_btf)
            .override_global("OFFSETS", &offsets, true)
            .override_global("COARSE_CLOCK", &u8::from(coarse_clock_supported()), true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .map_max_entries("DROPS", config.drop_map_entries)
            .map_max_entries("FLOWS", config.flow_map_entries)
            .load(PROBES)
            .map_err(|e| {
                if !is_permission_error(&e) {
                    DatapathError::Load(e)
                } else if privileges::seccomp_filtered() {
                    DatapathError::Seccomp(e.to_string())
                } else {
                    DatapathError::Privilege(e.to_string())
                }
            })?;

        let mut filter: Array<_, u8> = Array::try_from(ebpf.map_mut("DROP_REASON_FILTER").expect("map in object"))
            .map_err(map_err("DROP_REASON_FILTER"))?;
        for value in keep.into_iter().filter(|v| *v < MAX_DROP_REASONS) {
            filter.set(value, &1, 0).map_err(map_err("DROP_REASON_FILTER"))?;
        }

        let tp: &mut BtfTracePoint =
            ebpf.program_mut(drop_program).expect("program in object").try_into().map_err(prog_err(drop_program))?;
        tp.load("kfree_skb", &kernel_btf).map_err(prog_err(drop_program))?;
        tp.attach().map_err(prog_err(drop_program))?;
        for (name, _) in FLOW_PROGRAMS {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).expect("program in object").try_into().map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
        }

        // After every program is loaded: the reader takes the log map, which loading needs.
        let kernel_log = kernel_log::reader(&mut ebpf, log_level);
        let symbols = Kallsyms::load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read /proc/kallsyms; drop locations will be raw addresses");
            Kallsyms::parse(std::io::empty())
        });
        Ok(Datapath {
            ebpf,
            kernel_log,
            reasons,
            selection,
            own_netns: netns::own_inode().map_err(DatapathError::Netns)?,
            pod_namespaces: PodNamespaces::default(),
            symbols,
            patterns,
            attached: HashMap::new(),
            config,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<Mutex<DatapathStats>> {
        self.stats.clone()
    }

    pub fn reasons(&self) -> &DropReasons {
        &self.reasons
    }

    fn wanted(&self, link: &Link) -> bool {
        link.is_veth || self.patterns.iter().any(|p| p.matches(&link.name))
    }

    fn attach(&mut self, link: &Link) -> Result<(), DatapathError> {
        if self.attached.get(&link.index).is_some_and(|a| a.name == link.name) {
            return Ok(());
        }
        // An index reused under a new name: drop the stale entry first.
        self.detach(link.index);
        let mut links = Vec::new();
        for (name, hook) in FLOW_PROGRAMS {
            let prog: &mut SchedClassifier =
                self.ebpf.program_mut(name).expect("program in object").try_into().map_err(prog_err(name))?;
            let tcx = prog.attach(link.index, TcAttach::Tcx { attach_type: hook, order: LinkOrder::default() });
            let id = match tcx {
                Ok(id) => id,
                // Kernels before 6.6 have no TCX: fall back to a clsact qdisc.
                Err(ProgramError::SyscallError(_)) => {
                    if let Err(e) = aya::programs::tc::qdisc_add_clsact(link.index) {
                        tracing::debug!(interface = %link.name, error = %e, "clsact qdisc not added (it may exist already)");
                    }
                    // Unlike TCX links, clsact filters outlive the process: a daemon that was
                    // killed left its filters, which this one replaces.
                    match aya::programs::tc::qdisc_detach_program(link.index, hook.into(), name) {
                        Ok(()) => {
                            tracing::info!(interface = %link.name, program = name, "replacing a stale clsact filter")
                        }
                        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(interface = %link.name, program = name, error = %e, "cannot remove a stale clsact filter")
                        }
                    }
                    prog.attach(link.index, TcAttach::Auto(hook)).map_err(prog_err(name))?
                }
                Err(e) => {
                    for (name, id) in links {
                        let prog: &mut SchedClassifier =
                            self.ebpf.program_mut(name).expect("program").try_into().map_err(prog_err(name))?;
                        let _ = prog.detach(id);
                    }
                    return Err(prog_err(name)(e));
                }
            };
            links.push((name, id));
        }
        tracing::info!(interface = %link.name, ifindex = link.index, "observing interface");
        self.attached
            .insert(link.index, Attached { name: link.name.clone(), peer_netns_id: link.peer_netns_id, links });
        self.pod_namespaces.stale = true;
        self.stats.lock().expect("stats lock").interfaces_attached = self.attached.len() as u64;
        Ok(())
    }

    fn detach(&mut self, index: u32) {
        let Some(attached) = self.attached.remove(&index) else {
            return;
        };
        for (name, id) in attached.links {
            if let Some(prog) = self.ebpf.program_mut(name)
                && let Ok(prog) = <&mut SchedClassifier>::try_from(prog)
            {
                // The kernel removes the links of a deleted interface by itself.
                let _ = prog.detach(id);
            }
        }
        tracing::info!(interface = %attached.name, ifindex = index, "interface gone; detached");
        self.stats.lock().expect("stats lock").interfaces_attached = self.attached.len() as u64;
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.attached.values().map(|a| a.name.clone()).collect();
        names.sort();
        names
    }

    /// Runs until `shutdown` turns true: follows interfaces, reads the ring buffer and drains the
    /// maps into `records`. Returns after a final drain; dropping `self` then detaches everything.
    pub async fn run(
        mut self,
        records: mpsc::Sender<DatapathRecord>,
        mut shutdown: watch::Receiver<bool>,
        ready: Option<tokio::sync::oneshot::Sender<Vec<String>>>,
    ) -> Result<(), DatapathError> {
        let ring =
            RingBuf::try_from(self.ebpf.take_map("EVENTS").expect("map in object")).map_err(map_err("EVENTS"))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
        // AsyncFd that owns the ring buffer is dropped.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| DatapathError::RingBuffer(std::io::Error::other(e.to_string())))?;
        let drops: AyaHashMap<MapData, DropKey, Counters> =
            AyaHashMap::try_from(self.ebpf.take_map("DROPS").expect("map in object")).map_err(map_err("DROPS"))?;
        let flows: PerCpuHashMap<MapData, FlowKey, Counters> =
            PerCpuHashMap::try_from(self.ebpf.take_map("FLOWS").expect("map in object")).map_err(map_err("FLOWS"))?;
        let new_keys: Array<MapData, u32> =
            Array::try_from(self.ebpf.take_map("NEW_KEYS").expect("map in object")).map_err(map_err("NEW_KEYS"))?;
        let losses: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(self.ebpf.take_map("LOSSES").expect("map in object")).map_err(map_err("LOSSES"))?;
        let drop_totals: PerCpuArray<MapData, DropTotal> =
            PerCpuArray::try_from(self.ebpf.take_map("DROP_TOTALS").expect("map in object"))
                .map_err(map_err("DROP_TOTALS"))?;
        let mut kernel_log = match self.kernel_log.take() {
            // SAFETY: the logger owns its map fd, which stays open and unchanged until the AsyncFd
            // that owns the logger is dropped.
            Some(logger) => Some(
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                    .map_err(|e| DatapathError::RingBuffer(std::io::Error::other(e.to_string())))?,
            ),
            None => None,
        };

        let (link_tx, mut link_rx) = mpsc::channel(256);
        let watcher = tokio::spawn(interfaces::watch(link_tx));
        // The initial listing arrives first; attach it before announcing readiness.
        let initial = interfaces::list().await.map_err(DatapathError::Netlink)?;
        for link in &initial {
            if self.wanted(link) {
                self.attach(link)?;
            }
        }
        if let Some(ready) = ready {
            let _ = ready.send(self.attached_interfaces());
        }

        let mut drains = Drains {
            drops: Drain::new(drops, self.config.drop_map_entries),
            flows: Drain::new(flows, self.config.flow_map_entries),
            new_keys,
        };
        let mut tick = tokio::time::interval(self.config.drain_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let soon = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(soon);
        let mut soon_armed = false;
        // A drain reads every key of both maps, a syscall or two each: new keys bring one early,
        // but in a storm of new keys no more often than this.
        let early_every = self.config.drain_interval / 4;
        let mut drained_at = tokio::time::Instant::now();
        let mut reported_losses = [0u64; LOSS_COUNTERS as usize];

        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                change = link_rx.recv() => match change {
                    Some(LinkChange::Present(link)) if self.wanted(&link) => {
                        if let Err(e) = self.attach(&link) {
                            tracing::warn!(interface = %link.name, error = %e, "cannot observe interface");
                        }
                    }
                    Some(LinkChange::Present(_)) => {}
                    Some(LinkChange::Gone(index)) => self.detach(index),
                    None => {
                        tracing::error!("interface watcher stopped; new interfaces will not be observed");
                        link_rx = mpsc::channel(1).1;
                    }
                },
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(DatapathError::RingBuffer)?;
                    let ring = guard.get_inner_mut();
                    let mut new_keys = false;
                    while let Some(item) = ring.next() {
                        let Some(event) = read_event(&item) else { continue };
                        self.stats.lock().expect("stats lock").ring_events += 1;
                        if event.flags & EVENT_FLAG_MAP_FULL != 0 {
                            if let Some(record) = self.overflow_record(&event) {
                                self.count_overflow(record.event);
                                self.emit(&records, record).await;
                            }
                        } else if event.flags & EVENT_FLAG_NEW_KEY != 0 {
                            new_keys = true;
                        }
                    }
                    guard.clear_ready();
                    // Coalesce a burst of new keys into one early drain.
                    if new_keys && !soon_armed {
                        let due = (tokio::time::Instant::now() + Duration::from_millis(50)).max(drained_at + early_every);
                        soon.as_mut().reset(due);
                        soon_armed = true;
                    }
                },
                guard = async { kernel_log.as_mut().expect("checked").readable_mut().await }, if kernel_log.is_some() => {
                    let mut guard = guard.map_err(DatapathError::RingBuffer)?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                },
                _ = &mut soon, if soon_armed => {
                    soon_armed = false;
                    self.drain(&mut drains, &records).await;
                    drained_at = tokio::time::Instant::now();
                },
                _ = tick.tick() => {
                    self.drain(&mut drains, &records).await;
                    drained_at = tokio::time::Instant::now();
                    self.read_losses(&losses, &mut reported_losses);
                    self.read_drop_totals(&drop_totals);
                },
            }
        }
        self.drain(&mut drains, &records).await;
        self.read_losses(&losses, &mut reported_losses);
        self.read_drop_totals(&drop_totals);
        watcher.abort();
        Ok(())
    }

    fn count_overflow(&self, kind: EventKind) {
        let mut stats = self.stats.lock().expect("stats lock");
        match kind {
            EventKind::Drop => stats.dropped_packets += 1,
            EventKind::Flow => stats.flow_packets += 1,
        }
    }

    async fn emit(&self, records: &mpsc::Sender<DatapathRecord>, record: DatapathRecord) {
        self.stats.lock().expect("stats lock").records += 1;
        // A closed receiver means shutdown is under way.
        let _ = records.send(record).await;
    }

    fn interface_name(&self, ifindex: u32) -> Option<String> {
        self.attached.get(&ifindex).map(|a| a.name.clone())
    }

    /// Whether a drop in namespace `netns` happened on this node: in its own namespace (0: the
    /// packet had no device) or a pod's.
    fn watches(&self, netns: u32) -> bool {
        netns == 0 || netns == self.own_netns || self.pod_namespaces.name(netns).is_some()
    }

    /// The record of a packet the map had no room for; None for a drop the reason selection
    /// skips or that happened elsewhere.
    fn overflow_record(&self, event: &Event) -> Option<DatapathRecord> {
        let (kind, counters) = event_counters(event);
        if kind == EventKind::Drop && !self.watches(event.netns) {
            self.stats.lock().expect("stats lock").foreign_drops += 1;
            return None;
        }
        let mut record = self.record(kind, &event.tuple, &counters).with_change(true, 1, event.len as u64);
        if kind == EventKind::Drop {
            if !self.add_drop_fields(&mut record, event.reason, event.location, event.netns) {
                return None;
            }
        } else {
            record.direction = Direction::from_raw(event.direction);
        }
        record.overflow = true;
        Some(record)
    }

    fn record(&self, event: EventKind, tuple: &FlowTuple, c: &Counters) -> DatapathRecord {
        DatapathRecord { interface: self.interface_name(c.ifindex), ..tuple_record(event, tuple, c) }
    }

    /// Names a drop's reason, the kernel's or, where it gives none, one inferred from the
    /// location, and its interface in the namespace it happened in; returns whether the reason
    /// selection keeps the drop.
    fn add_drop_fields(&self, record: &mut DatapathRecord, reason: u32, location: u64, netns: u32) -> bool {
        if let Some(name) = self.pod_namespaces.name(netns) {
            record.interface = self.pod_namespaces.interface_name(netns, record.ifindex);
            record.netns = Some(name.to_owned());
        }
        let location = self.symbols.symbolize(location);
        let (name, kept) = if reason == REASON_NONE {
            let inferred = infer(&location).map(str::to_owned);
            let kept = self.selection.keeps(inferred.as_deref());
            (inferred, kept)
        } else {
            // The kernel's filter already applied the selection.
            (Some(self.reasons.name(reason)), true)
        };
        record.reason_class = Some(name.as_deref().map_or(ReasonClass::Other, classify));
        record.reason_inferred = reason == REASON_NONE && name.is_some();
        record.reason = name;
        record.location = Some(location);
        kept
    }

    async fn drain(&mut self, drains: &mut Drains, records: &mpsc::Sender<DatapathRecord>) {
        // Cleared before the maps are read: a key inserted from here on is read now or announced.
        if let Err(e) = drains.new_keys.set(NEW_KEYS_PENDING, &0, 0) {
            tracing::debug!(error = %e, "new keys not re-armed; the next drain is at its interval");
        }
        let now = monotonic_ns();
        let idle = self.config.idle_timeout.as_nanos() as u64;
        let pressed = 2 * self.config.drain_interval.as_nanos() as u64;
        let drops = drains.drops.drain(now, idle, pressed);
        let flows = drains.flows.drain(now, idle, pressed);
        if self.pod_namespaces.due() && drops.iter().any(|c| !self.watches(c.key.netns)) {
            let peer_ids = self.attached.values().filter_map(|a| a.peer_netns_id).collect();
            self.pod_namespaces.refresh(&peer_ids).await;
        }
        let mut batch: Vec<(u64, DatapathRecord)> = Vec::with_capacity(drops.len() + flows.len());
        let mut foreign = 0;
        for change in drops {
            if !self.watches(change.key.netns) {
                foreign += change.delta_packets;
                continue;
            }
            let mut record = self.record(EventKind::Drop, &change.key.tuple, &change.counters);
            if self.add_drop_fields(&mut record, change.key.reason, change.key.location, change.key.netns) {
                let record = record.with_change(change.new_key, change.delta_packets, change.delta_bytes);
                batch.push((change.counters.first_seen_ns, record));
            }
        }
        {
            let mut stats = self.stats.lock().expect("stats lock");
            stats.dropped_packets += batch.iter().map(|(_, r)| r.delta_packets).sum::<u64>();
            stats.flow_packets += flows.iter().map(|c| c.delta_packets).sum::<u64>();
            stats.foreign_drops += foreign;
        }
        for change in flows {
            let mut record = self.record(EventKind::Flow, &change.key.tuple, &change.counters);
            record.direction = Direction::from_raw(change.key.direction);
            let record = record.with_change(change.new_key, change.delta_packets, change.delta_bytes);
            batch.push((change.counters.first_seen_ns, record));
        }
        // Drops and flows together in order of first packet, so that downstream a reply follows
        // the request it answers whichever map each came from.
        batch.sort_by_key(|(first_seen, _)| *first_seen);
        for (_, record) in batch {
            self.emit(records, record).await;
        }
    }

    /// Sums each cause's slot over the CPUs; a slot that cannot be read this time keeps its last
    /// total.
    fn read_drop_totals(&self, totals: &PerCpuArray<MapData, DropTotal>) {
        let mut read = Vec::new();
        for slot in 0..DROP_TOTAL_SLOTS {
            let Ok(values) = totals.get(&slot, 0) else { continue };
            let total = values.iter().fold(DropTotal::default(), |sum, v| DropTotal {
                packets: sum.packets.saturating_add(v.packets),
                bytes: sum.bytes.saturating_add(v.bytes),
            });
            if total.packets > 0 {
                let name = if slot == DROP_TOTAL_NO_REASON { NO_REASON.to_owned() } else { self.reasons.name(slot) };
                read.push((name, total));
            }
        }
        let mut stats = self.stats.lock().expect("stats lock");
        stats.kernel_drops.extend(read);
    }

    fn read_losses(&self, losses: &PerCpuArray<MapData, u64>, reported: &mut [u64; LOSS_COUNTERS as usize]) {
        // A counter that cannot be read this time keeps its last total.
        let mut totals = *reported;
        for (index, total) in totals.iter_mut().enumerate() {
            if let Ok(values) = losses.get(&(index as u32), 0) {
                *total = values.iter().fold(0u64, |sum, v| sum.saturating_add(*v));
            }
        }
        if totals != *reported {
            let delta = loss_deltas(&totals, reported);
            tracing::warn!(
                ringbuf_full = delta[netiso_common::LOSS_RINGBUF_FULL as usize],
                drop_map_full = delta[netiso_common::LOSS_DROP_MAP_FULL as usize],
                flow_map_full = delta[netiso_common::LOSS_FLOW_MAP_FULL as usize],
                unparsed = delta[netiso_common::LOSS_UNPARSED as usize],
                "datapath could not record some packets in full"
            );
            *reported = totals;
        }
        let mut stats = self.stats.lock().expect("stats lock");
        stats.ringbuf_full = totals[netiso_common::LOSS_RINGBUF_FULL as usize];
        stats.drop_map_full = totals[netiso_common::LOSS_DROP_MAP_FULL as usize];
        stats.flow_map_full = totals[netiso_common::LOSS_FLOW_MAP_FULL as usize];
        stats.unparsed = totals[netiso_common::LOSS_UNPARSED as usize];
    }
}

/// A ring buffer item as the kernel wrote it; None when it is too short to be one.
pub fn read_event(item: &[u8]) -> Option<Event> {
    if item.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: `Event` is a plain-old-data #[repr(C)] type valid for any bit pattern, the buffer
    // holds at least its size, and read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) })
}

/// A single-packet event (one the maps had no room for) as the counters of its key.
pub fn event_counters(event: &Event) -> (EventKind, Counters) {
    let kind = if event.kind == EVENT_DROP { EventKind::Drop } else { EventKind::Flow };
    let counters = Counters {
        packets: 1,
        bytes: event.len as u64,
        first_seen_ns: event.timestamp_ns,
        last_seen_ns: event.timestamp_ns,
        ifindex: event.ifindex,
        tcp_flags: event.tcp_flags,
        _pad: [0; 3],
    };
    (kind, counters)
}

/// The record fields a kernel key and its counters give on their own, before this node's names
/// (interface, namespace, reason) are added.
pub fn tuple_record(event: EventKind, tuple: &FlowTuple, c: &Counters) -> DatapathRecord {
    let (src_ip, dst_ip) = tuple_addrs(tuple);
    let icmp = matches!(tuple.protocol, netiso_common::IPPROTO_ICMP | netiso_common::IPPROTO_ICMPV6);
    DatapathRecord {
        event,
        time: wall_clock(c.first_seen_ns),
        last_seen: wall_clock(c.last_seen_ns),
        src_ip,
        dst_ip,
        src_port: tuple.src_port,
        dst_port: tuple.dst_port,
        protocol: IpProtocol::from_number(tuple.protocol),
        icmp_type: icmp.then_some(tuple.icmp_type),
        icmp_code: icmp.then_some(tuple.icmp_code),
        reason: None,
        reason_class: None,
        reason_inferred: false,
        location: None,
        netns: None,
        direction: None,
        ifindex: c.ifindex,
        interface: None,
        packets: c.packets,
        bytes: c.bytes,
        tcp_flags: (tuple.protocol == netiso_common::IPPROTO_TCP).then(|| tcp_flag_names(c.tcp_flags)),
        overflow: false,
        new_key: false,
        delta_packets: 0,
        delta_bytes: 0,
    }
}

/// A kernel map of counters by key: counted per CPU (flows) or shared by the CPUs (drops).
trait CounterMap<K> {
    /// Every key with its counters (summed over CPUs).
    fn entries(&self) -> Vec<(K, Counters)>;
    fn read(&self, key: &K) -> Option<Counters>;
    fn remove(&mut self, key: &K);
}

impl<K: aya::Pod> CounterMap<K> for PerCpuHashMap<MapData, K, Counters> {
    fn entries(&self) -> Vec<(K, Counters)> {
        self.iter().filter_map(Result::ok).map(|(key, per_cpu)| (key, sum(per_cpu.iter()))).collect()
    }

    fn read(&self, key: &K) -> Option<Counters> {
        self.get(key, 0).ok().map(|per_cpu| sum(per_cpu.iter()))
    }

    fn remove(&mut self, key: &K) {
        let _ = PerCpuHashMap::remove(self, key);
    }
}

impl<K: aya::Pod> CounterMap<K> for AyaHashMap<MapData, K, Counters> {
    fn entries(&self) -> Vec<(K, Counters)> {
        self.iter().filter_map(Result::ok).collect()
    }

    fn read(&self, key: &K) -> Option<Counters> {
        self.get(key, 0).ok()
    }

    fn remove(&mut self, key: &K) {
        let _ = AyaHashMap::remove(self, key);
    }
}

/// One kernel map and what user space already knows of its keys.
struct Drain<K, M> {
    map: M,
    capacity: u32,
    ledger: Ledger<K>,
}

impl<K: aya::Pod + Eq + Hash, M: CounterMap<K>> Drain<K, M> {
    fn new(map: M, capacity: u32) -> Self {
        Drain { map, capacity, ledger: Ledger::default() }
    }

    /// Reads the map: the keys that are new or saw packets since the last read. Keys idle for
    /// longer than `idle_ns` leave the map, or longer than `pressed_ns` while it is more than half
    /// full ([`idle_limit`]).
    fn drain(&mut self, now_ns: u64, idle_ns: u64, pressed_ns: u64) -> Vec<Change<K>> {
        let entries = self.map.entries();
        let limit = idle_limit(entries.len(), self.capacity, idle_ns, pressed_ns);
        let (changes, idle) = self.ledger.read(entries, now_ns, limit);
        for (key, read) in idle {
            // The map was read key by key, long before this: a packet that reached the key since
            // would go with it. Read again right before removing (a window of one syscall).
            match self.map.read(&key) {
                Some(now) if now.packets != read.packets => self.ledger.keep(key, &read),
                _ => self.map.remove(&key),
            }
        }
        changes
    }
}

struct Drains {
    drops: Drain<DropKey, AyaHashMap<MapData, DropKey, Counters>>,
    flows: Drain<FlowKey, PerCpuHashMap<MapData, FlowKey, Counters>>,
    /// [`NEW_KEYS_PENDING`]: set by the programs when they announce a new key.
    new_keys: Array<MapData, u32>,
}

fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0)
}

/// Converts a `bpf_ktime_get_ns` timestamp (CLOCK_MONOTONIC) to wall-clock time.
fn wall_clock(mono_ns: u64) -> SystemTime {
    let now_mono = monotonic_ns();
    let now = SystemTime::now();
    if mono_ns <= now_mono {
        now - Duration::from_nanos(now_mono - mono_ns)
    } else {
        now + Duration::from_nanos(mono_ns - now_mono)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_come_from_the_running_kernel() {
        let btf = Btf::parse(&std::fs::read(BTF_PATH).unwrap()).unwrap();
        let offsets = kernel_offsets(&btf).unwrap();
        assert!(offsets.skb_head > offsets.skb_network_header);
        assert_ne!(offsets.net_device_ifindex, 0);
    }
}
