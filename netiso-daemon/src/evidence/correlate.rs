//! Turns raw datapath records into flow records: names both ends as they were at the time of
//! the packet, evaluates NetworkPolicy, and states the attribution.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::attribution::attribute;
use super::engines::Engines;
use super::record::{
    Attribution, Evidence, FLOW_SCHEMA, FlowRecord, FlowVerdict, ObservationPoint, PolicySides, PolicyVerdict,
    PortSweep,
};
use super::store::StoreOp;
use crate::cluster::{EndpointKind, Identity};
use crate::datapath::conntrack::{Connection, Translations};
use crate::datapath::reasons::ReasonClass;
use crate::datapath::record::IpProtocol;
use crate::datapath::{DatapathRecord, Direction as PacketDirection, EventKind};
use crate::inventory::Inventory;
use crate::inventory::timeline::PodSnapshot;
use crate::policy::suggest::explain_with_suggestion;
use crate::policy::{Direction, Flow, PolicyRef};

/// The labels a flow record contributes to metrics, kept for its later count updates.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowFacts {
    pub verdict: FlowVerdict,
    pub reason: Option<String>,
    pub reason_class: Option<ReasonClass>,
    pub source_namespace: String,
    pub destination_namespace: String,
    pub attribution: Attribution,
    pub policy_direction: Option<PolicySides>,
    /// A drop NetworkPolicy denied: each denying side.
    pub denied_by: Vec<DeniedSide>,
    /// Who sent to whom, by workload, and the destination port.
    pub conversation: WorkloadConversation,
}

/// A conversation as the blocked-flows metric labels it: workloads rather than pods (replicas
/// come and go) and `world` rather than addresses, so its series stay few.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadConversation {
    pub source_workload: String,
    pub destination_workload: String,
    /// The port, or `scan` for a port scan's summary.
    pub destination_port: String,
    pub protocol: String,
}

impl WorkloadConversation {
    fn of(r: &FlowRecord) -> Self {
        WorkloadConversation {
            source_workload: r.source.workload_name(),
            destination_workload: r.destination.workload_name(),
            destination_port: if r.ports.is_some() { "scan".into() } else { r.destination.port.to_string() },
            protocol: r.protocol.to_string(),
        }
    }
}

/// A side whose policies denied a dropped flow, as metrics label it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeniedSide {
    pub direction: Direction,
    /// The namespace of the pod the policies isolate.
    pub namespace: String,
    /// Their names, sorted.
    pub isolated_by: String,
    /// The policy and rule that came nearest to admitting the flow.
    pub nearest: Option<(String, Option<usize>)>,
}

impl FlowFacts {
    fn of(r: &FlowRecord) -> Self {
        FlowFacts {
            verdict: r.verdict,
            reason: r.reason.clone(),
            reason_class: r.reason_class,
            source_namespace: r.source.namespace.clone().unwrap_or_default(),
            destination_namespace: r.destination.namespace.clone().unwrap_or_default(),
            attribution: r.policy.attribution,
            policy_direction: r.policy.direction,
            denied_by: if r.verdict == FlowVerdict::Dropped
                && r.policy.attribution == Attribution::DeniedByNetworkPolicy
            {
                r.policy
                    .denying_sides()
                    .map(|(direction, side)| DeniedSide {
                        direction,
                        namespace: side.namespace().to_owned(),
                        isolated_by: side.isolated_by_names(),
                        nearest: side.nearest.as_ref().map(|n| (n.policy.name.clone(), n.rule)),
                    })
                    .collect()
            } else {
                vec![]
            },
            conversation: WorkloadConversation::of(r),
        }
    }
}

/// A datapath record, handled: what to store, and what it adds to the counters.
#[derive(Clone, Debug, PartialEq)]
pub struct Handled {
    pub op: StoreOp,
    pub facts: Arc<FlowFacts>,
    pub delta_packets: u64,
    pub delta_bytes: u64,
    /// How long the policy evaluation took (new records only).
    pub evaluation: Option<Duration>,
}

/// The datapath's aggregation key: one stored record per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DatapathKey {
    event: EventKind,
    source: (IpAddr, u16),
    destination: (IpAddr, u16),
    protocol: IpProtocol,
    icmp: (Option<u8>, Option<u8>),
    reason: Option<String>,
    location: Option<String>,
    direction: Option<PacketDirection>,
}

fn datapath_key(r: &DatapathRecord) -> DatapathKey {
    DatapathKey {
        event: r.event,
        source: (r.src_ip, r.src_port),
        destination: (r.dst_ip, r.dst_port),
        protocol: r.protocol,
        icmp: (r.icmp_type, r.icmp_code),
        reason: r.reason.clone(),
        location: r.location.clone(),
        direction: r.direction,
    }
}

type Conversation = (IpProtocol, IpAddr, u16, IpAddr, u16);

/// The correlator's maps are read for every record: foldhash (seeded at random per map, as
/// SipHash is) is several times cheaper on their keys.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A stored record the datapath is still counting, by one of its kernel keys.
#[derive(Debug)]
struct Active {
    id: u64,
    last: SystemTime,
    facts: Arc<FlowFacts>,
    /// The record stands for the attempts of a retried conversation, whose totals are kept there.
    attempts: Option<AttemptKey>,
}

/// A dropped conversation as retried from fresh source ports: its kernel keys less the source
/// port, the pods that held both addresses at the time, and the inventory generation it was
/// judged in (a change to pods, Services or policies starts a new record, judged anew).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AttemptKey {
    protocol: IpProtocol,
    source: IpAddr,
    destination: SocketAddr,
    pods: (Option<String>, Option<String>),
    sent_to: Option<SocketAddr>,
    reason: Option<String>,
    location: Option<String>,
    generation: u64,
}

impl AttemptKey {
    /// The scan this conversation is part of: its source's attempts at any port of its
    /// destination.
    fn scan(&self) -> AttemptKey {
        AttemptKey { destination: SocketAddr::new(self.destination.ip(), 0), ..self.clone() }
    }
}

/// The totals of a record that stands for several attempts: the sums over their kernel keys.
#[derive(Debug)]
struct Attempts {
    id: u64,
    /// The record's first attempt: attempts join it within [`Correlator::with_attempt_window`].
    first: SystemTime,
    facts: Arc<FlowFacts>,
    attempts: u64,
    packets: u64,
    bytes: u64,
    last_seen: SystemTime,
    /// A scan summary's ports.
    ports: Option<PortSet>,
    /// When its ports were last written: a scan of thousands of ports rewrites them at most
    /// every [`HOLD`], and [`Correlator::release`] writes what is left.
    swept_at: Option<Instant>,
    sweep_pending: bool,
}

impl Attempts {
    fn of(record: &FlowRecord, facts: &Arc<FlowFacts>, ports: Option<PortSet>) -> Self {
        Attempts {
            id: record.id,
            first: record.time,
            facts: facts.clone(),
            attempts: 1,
            packets: record.packets,
            bytes: record.bytes,
            last_seen: record.last_seen,
            swept_at: ports.as_ref().map(|_| Instant::now()),
            ports,
            sweep_pending: false,
        }
    }

    fn count(&self, ports: Option<PortSweep>) -> StoreOp {
        StoreOp::Count {
            id: self.id,
            packets: self.packets,
            bytes: self.bytes,
            last_seen: self.last_seen,
            attempts: self.attempts,
            ports,
        }
    }

    /// The ports to write now, if they changed and were not written within [`HOLD`] of `now`.
    fn sweep_due(&mut self, now: Instant) -> Option<PortSweep> {
        let due = self.sweep_pending && self.swept_at.is_none_or(|at| now.saturating_duration_since(at) >= HOLD);
        let sweep = self.ports.as_ref().filter(|_| due)?.sweep();
        (self.swept_at, self.sweep_pending) = (Some(now), false);
        Some(sweep)
    }

    /// Adds what a kernel key of the conversation gained (`new_attempt`: the key is a new one),
    /// to the port it tried.
    fn add(&mut self, r: &DatapathRecord, new_attempt: bool) -> StoreOp {
        self.attempts += u64::from(new_attempt);
        self.packets += r.delta_packets;
        self.bytes += r.delta_bytes;
        self.last_seen = self.last_seen.max(r.last_seen);
        if let Some(ports) = &mut self.ports {
            self.sweep_pending |= ports.insert(r.dst_port);
        }
        let ports = self.sweep_due(Instant::now());
        self.count(ports)
    }
}

/// Ports a source may try at one destination within the attempt window, each its own record with
/// its own evidence, before the ports beyond them are summarised (a scan).
pub const SCAN_RECORDED_PORTS: u32 = 16;

/// A set of ports, a bit each.
#[derive(Debug)]
struct PortSet {
    bits: Box<[u64; 1024]>,
    count: u32,
}

impl PortSet {
    fn of(port: u16) -> Self {
        let mut set = PortSet { bits: Box::new([0; 1024]), count: 0 };
        set.insert(port);
        set
    }

    /// Adds `port`; whether it is new.
    fn insert(&mut self, port: u16) -> bool {
        let (word, bit) = (usize::from(port / 64), 1u64 << (port % 64));
        let new = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        self.count += u32::from(new);
        new
    }

    fn sweep(&self) -> PortSweep {
        let mut ranges: Vec<String> = Vec::new();
        let mut open: Option<(u16, u16)> = None;
        let set_bits = self.bits.iter().enumerate().filter(|(_, word)| **word != 0).flat_map(|(index, word)| {
            (0..64u16).filter(move |bit| word & (1 << bit) != 0).map(move |bit| index as u16 * 64 + bit)
        });
        for port in set_bits {
            open = match open {
                Some((first, last)) if last + 1 == port => Some((first, port)),
                Some(range) => {
                    ranges.push(range_text(range));
                    Some((port, port))
                }
                None => Some((port, port)),
            };
        }
        ranges.extend(open.map(range_text));
        PortSweep { count: self.count, ranges: ranges.join(",") }
    }
}

fn range_text((first, last): (u16, u16)) -> String {
    if first == last { first.to_string() } else { format!("{first}-{last}") }
}

/// One source's dropped attempts at the ports of one destination within the attempt window.
#[derive(Debug)]
struct Scan {
    first: SystemTime,
    /// Ports recorded one by one (few: the ports beyond them are summarised).
    recorded: Vec<u16>,
    /// Which sides denied the summarised ports (egress, ingress): a port judged otherwise is
    /// recorded on its own.
    summary_sides: Option<(bool, bool)>,
}

/// How long a held flow waits for the drop that decides it: the kernel drops a packet within the
/// same softirq, and both events share one ring buffer, so a drop follows within microseconds
/// (one held in a queue, as for an unresolved neighbour, may come later than this).
pub const HOLD: Duration = Duration::from_millis(500);

/// A sending socket: what a packet keeps through DNAT (unlike its destination).
type Socket = (IpProtocol, IpAddr, u16);

/// Why a new flow key is held back until the kernel has had time to drop a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// It left a pod: if its packet is dropped further on (netfilter, routing, a Service without
    /// endpoints), it is that drop, not also a forwarded flow.
    Leaving,
    /// A TCP reset or an ICMP error arriving at a pod: if the packet it answers is dropped, a
    /// reject rule sent it (`rejected`), not the peer.
    Answer { rejected: bool },
}

#[derive(Debug)]
struct Held {
    key: DatapathKey,
    /// The first record with the counts of the latest one.
    record: DatapathRecord,
    waiting: Waiting,
    due: Instant,
}

/// What the correlator learned of a record beyond the record itself.
#[derive(Clone, Copy, Debug, Default)]
struct Admit {
    /// A TCP reset or ICMP error a reject rule sent, not its source.
    forged: bool,
    /// The address the packet was sent to before DNAT (a Service's ClusterIP).
    sent_to: Option<SocketAddr>,
    /// Where a packet sent to a ClusterIP went after DNAT, learned from connection tracking: a
    /// backend whose arrival this node does not see (on another node).
    backend: Option<SocketAddr>,
}

/// An ICMP destination unreachable: what a reject rule sends for other protocols.
fn is_icmp_error(r: &DatapathRecord) -> bool {
    matches!((r.protocol, r.icmp_type), (IpProtocol::Icmp, Some(3)) | (IpProtocol::Icmpv6, Some(1)))
}

/// A key whose packets reset without ever opening: what a reject rule sends. (A key first seen
/// at a drain carries the flags of all its packets so far: an opened connection that later reset
/// shows SYN too.)
fn is_reset(r: &DatapathRecord) -> bool {
    let has = |flag: &str| r.tcp_flags.as_deref().is_some_and(|flags| flags.split('|').any(|f| f == flag));
    has("RST") && !has("SYN")
}

/// Record ids: nanoseconds since the epoch of the first packet, made unique and increasing, so
/// ids sort by time and stay unique across restarts.
#[derive(Debug)]
pub struct Ids {
    last: u64,
}

impl Ids {
    pub fn after(last: u64) -> Self {
        Ids { last }
    }

    pub fn next(&mut self, time: SystemTime) -> u64 {
        let nanos = time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        self.last = nanos.max(self.last + 1);
        self.last
    }
}

pub struct Correlator {
    inventory: Arc<Inventory>,
    engines: Engines,
    node: String,
    ids: Ids,
    /// Stored records of the keys the datapath is still counting.
    active: Map<DatapathKey, Active>,
    /// Records that count the attempts of a dropped conversation, by the conversation, and scan
    /// summaries by their scan.
    attempts: Map<AttemptKey, Attempts>,
    scans: Map<AttemptKey, Scan>,
    /// Recently seen conversations, to recognise replies.
    seen: Map<Conversation, SystemTime>,
    /// Held flow keys by the socket a drop would name: a leaving flow's source, an answer's
    /// destination (an ICMP error's: its address, port 0).
    held: Map<Socket, Vec<Held>>,
    hold: Duration,
    /// Keys whose packet left a pod and was then dropped: the drop is their record, and their
    /// later counts are the drop's.
    superseded: Map<DatapathKey, SystemTime>,
    /// Entries unused for this long are forgotten (the datapath evicts idle keys sooner).
    forget_after: Duration,
    /// Where connections to ClusterIPs went, when their translated packet was not seen here.
    translations: Option<Box<dyn Translations>>,
    attempt_window: Duration,
}

/// How long after a dropped conversation's first attempt later attempts count on its record, by
/// default.
pub const ATTEMPT_WINDOW: Duration = Duration::from_secs(60);

impl Correlator {
    /// `hold`: how long a flow leaving a pod waits for a drop of its packet before it is recorded
    /// as forwarded.
    pub fn new(inventory: Arc<Inventory>, node: String, last_id: u64, forget_after: Duration, hold: Duration) -> Self {
        Correlator {
            engines: Engines::new(inventory.clone()),
            inventory,
            node,
            ids: Ids::after(last_id),
            active: Map::default(),
            attempts: Map::default(),
            scans: Map::default(),
            seen: Map::default(),
            held: Map::default(),
            hold,
            superseded: Map::default(),
            forget_after,
            translations: None,
            attempt_window: ATTEMPT_WINDOW,
        }
    }

    /// Attempts of a dropped conversation count on its record for `window` after its first; a
    /// later one starts the conversation's next record (and log line), as flow logs do per
    /// interval.
    pub fn with_attempt_window(mut self, window: Duration) -> Self {
        self.attempt_window = window;
        self
    }

    /// Asks `translations` where a flow to a ClusterIP went when its packet was neither seen
    /// arriving at a backend here nor dropped: the backend is on another node.
    pub fn with_translations(mut self, translations: Box<dyn Translations>) -> Self {
        self.translations = Some(translations);
        self
    }

    pub fn handle(&mut self, r: &DatapathRecord) -> Option<Handled> {
        let key = datapath_key(r);
        if let Some(last) = self.superseded.get_mut(&key) {
            *last = r.last_seen;
            return None;
        }
        if self.count_held(&key, r) {
            return None;
        }
        let source = (r.protocol, r.src_ip, r.src_port);
        let destination = (r.protocol, r.dst_ip, r.dst_port);
        let mut sent_to = None;
        let mut waiting = None;
        if r.protocol.policy().is_some() {
            if r.event == EventKind::Drop || (r.new_key && r.direction == Some(PacketDirection::ToPod)) {
                sent_to = self.translated(&source, r);
            }
            waiting = match (r.event, r.direction) {
                (EventKind::Drop, _) => {
                    self.decide_held(&source, Some(SocketAddr::new(r.dst_ip, r.dst_port)), r.last_seen);
                    None
                }
                (EventKind::Flow, Some(PacketDirection::FromPod)) if r.new_key => Some((Waiting::Leaving, source)),
                (EventKind::Flow, Some(PacketDirection::ToPod)) if r.new_key && sent_to.is_none() && is_reset(r) => {
                    Some((Waiting::Answer { rejected: false }, destination))
                }
                _ => None,
            };
        }
        // An ICMP error names no port outside its quoted packet: it answers a drop from its
        // destination's address.
        if r.event == EventKind::Drop {
            for icmp in [IpProtocol::Icmp, IpProtocol::Icmpv6] {
                self.decide_held(&(icmp, r.src_ip, 0), None, r.last_seen);
            }
        } else if r.new_key && r.direction == Some(PacketDirection::ToPod) && is_icmp_error(r) {
            waiting = Some((Waiting::Answer { rejected: false }, (r.protocol, r.dst_ip, 0)));
        }
        if let Some((waiting, socket)) = waiting {
            if waiting == Waiting::Leaving {
                // A reply may arrive before the hold ends: the conversation is open now.
                self.seen.insert(conversation(r), r.last_seen);
            }
            let held = Held { key, record: r.clone(), waiting, due: Instant::now() + self.hold };
            self.held.entry(socket).or_default().push(held);
            return None;
        }
        self.admit(r, Admit { sent_to, ..Admit::default() })
    }

    /// Adds a held key's new counts to it; false when `key` is not held.
    fn count_held(&mut self, key: &DatapathKey, r: &DatapathRecord) -> bool {
        let sockets =
            [(r.protocol, r.src_ip, r.src_port), (r.protocol, r.dst_ip, r.dst_port), (r.protocol, r.dst_ip, 0)];
        for socket in sockets {
            if let Some(held) = self.held.get_mut(&socket).and_then(|list| list.iter_mut().find(|h| &h.key == key)) {
                held.record.packets = r.packets;
                held.record.bytes = r.bytes;
                held.record.last_seen = r.last_seen;
                held.record.delta_packets += r.delta_packets;
                held.record.delta_bytes += r.delta_bytes;
                return true;
            }
        }
        false
    }

    /// The address a packet was sent to, when it arrives or is dropped at another (kube-proxy's
    /// DNAT of a ClusterIP, a NodePort, an external IP): the flow held as it left `socket` for
    /// that address is this packet, and is recorded here, at its destination, or as the drop. A
    /// held flow to a pod's address is not (kube-proxy translates no pod address): the kernel
    /// hands the same source port out again for other destinations, at once for a scan from
    /// closed sockets.
    fn translated(&mut self, socket: &Socket, r: &DatapathRecord) -> Option<SocketAddr> {
        let inventory = &self.inventory;
        let list = self.held.get_mut(socket)?;
        let index = list.iter().position(|h| {
            h.waiting == Waiting::Leaving
                && (h.record.dst_ip, h.record.dst_port) != (r.dst_ip, r.dst_port)
                && inventory.identify(h.record.dst_ip, h.record.dst_port, h.record.time).0.kind != EndpointKind::Pod
        })?;
        let held = list.remove(index);
        if list.is_empty() {
            self.held.remove(socket);
        }
        self.superseded.insert(held.key, r.last_seen);
        Some(SocketAddr::new(held.record.dst_ip, held.record.dst_port))
    }

    /// The kernel dropped a packet sent from `socket`: a flow held as it left is that drop, and an
    /// answer held on its way to `socket` was sent by the reject that dropped it.
    /// A flow held as it left for another address than the drop's `destination` is another
    /// packet from a reused source port (a translated one was taken by [`Self::translated`]).
    fn decide_held(&mut self, socket: &Socket, destination: Option<SocketAddr>, at: SystemTime) {
        let Some(list) = self.held.get_mut(socket) else { return };
        list.retain_mut(|held| match &mut held.waiting {
            Waiting::Leaving
                if destination.is_none_or(|d| d == SocketAddr::new(held.record.dst_ip, held.record.dst_port)) =>
            {
                self.superseded.insert(held.key.clone(), at);
                false
            }
            Waiting::Leaving => true,
            Waiting::Answer { rejected } => {
                *rejected = true;
                true
            }
        });
        if list.is_empty() {
            self.held.remove(socket);
        }
    }

    /// The held flows whose hold ended by `now` (all of them at shutdown), handled as forwarded,
    /// and the scan summaries' ports not written since they changed.
    pub fn release(&mut self, now: Instant) -> Vec<Handled> {
        let mut due = Vec::new();
        self.held.retain(|_, list| {
            list.retain(|h| {
                if h.due > now {
                    return true;
                }
                due.push((h.record.clone(), h.waiting));
                false
            });
            !list.is_empty()
        });
        due.sort_by_key(|(r, _)| r.time);
        let mut handled: Vec<Handled> = due
            .iter()
            .filter_map(|(r, waiting)| {
                let how = match waiting {
                    Waiting::Leaving => Admit { backend: self.backend(r), ..Admit::default() },
                    Waiting::Answer { rejected } => Admit { forged: *rejected, ..Admit::default() },
                };
                self.admit(r, how)
            })
            .collect();
        for totals in self.attempts.values_mut() {
            if let Some(ports) = totals.sweep_due(now) {
                let facts = totals.facts.clone();
                let op = totals.count(Some(ports));
                handled.push(Handled { op, facts, delta_packets: 0, delta_bytes: 0, evaluation: None });
            }
        }
        handled
    }

    /// Where connection tracking says a flow that left for a ClusterIP went.
    fn backend(&mut self, r: &DatapathRecord) -> Option<SocketAddr> {
        let translations = self.translations.as_mut()?;
        let (destination, _) = self.inventory.identify(r.dst_ip, r.dst_port, r.time);
        if destination.kind != EndpointKind::Service {
            return None;
        }
        translations.translated_destination(&Connection {
            protocol: r.protocol,
            source: SocketAddr::new(r.src_ip, r.src_port),
            destination: SocketAddr::new(r.dst_ip, r.dst_port),
        })
    }

    /// Turns the record of a scan's first port beyond those recorded one by one into the record
    /// that counts all of them (`sides`: which sides denied it), under the scan's key.
    fn summarise_scan(&mut self, record: &mut FlowRecord, scan: &AttemptKey, sides: Option<(bool, bool)>, port: u16) {
        record.ports = Some(PortSet::of(port).sweep());
        record.policy.summary = format!(
            "a scan: {} tried more than {SCAN_RECORDED_PORTS} ports of {} within {}, the ports beyond the first {SCAN_RECORDED_PORTS} summarised here, each judged as port {}: {}",
            endpoint_name(&record.source),
            endpoint_name(&record.destination),
            humantime::format_duration(self.attempt_window),
            record.destination.port,
            record.policy.summary
        );
        record.destination.port = 0;
        if let Some(state) = self.scans.get_mut(scan) {
            state.summary_sides = sides;
        }
    }

    /// A port a possible scan tried, recorded on its own: counted towards the scan's window (a
    /// new window once the last one is over).
    fn remember_scanned_port(&mut self, scan: &AttemptKey, r: &DatapathRecord) {
        let window = self.attempt_window;
        let state = self.scans.entry(scan.clone()).or_insert_with(|| Scan {
            first: r.time,
            recorded: Vec::new(),
            summary_sides: None,
        });
        if r.time.duration_since(state.first).unwrap_or_default() >= window {
            *state = Scan { first: r.time, recorded: Vec::new(), summary_sides: None };
        }
        if !state.recorded.contains(&r.dst_port) {
            state.recorded.push(r.dst_port);
        }
    }

    fn admit(&mut self, r: &DatapathRecord, how: Admit) -> Option<Handled> {
        let key = datapath_key(r);
        let counted = |op, facts: &Arc<FlowFacts>| Handled {
            op,
            facts: facts.clone(),
            delta_packets: r.delta_packets,
            delta_bytes: r.delta_bytes,
            evaluation: None,
        };
        if !r.new_key
            && let Some(active) = self.active.get_mut(&key)
        {
            active.last = r.last_seen;
            let op = match active.attempts.as_ref().and_then(|a| self.attempts.get_mut(a)) {
                Some(totals) => totals.add(r, false),
                None => StoreOp::Count {
                    id: active.id,
                    packets: r.packets,
                    bytes: r.bytes,
                    last_seen: r.last_seen,
                    attempts: 1,
                    ports: None,
                },
            };
            return Some(counted(op, &active.facts));
        }
        let ends = self.attempt_ends(r, &how);
        let attempt = ends.as_ref().map(|ends| self.attempt_key(r, &how, ends));
        let window = self.attempt_window;
        let joins = |totals: &&mut Attempts| r.time.duration_since(totals.first).unwrap_or_default() < window;
        if let Some(totals) = attempt.as_ref().and_then(|a| self.attempts.get_mut(a)).filter(joins) {
            let op = totals.add(r, true);
            let active = Active { id: totals.id, last: r.last_seen, facts: totals.facts.clone(), attempts: attempt };
            let handled = counted(op, &active.facts);
            self.active.insert(key, active);
            return Some(handled);
        }
        let scan = attempt.as_ref().filter(|a| a.sent_to.is_none()).map(AttemptKey::scan);
        let started = std::time::Instant::now();
        let summarising = match (&scan, &ends) {
            (Some(scan), Some(ends)) => self.summarises(scan, r, ends),
            _ => Summarises::No,
        };
        let (sides, summary_totals) = match summarising {
            Summarises::Counted { op, id, facts } => {
                let active = Active { id, last: r.last_seen, facts, attempts: scan };
                let handled = counted(op, &active.facts);
                self.active.insert(key, active);
                return Some(handled);
            }
            Summarises::Starts(sides) => (Some(sides), true),
            Summarises::No => (None, false),
        };
        let mut record = self.correlate(r, how)?;
        let evaluation = Some(started.elapsed());
        let attempt = attempt.filter(|_| record.verdict == FlowVerdict::Dropped && !record.is_reply);
        let scan = scan.filter(|_| attempt.is_some());
        let mut totals_key = attempt;
        if let (true, Some(scan)) = (summary_totals, &scan) {
            self.summarise_scan(&mut record, scan, sides, r.dst_port);
            totals_key = Some(scan.clone());
        } else if let Some(scan) = &scan {
            self.remember_scanned_port(scan, r);
        }
        let facts = Arc::new(FlowFacts::of(&record));
        if let Some(conversation) = &totals_key {
            let ports = record.ports.is_some().then(|| PortSet::of(r.dst_port));
            self.attempts.insert(conversation.clone(), Attempts::of(&record, &facts, ports));
        }
        self.active
            .insert(key, Active { id: record.id, last: r.last_seen, facts: facts.clone(), attempts: totals_key });
        if self.active.len().is_multiple_of(1024) {
            self.forget(r.last_seen);
        }
        Some(Handled {
            op: StoreOp::Insert(Box::new(record)),
            facts,
            delta_packets: r.delta_packets,
            delta_bytes: r.delta_bytes,
            evaluation,
        })
    }

    /// Whether a new drop's port belongs on its scan's summary: its source already tried
    /// [`SCAN_RECORDED_PORTS`] other ports of its destination within the window, each recorded,
    /// and this port is judged as the summary's are.
    fn summarises(&mut self, scan: &AttemptKey, r: &DatapathRecord, ends: &Ends) -> Summarises {
        let window = self.attempt_window;
        let Some(state) = self.scans.get(scan) else { return Summarises::No };
        if r.time.duration_since(state.first).unwrap_or_default() >= window
            || state.recorded.len() < SCAN_RECORDED_PORTS as usize
            || state.recorded.contains(&r.dst_port)
        {
            return Summarises::No;
        }
        let summary_sides = state.summary_sides;
        let Some(sides) = self.denied_sides(r, ends) else { return Summarises::No };
        let joins = |totals: &&mut Attempts| r.time.duration_since(totals.first).unwrap_or_default() < window;
        match (summary_sides, self.attempts.get_mut(scan).filter(joins)) {
            (Some(judged), Some(totals)) if judged == sides => {
                Summarises::Counted { op: totals.add(r, true), id: totals.id, facts: totals.facts.clone() }
            }
            (Some(_), Some(_)) => Summarises::No,
            _ => Summarises::Starts(sides),
        }
    }

    /// Which sides' policies deny a drop's flow (egress, ingress), on the engine's fast path.
    fn denied_sides(&self, r: &DatapathRecord, ends: &Ends) -> Option<(bool, bool)> {
        let snapshots: Vec<&PodSnapshot> =
            [ends.source.1.as_deref(), ends.destination.1.as_deref()].into_iter().flatten().collect();
        let flow = Flow {
            from: (&ends.source.0).into(),
            to: (&ends.destination.0).into(),
            port: r.dst_port,
            protocol: r.protocol.policy()?,
        };
        self.engines.with(&snapshots).denied_sides(&flow).ok()
    }

    /// Both ends of a new drop that is an attempt at a conversation, whose attempts are counted
    /// on one record: a dropped packet to a port, not a reply nor a reject's answer.
    fn attempt_ends(&self, r: &DatapathRecord, how: &Admit) -> Option<Ends> {
        if r.event != EventKind::Drop
            || r.protocol.policy().is_none()
            || how.forged
            || self.seen.contains_key(&reverse(r))
        {
            return None;
        }
        Some(Ends {
            source: self.inventory.identify(r.src_ip, r.src_port, r.time),
            destination: self.inventory.identify(r.dst_ip, r.dst_port, r.time),
        })
    }

    /// The conversation a new drop retries. NetworkPolicy never looks at the source port, so
    /// every attempt of the conversation has the same verdict and evidence.
    fn attempt_key(&self, r: &DatapathRecord, how: &Admit, ends: &Ends) -> AttemptKey {
        let uid = |(_, pod): &(Identity, Option<Arc<PodSnapshot>>)| pod.as_ref().map(|pod| pod.uid.clone());
        AttemptKey {
            protocol: r.protocol,
            source: r.src_ip,
            destination: SocketAddr::new(r.dst_ip, r.dst_port),
            pods: (uid(&ends.source), uid(&ends.destination)),
            sent_to: how.sent_to,
            reason: r.reason.clone(),
            location: r.location.clone(),
            generation: self.inventory.generation(),
        }
    }

    fn forget(&mut self, now: SystemTime) {
        let keep = |t: &SystemTime| now.duration_since(*t).map(|d| d < self.forget_after).unwrap_or(true);
        self.active.retain(|_, active| keep(&active.last));
        self.attempts.retain(|_, totals| keep(&totals.last_seen));
        let window = self.attempt_window;
        self.scans.retain(|_, scan| now.duration_since(scan.first).map(|d| d < window).unwrap_or(true));
        self.seen.retain(|_, last| keep(last));
        self.superseded.retain(|_, last| keep(last));
    }

    /// A new key: who, what NetworkPolicy says, and why. `None` for a key that is not a flow
    /// record of its own (a pod-to-local-pod flow leaving its source: its arrival is recorded).
    fn correlate(&mut self, r: &DatapathRecord, how: Admit) -> Option<FlowRecord> {
        let at = r.time;
        let (source, source_pod) = self.inventory.identify(r.src_ip, r.src_port, at);
        let reached = how.backend.unwrap_or(SocketAddr::new(r.dst_ip, r.dst_port));
        let (mut destination, destination_pod) = self.inventory.identify(reached.ip(), reached.port(), at);
        let sent_to = how.sent_to.or(how.backend.map(|_| SocketAddr::new(r.dst_ip, r.dst_port)));
        if let Some(sent_to) = sent_to {
            let (original, _) = self.inventory.identify(sent_to.ip(), sent_to.port(), at);
            destination.service = original.service;
        }
        let verdict = match r.event {
            EventKind::Drop => FlowVerdict::Dropped,
            EventKind::Flow => FlowVerdict::Forwarded,
        };
        if r.event == EventKind::Flow
            && how.backend.is_none()
            && r.direction == Some(PacketDirection::FromPod)
            && destination.kind == EndpointKind::Pod
            && destination.node.as_ref().is_none_or(|n| n == &self.node)
        {
            // Seen leaving its source towards a pod of this node: it is recorded when (and if)
            // it arrives; if it is dropped on the way, the drop is recorded.
            self.seen.insert(conversation(r), r.last_seen);
            return None;
        }
        // A reply, forwarded or dropped (a late packet after the peer closed), answers a
        // conversation already seen.
        let is_reply = self.seen.contains_key(&reverse(r));
        // Only forwarded traffic opens a conversation: a dropped packet has no reply to expect, a
        // reset ends one (the packet a reject answered with a reset is no reply), and a reply
        // answers one (a request released from its hold after the reply is still the request).
        if r.event == EventKind::Flow && !is_reply && !is_reset(r) {
            self.seen.insert(conversation(r), r.last_seen);
        }

        let stale = self.inventory.status().stale;
        let (policy, evidence) = if how.forged {
            let summary = format!(
                "{} a reject rule sent when it dropped the packet this answers: no reply from {}",
                if is_reset(r) { "a TCP reset" } else { "an ICMP error" },
                source.pod_key().unwrap_or_else(|| source.ip.to_string())
            );
            let attribution = Attribution::FirewallReply;
            (PolicyVerdict::unjudged(attribution, summary), None)
        } else {
            self.evaluate(r, &source, &destination, source_pod, destination_pod, is_reply)
        };
        Some(FlowRecord {
            schema: FLOW_SCHEMA,
            id: self.ids.next(at),
            time: at,
            last_seen: r.last_seen,
            node: self.node.clone(),
            verdict,
            protocol: r.protocol,
            source,
            destination,
            icmp_type: r.icmp_type,
            icmp_code: r.icmp_code,
            reason: r.reason.clone(),
            reason_class: r.reason_class,
            reason_inferred: r.reason_inferred,
            location: r.location.clone(),
            interface: r.interface.clone(),
            direction: r.direction,
            observed_at: ObservationPoint::of(r.event, r.direction, r.netns.is_some()),
            is_reply,
            packets: r.packets,
            bytes: r.bytes,
            attempts: 1,
            ports: None,
            policy,
            inventory_stale: stale,
            evidence,
        })
    }

    fn evaluate(
        &self,
        r: &DatapathRecord,
        source: &Identity,
        destination: &Identity,
        source_pod: Option<Arc<PodSnapshot>>,
        destination_pod: Option<Arc<PodSnapshot>>,
        is_reply: bool,
    ) -> (PolicyVerdict, Option<Evidence>) {
        let dropped = r.event == EventKind::Drop;
        let policy_drop = r.reason_class == Some(ReasonClass::Policy);
        if let (true, Some(service)) = (dropped && destination.kind == EndpointKind::Service, &destination.service) {
            let (namespace, name) = service.split_once('/').unwrap_or_default();
            if self.inventory.service_endpoints(namespace, name) == Some(0) {
                let summary = format!(
                    "rejected before translation: Service {service} has no endpoints (no pod matches its selector); NetworkPolicy played no part"
                );
                let attribution = Attribution::ServiceWithoutEndpoints;
                return (PolicyVerdict::unjudged(attribution, summary), None);
            }
        }
        let Some(protocol) = r.protocol.policy() else {
            let attribution = if dropped && !policy_drop {
                Attribution::DroppedByKernelForNonPolicyReason
            } else {
                Attribution::NotApplicable
            };
            let summary = format!("NetworkPolicy does not govern {}", r.protocol);
            return (PolicyVerdict::unjudged(attribution, summary), None);
        };
        if is_reply {
            let (attribution, summary) = match (dropped, policy_drop) {
                (false, _) => (Attribution::Reply, "reply within a connection already admitted".to_owned()),
                (true, false) => (
                    Attribution::DroppedByKernelForNonPolicyReason,
                    "reply within a connection already admitted, dropped by the kernel".to_owned(),
                ),
                // NetworkPolicy is stateful: replies of admitted connections are allowed.
                (true, true) => (
                    Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain,
                    "reply within a connection NetworkPolicy admitted, dropped by a firewall rule".to_owned(),
                ),
            };
            return (PolicyVerdict::unjudged(attribution, summary), None);
        }
        let snapshots: Vec<&PodSnapshot> =
            [source_pod.as_deref(), destination_pod.as_deref()].into_iter().flatten().collect();
        let engine = self.engines.with(&snapshots);
        let flow = Flow { from: source.into(), to: destination.into(), port: destination.port, protocol };
        // The responder's bundle offers the fix: the suggestion is computed once, here.
        let explanation = match explain_with_suggestion(&engine, &flow) {
            Ok(x) => x,
            Err(e) => {
                let summary = format!("not evaluated: {e}");
                let attribution = if dropped && !policy_drop {
                    Attribution::DroppedByKernelForNonPolicyReason
                } else {
                    Attribution::NotApplicable
                };
                return (PolicyVerdict::unjudged(attribution, summary), None);
            }
        };
        let verdict = attribute(&explanation, dropped, policy_drop);
        let policies = if dropped {
            let mut refs: Vec<PolicyRef> = explanation.egress.isolating_policies.clone();
            refs.extend(explanation.ingress.isolating_policies.iter().cloned());
            self.inventory.policy_objects(&refs)
        } else {
            vec![]
        };
        let evidence = Evidence { explanation, policies };
        (verdict, Some(evidence))
    }
}

/// Where a new drop's port goes: its own record, its scan's summary (counted on it), or a summary
/// it starts, judged with these sides.
enum Summarises {
    No,
    Counted { op: StoreOp, id: u64, facts: Arc<FlowFacts> },
    Starts((bool, bool)),
}

/// Both ends of a flow as the inventory knows them at its time, with their pods' snapshots.
struct Ends {
    source: (Identity, Option<Arc<PodSnapshot>>),
    destination: (Identity, Option<Arc<PodSnapshot>>),
}

fn endpoint_name(id: &Identity) -> String {
    id.pod_key().unwrap_or_else(|| id.ip.to_string())
}

fn conversation(r: &DatapathRecord) -> Conversation {
    (r.protocol, r.src_ip, r.src_port, r.dst_ip, r.dst_port)
}

fn reverse(r: &DatapathRecord) -> Conversation {
    (r.protocol, r.dst_ip, r.dst_port, r.src_ip, r.src_port)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::inventory::{Change, Kind, Object};
    use crate::policy::Verdict;
    use crate::policy::explain::MissKind;

    fn inventory() -> Arc<Inventory> {
        let inv = Inventory::new(&[], Duration::from_secs(3600));
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/course.yaml")).unwrap();
        let mut m = crate::inventory::manifests::Manifests::default();
        crate::inventory::manifests::parse_into(std::path::Path::new("course.yaml"), &text, &mut m).unwrap();
        for kind in Kind::ALL {
            let objects: Vec<Object> = m.objects.iter().filter(|o| o.kind() == kind).cloned().collect();
            inv.apply_at(Change::Replace(kind, objects), SystemTime::now() - Duration::from_secs(60));
        }
        inv
    }

    pub(super) fn raw(
        event: EventKind,
        src: &str,
        sport: u16,
        dst: &str,
        dport: u16,
        protocol: &str,
    ) -> DatapathRecord {
        let now = SystemTime::now();
        DatapathRecord {
            event,
            time: now,
            last_seen: now,
            src_ip: src.parse().unwrap(),
            dst_ip: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
            protocol: protocol.parse().unwrap(),
            icmp_type: None,
            icmp_code: None,
            reason: None,
            reason_class: None,
            reason_inferred: false,
            location: None,
            netns: None,
            direction: None,
            ifindex: 3,
            interface: Some("veth30".into()),
            packets: 1,
            bytes: 60,
            tcp_flags: None,
            overflow: false,
            new_key: true,
            delta_packets: 1,
            delta_bytes: 60,
        }
    }

    fn drop(src: &str, dst: &str, dport: u16, reason: &str, class: ReasonClass) -> DatapathRecord {
        let mut r = raw(EventKind::Drop, src, 40000, dst, dport, "TCP");
        r.reason = Some(reason.into());
        r.reason_class = Some(class);
        r.location = Some("nft_do_chain+0x3e8".into());
        r
    }

    /// The record of develop/debug's packet to production/api:`port` that netfilter dropped, with
    /// its evidence, as the correlator makes it (also for the store's tests).
    pub(crate) fn denied_record(port: u16) -> FlowRecord {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        match c.handle(&drop("10.244.0.10", "10.244.0.30", port, "NETFILTER_DROP", ReasonClass::Policy)).map(|h| h.op) {
            Some(StoreOp::Insert(record)) => *record,
            other => panic!("a drop is stored, not {other:?}"),
        }
    }

    #[test]
    fn a_netfilter_drop_of_a_denied_flow_names_both_pods_and_the_isolating_policies() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let Some(StoreOp::Insert(rec)) =
            c.handle(&drop("10.244.0.10", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy)).map(|h| h.op)
        else {
            panic!("a drop is stored")
        };
        assert_eq!(rec.source.pod_key().as_deref(), Some("develop/debug"));
        assert_eq!(rec.destination.pod_key().as_deref(), Some("production/api"));
        assert_eq!(rec.policy.attribution, Attribution::DeniedByNetworkPolicy);
        assert_eq!(rec.policy.direction, Some(PolicySides::Both));
        assert_eq!(rec.observed_at, Some(ObservationPoint::Node), "freed by the node's netfilter");
        let names: Vec<String> = rec.policy.policies.iter().map(|p| p.to_string()).collect();
        assert!(names.contains(&"production/default-deny-all".to_owned()), "{names:?}");
        assert!(names.contains(&"production/allow-from-ingress-nginx".to_owned()), "{names:?}");
        let evidence = rec.evidence.unwrap();
        assert!(evidence.policies.len() >= 4, "the policy objects in force are kept");
        assert_eq!(evidence.explanation.ingress.nearest_misses[0].kind, MissKind::PeerOnly);
    }

    #[test]
    fn a_drop_inside_a_pods_namespace_is_observed_in_the_pod() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let mut refused = drop("10.244.0.10", "10.244.0.30", 8080, "NO_SOCKET", ReasonClass::Socket);
        refused.netns = Some("cni-3f2a".into());
        let Some(StoreOp::Insert(rec)) = c.handle(&refused).map(|h| h.op) else { panic!("the drop is stored") };
        assert_eq!(rec.observed_at, Some(ObservationPoint::Pod));
    }

    #[test]
    fn other_drops_are_attributed_explicitly() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let Some(StoreOp::Insert(no_socket)) =
            c.handle(&drop("10.244.0.40", "10.244.0.30", 9999, "NO_SOCKET", ReasonClass::Socket)).map(|h| h.op)
        else {
            panic!()
        };
        assert_eq!(no_socket.policy.attribution, Attribution::DroppedByKernelForNonPolicyReason);
        let Some(StoreOp::Insert(unexplained)) =
            c.handle(&drop("10.244.0.40", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy)).map(|h| h.op)
        else {
            panic!()
        };
        assert_eq!(unexplained.policy.attribution, Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain);
        assert_eq!(unexplained.policy.verdict, Some(Verdict::Allowed));
    }

    #[test]
    fn forwarded_flows_replies_and_count_updates() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let mut leaving = raw(EventKind::Flow, "10.244.0.40", 36054, "10.244.0.30", 8080, "TCP");
        leaving.direction = Some(PacketDirection::FromPod);
        assert_eq!(c.handle(&leaving), None, "recorded on arrival instead");
        let mut arriving = leaving.clone();
        arriving.direction = Some(PacketDirection::ToPod);
        let Some(StoreOp::Insert(rec)) = c.handle(&arriving).map(|h| h.op) else { panic!() };
        assert_eq!(rec.verdict, FlowVerdict::Forwarded);
        assert_eq!(rec.policy.attribution, Attribution::AllowedByNetworkPolicy);
        assert_eq!(rec.policy.policies[0].name, "allow-from-ingress-nginx");
        let mut reply = raw(EventKind::Flow, "10.244.0.30", 8080, "10.244.0.40", 36054, "TCP");
        reply.direction = Some(PacketDirection::ToPod);
        let Some(StoreOp::Insert(rec)) = c.handle(&reply).map(|h| h.op) else { panic!() };
        assert!(rec.is_reply);
        assert_eq!(rec.policy.attribution, Attribution::Reply);
        let mut more = arriving.clone();
        more.new_key = false;
        more.packets = 9;
        assert!(matches!(c.handle(&more).map(|h| h.op), Some(StoreOp::Count { packets: 9, .. })));
    }

    #[test]
    fn attempts_from_fresh_source_ports_count_on_one_record_per_window_and_inventory() {
        let inventory = inventory();
        let mut c = Correlator::new(inventory.clone(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let attempt = |sport: u16, dport: u16| {
            let mut r = drop("10.244.0.10", "10.244.0.30", dport, "NETFILTER_DROP", ReasonClass::Policy);
            r.src_port = sport;
            r
        };
        let Some(StoreOp::Insert(first)) = c.handle(&attempt(40000, 5432)).map(|h| h.op) else { panic!() };
        assert_eq!(first.attempts, 1);
        for (sport, attempts) in [(40001, 2), (40002, 3)] {
            let handled = c.handle(&attempt(sport, 5432)).expect("counted");
            assert_eq!(handled.evaluation, None, "not judged again");
            assert_eq!(handled.delta_packets, 1, "metrics count the attempt's packet");
            let StoreOp::Count { id, packets, bytes, attempts: counted, .. } = handled.op else { panic!() };
            assert_eq!((id, packets, bytes, counted), (first.id, attempts, 60 * attempts, attempts));
        }
        // A retransmission of an attempt already counted adds its packet, not an attempt.
        let mut again = attempt(40001, 5432);
        (again.new_key, again.packets, again.bytes) = (false, 2, 120);
        let Some(StoreOp::Count { packets: 4, attempts: 3, .. }) = c.handle(&again).map(|h| h.op) else { panic!() };

        let mut next_window = attempt(40005, 5432);
        next_window.time = first.time + ATTEMPT_WINDOW;
        let Some(StoreOp::Insert(next)) = c.handle(&next_window).map(|h| h.op) else {
            panic!("an attempt a window after the first starts the next record")
        };
        let Some(StoreOp::Count { id, attempts: 2, .. }) = c.handle(&attempt(40006, 5432)).map(|h| h.op) else {
            panic!("attempts count on the latest record")
        };
        assert_eq!(id, next.id);

        let Some(StoreOp::Insert(other_port)) = c.handle(&attempt(40003, 5433)).map(|h| h.op) else {
            panic!("another port is another conversation")
        };
        assert_ne!(other_port.id, first.id);

        inventory.apply(Change::Replace(Kind::NetworkPolicy, vec![]));
        let rejudged = c.handle(&attempt(40004, 5432)).expect("handled");
        assert!(rejudged.evaluation.is_some(), "after a policy change an attempt is judged anew");
        let StoreOp::Insert(rejudged) = rejudged.op else { panic!("a new record") };
        assert_eq!(rejudged.attempts, 1);
    }

    #[test]
    fn a_scan_beyond_its_first_ports_is_one_summary_of_the_ports_judged_alike() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        // develop/debug may reach kube-system/coredns on port 53 only: develop's egress policies
        // deny every other port.
        let attempt = |sport: u16, dport: u16| {
            let mut r = drop("10.244.0.10", "10.244.0.53", dport, "NETFILTER_DROP", ReasonClass::Policy);
            r.src_port = sport;
            r
        };
        for port in 1..=SCAN_RECORDED_PORTS as u16 {
            let Some(StoreOp::Insert(r)) = c.handle(&attempt(40000 + port, port)).map(|h| h.op) else { panic!() };
            assert_eq!((r.destination.port, r.ports), (port, None), "the first ports are records of their own");
        }
        let Some(StoreOp::Insert(summary)) = c.handle(&attempt(41017, 17)).map(|h| h.op) else {
            panic!("the next port starts the scan's summary")
        };
        assert_eq!(summary.destination.port, 0);
        assert_eq!(summary.ports, Some(PortSweep { count: 1, ranges: "17".into() }));
        assert_eq!(summary.policy.attribution, Attribution::DeniedByNetworkPolicy);
        assert!(
            summary.policy.summary.starts_with("a scan: develop/debug tried more than 16 ports of kube-system/coredns"),
            "{}",
            summary.policy.summary
        );
        assert!(summary.evidence.is_some(), "the evidence of its first port");
        for port in 18..=30 {
            let handled = c.handle(&attempt(41000 + port, port)).expect("counted");
            assert_eq!(handled.evaluation, None);
            let StoreOp::Count { id, attempts, .. } = handled.op else { panic!("a new port") };
            assert_eq!((id, attempts), (summary.id, u64::from(port - 16)));
        }
        // The ports are written at most every HOLD, and once more when they changed since.
        let swept = |c: &mut Correlator, holds: u32| {
            let released = c.release(Instant::now() + HOLD * holds);
            let mut ports = released.into_iter().filter_map(|h| match h.op {
                StoreOp::Count { id, ports: Some(ports), .. } if id == summary.id => Some(ports),
                _ => None,
            });
            ports.next_back().expect("the summary's ports are written")
        };
        assert_eq!(swept(&mut c, 1), PortSweep { count: 14, ranges: "17-30".into() });
        let Some(StoreOp::Insert(allowed)) = c.handle(&attempt(42000, 53)).map(|h| h.op) else {
            panic!("a port NetworkPolicy admits is judged otherwise: a record of its own")
        };
        assert_eq!((allowed.destination.port, allowed.ports), (53, None));
        let Some(StoreOp::Count { attempts: 15, .. }) = c.handle(&attempt(42001, 40)).map(|h| h.op) else {
            panic!("the summary goes on")
        };
        let ports = swept(&mut c, 3);
        assert_eq!(ports.ranges, "17-30,40");
        assert!(ports.contains(25) && !ports.contains(31) && ports.ports().count() == 15);
        let Some(StoreOp::Count { id, .. }) = c.handle(&attempt(42002, 5)).map(|h| h.op) else { panic!() };
        assert_ne!(id, summary.id, "an attempt at a port recorded on its own counts on that port's record");
    }

    #[test]
    fn a_drop_in_the_reverse_direction_does_not_make_a_request_a_reply() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let mut late = raw(EventKind::Drop, "10.244.0.30", 8080, "10.244.0.40", 36054, "TCP");
        late.reason = Some("NO_SOCKET".into());
        late.reason_class = Some(ReasonClass::Socket);
        assert!(c.handle(&late).is_some());
        let mut request = raw(EventKind::Flow, "10.244.0.40", 36054, "10.244.0.30", 8080, "TCP");
        request.direction = Some(PacketDirection::ToPod);
        let Some(StoreOp::Insert(rec)) = c.handle(&request).map(|h| h.op) else { panic!() };
        assert!(!rec.is_reply);
        assert_eq!(rec.policy.attribution, Attribution::AllowedByNetworkPolicy);
    }

    #[test]
    fn a_late_packet_dropped_after_the_peer_closed_is_a_reply() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let mut request = raw(EventKind::Flow, "10.244.0.40", 36054, "10.244.0.30", 8080, "TCP");
        request.direction = Some(PacketDirection::ToPod);
        c.handle(&request);
        let mut late = raw(EventKind::Drop, "10.244.0.30", 8080, "10.244.0.40", 36054, "TCP");
        late.reason = Some("NO_SOCKET".into());
        late.reason_class = Some(ReasonClass::Socket);
        let Some(StoreOp::Insert(rec)) = c.handle(&late).map(|h| h.op) else { panic!() };
        assert!(rec.is_reply);
        assert_eq!(rec.policy.attribution, Attribution::DroppedByKernelForNonPolicyReason);
    }

    fn leaving(src: &str, sport: u16, dst: &str, dport: u16) -> DatapathRecord {
        let mut r = raw(EventKind::Flow, src, sport, dst, dport, "TCP");
        r.direction = Some(PacketDirection::FromPod);
        r
    }

    #[test]
    fn a_packet_that_left_a_pod_and_was_then_dropped_is_only_a_drop() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        // To the world, and to a ClusterIP that DNAT turns into production/api:8080 before the drop.
        for (sent_to, dropped_at) in
            [(("203.0.113.10", 80), ("203.0.113.10", 80)), (("10.96.0.30", 80), ("10.244.0.30", 8080))]
        {
            let out = leaving("10.244.0.10", 40000, sent_to.0, sent_to.1);
            assert_eq!(c.handle(&out), None, "held");
            let dropped = drop("10.244.0.10", dropped_at.0, dropped_at.1, "NETFILTER_DROP", ReasonClass::Policy);
            let Some(StoreOp::Insert(rec)) = c.handle(&dropped).map(|h| h.op) else { panic!("the drop is stored") };
            assert_eq!(rec.verdict, FlowVerdict::Dropped);
            let retransmitted = DatapathRecord { new_key: false, packets: 2, ..out };
            assert_eq!(c.handle(&retransmitted), None, "its counts are the drop's");
            assert!(c.release(Instant::now() + HOLD).is_empty(), "no forwarded record of {sent_to:?}");
        }
    }

    #[test]
    fn a_packet_that_left_a_pod_is_forwarded_once_the_hold_ends_with_every_count() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let out = leaving("10.244.0.40", 40001, "203.0.113.10", 80);
        assert_eq!(c.handle(&out), None);
        let more = DatapathRecord { new_key: false, packets: 3, delta_packets: 2, ..out.clone() };
        assert_eq!(c.handle(&more), None);
        // The answer arrives while the request is held: a reply all the same.
        let mut answer = raw(EventKind::Flow, "203.0.113.10", 80, "10.244.0.40", 40001, "TCP");
        answer.direction = Some(PacketDirection::ToPod);
        let Some(StoreOp::Insert(reply)) = c.handle(&answer).map(|h| h.op) else { panic!() };
        assert!(reply.is_reply);
        assert!(c.release(Instant::now()).is_empty(), "still held");
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(rec), delta_packets: 3, .. }] = released.as_slice() else {
            panic!("one forwarded record with all its packets: {released:?}")
        };
        assert_eq!((rec.verdict, rec.packets), (FlowVerdict::Forwarded, 3));
        assert!(!rec.is_reply, "the request, though its reply was recorded first");
        assert_eq!(rec.destination.ip.to_string(), "203.0.113.10");
        let counted = DatapathRecord { new_key: false, packets: 4, ..out };
        assert!(matches!(c.handle(&counted).map(|h| h.op), Some(StoreOp::Count { packets: 4, .. })));
    }

    #[test]
    fn a_reset_a_reject_rule_forged_is_not_a_reply_and_the_rejected_packet_keeps_its_verdict() {
        let mut c = Correlator::new(inventory(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let reset_to = |sport: u16| {
            let mut r = raw(EventKind::Flow, "10.244.0.30", 8080, "10.244.0.10", sport, "TCP");
            (r.direction, r.tcp_flags) = (Some(PacketDirection::ToPod), Some("RST|ACK".into()));
            r
        };
        // develop/debug's SYN leaves, the reject answers with a reset in production/api's name
        // and drops the SYN (the reset is sent first).
        assert_eq!(c.handle(&leaving("10.244.0.10", 40000, "10.244.0.30", 8080)), None);
        assert_eq!(c.handle(&reset_to(40000)), None, "held until the drop it may answer");
        let syn = drop("10.244.0.10", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy);
        let Some(StoreOp::Insert(rejected)) = c.handle(&syn).map(|h| h.op) else { panic!("the drop is stored") };
        assert!(!rejected.is_reply, "the reset opened no conversation");
        assert_eq!(rejected.policy.attribution, Attribution::DeniedByNetworkPolicy);
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(reset), .. }] = released.as_slice() else { panic!("{released:?}") };
        assert_eq!(reset.policy.attribution, Attribution::FirewallReply);
        assert!(reset.policy.summary.contains("production/api"), "{}", reset.policy.summary);

        // An ICMP error a reject rule sent from the node for another of develop/debug's packets.
        let mut unreachable = raw(EventKind::Flow, "10.244.0.1", 0, "10.244.0.10", 0, "ICMP");
        (unreachable.direction, unreachable.icmp_type, unreachable.icmp_code) =
            (Some(PacketDirection::ToPod), Some(3), Some(13));
        assert_eq!(c.handle(&unreachable), None, "held until the drop it may answer");
        let mut udp = drop("10.244.0.10", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy);
        (udp.protocol, udp.src_port) = (IpProtocol::Udp, 40005);
        assert!(c.handle(&udp).is_some());
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(error), .. }] = released.as_slice() else { panic!("{released:?}") };
        assert_eq!(error.policy.attribution, Attribution::FirewallReply);
        assert!(error.policy.summary.starts_with("an ICMP error"), "{}", error.policy.summary);

        // A reset the pod itself sent, with no drop before it, stays a reply.
        assert_eq!(c.handle(&leaving("10.244.0.10", 40001, "10.244.0.30", 8080)), None);
        assert_eq!(c.handle(&reset_to(40001)), None);
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(reset), .. }] = released.as_slice() else { panic!("{released:?}") };
        assert_eq!(reset.policy.attribution, Attribution::Reply);
    }

    /// The course's inventory with the Services of a node: kube-dns, production/api (80 to the
    /// pods' 8080) and production/payments, which selects no pod.
    fn inventory_with_services() -> Arc<Inventory> {
        let inv = inventory();
        for (namespace, name, ip, selector) in [
            ("kube-system", "kube-dns", "10.96.0.10", ("k8s-app", "kube-dns")),
            ("production", "api", "10.96.0.30", ("app", "api")),
            ("production", "payments", "10.96.0.40", ("app", "payments")),
        ] {
            let service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"clusterIP": ip, "selector": {selector.0: selector.1}}
            }))
            .unwrap();
            inv.apply(Change::Apply(Object::Service(service)));
        }
        inv
    }

    #[test]
    fn a_service_flow_is_recorded_at_its_backend_naming_the_service() {
        let mut c = Correlator::new(inventory_with_services(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        // develop/debug resolves through the kube-dns ClusterIP; kube-proxy DNATs it to coredns.
        let mut query = raw(EventKind::Flow, "10.244.0.10", 40000, "10.96.0.10", 53, "UDP");
        query.direction = Some(PacketDirection::FromPod);
        assert_eq!(c.handle(&query), None);
        let mut arrived = raw(EventKind::Flow, "10.244.0.10", 40000, "10.244.0.53", 53, "UDP");
        arrived.direction = Some(PacketDirection::ToPod);
        let Some(StoreOp::Insert(rec)) = c.handle(&arrived).map(|h| h.op) else { panic!("recorded at the backend") };
        assert_eq!(rec.destination.pod_key().as_deref(), Some("kube-system/coredns"));
        assert_eq!(rec.destination.service.as_deref(), Some("kube-system/kube-dns"));
        assert_eq!(rec.policy.attribution, Attribution::AllowedByNetworkPolicy, "judged against the backend");
        assert_eq!(rec.observed_at, Some(ObservationPoint::PodIngress));
        assert!(c.release(Instant::now() + HOLD).is_empty(), "no record of the ClusterIP as a destination");

        // A call to the api Service that production/api's ingress policy drops after DNAT.
        let mut call = raw(EventKind::Flow, "10.244.0.10", 40001, "10.96.0.30", 80, "TCP");
        call.direction = Some(PacketDirection::FromPod);
        assert_eq!(c.handle(&call), None);
        let mut denied = drop("10.244.0.10", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy);
        denied.src_port = 40001;
        let Some(StoreOp::Insert(rec)) = c.handle(&denied).map(|h| h.op) else { panic!("the drop is stored") };
        assert_eq!(rec.destination.service.as_deref(), Some("production/api"));
        assert_eq!(rec.policy.attribution, Attribution::DeniedByNetworkPolicy);
        assert!(c.release(Instant::now() + HOLD).is_empty());

        // The same source port, handed out again for another pod's address: no translation.
        let mut to_pod = raw(EventKind::Flow, "10.244.0.10", 40002, "10.244.0.30", 9000, "TCP");
        to_pod.direction = Some(PacketDirection::FromPod);
        assert_eq!(c.handle(&to_pod), None);
        let mut other = drop("10.244.0.10", "10.244.0.30", 8080, "NETFILTER_DROP", ReasonClass::Policy);
        other.src_port = 40002;
        let Some(StoreOp::Insert(rec)) = c.handle(&other).map(|h| h.op) else { panic!("the drop is stored") };
        assert_eq!((rec.destination.port, rec.destination.service), (8080, None), "not sent to port 9000");
        assert!(c.held.values().flatten().any(|h| h.record.dst_port == 9000), "still held: another packet");
    }

    /// Connection tracking as a table: the kernel's is read in the conntrack and cluster lab tests.
    struct Tracked(HashMap<Connection, SocketAddr>);

    impl Translations for Tracked {
        fn translated_destination(&mut self, connection: &Connection) -> Option<SocketAddr> {
            self.0.get(connection).copied()
        }
    }

    #[test]
    fn a_service_flow_to_a_backend_on_another_node_is_judged_against_the_backend_connection_tracking_names() {
        let query = Connection {
            protocol: IpProtocol::Udp,
            source: "10.244.0.10:40000".parse().unwrap(),
            destination: "10.96.0.10:53".parse().unwrap(),
        };
        let tracked = Tracked(HashMap::from([(query, "10.244.0.53:53".parse().unwrap())]));
        let mut c = Correlator::new(inventory_with_services(), "lab".into(), 0, Duration::from_secs(300), HOLD)
            .with_translations(Box::new(tracked));
        let mut leaving = raw(EventKind::Flow, "10.244.0.10", 40000, "10.96.0.10", 53, "UDP");
        leaving.direction = Some(PacketDirection::FromPod);
        assert_eq!(c.handle(&leaving), None, "held for its arrival or drop");
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(rec), .. }] = released.as_slice() else { panic!("{released:?}") };
        assert_eq!(rec.destination.pod_key().as_deref(), Some("kube-system/coredns"));
        assert_eq!((rec.destination.ip, rec.destination.port), ("10.244.0.53".parse().unwrap(), 53));
        assert_eq!(rec.destination.service.as_deref(), Some("kube-system/kube-dns"));
        assert_eq!(rec.policy.attribution, Attribution::AllowedByNetworkPolicy, "judged against the backend");
        assert_eq!(rec.observed_at, Some(ObservationPoint::PodEgress), "seen only as it left its pod");
        let id = rec.id;

        leaving.new_key = false;
        leaving.packets = 2;
        let Some(StoreOp::Count { id: counted, packets: 2, .. }) = c.handle(&leaving).map(|h| h.op) else {
            panic!("later packets count on the record")
        };
        assert_eq!(counted, id);

        let mut untracked = raw(EventKind::Flow, "10.244.0.10", 40001, "10.96.0.30", 80, "TCP");
        untracked.direction = Some(PacketDirection::FromPod);
        c.handle(&untracked);
        let released = c.release(Instant::now() + HOLD);
        let [Handled { op: StoreOp::Insert(rec), .. }] = released.as_slice() else { panic!("{released:?}") };
        assert_eq!(rec.destination.kind, EndpointKind::Service, "no entry: the ClusterIP is all that is known");
    }

    #[test]
    fn a_reject_of_a_service_without_endpoints_is_not_network_policy() {
        let mut c = Correlator::new(inventory_with_services(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let rejected = drop("10.244.0.40", "10.96.0.40", 80, "NETFILTER_DROP", ReasonClass::Policy);
        let Some(StoreOp::Insert(rec)) = c.handle(&rejected).map(|h| h.op) else { panic!() };
        assert_eq!(rec.policy.attribution, Attribution::ServiceWithoutEndpoints);
        assert!(rec.policy.policies.is_empty() && rec.policy.summary.contains("production/payments"));
        let to_api = drop("10.244.0.40", "10.96.0.30", 80, "NETFILTER_DROP", ReasonClass::Policy);
        let Some(StoreOp::Insert(rec)) = c.handle(&to_api).map(|h| h.op) else { panic!() };
        assert_ne!(rec.policy.attribution, Attribution::ServiceWithoutEndpoints, "api has a pod");
    }

    #[test]
    fn ids_increase_with_time_and_stay_unique() {
        let mut ids = Ids::after(0);
        let t = UNIX_EPOCH + Duration::from_secs(100);
        let a = ids.next(t);
        let b = ids.next(t);
        assert!(b > a);
        let mut restarted = Ids::after(b);
        assert!(restarted.next(t) > b);
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;
    use crate::inventory::{Change, Kind, Object};

    fn pod(name: &str, uid: &str, ip: &str) -> Object {
        Object::Pod(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": name}},
                "status": {"podIP": ip}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_drop_stamped_while_pod_a_held_the_address_names_a_after_b_took_it() {
        let inv = Inventory::new(&[Kind::Pod], Duration::from_secs(3600));
        let t0 = SystemTime::now() - Duration::from_secs(600);
        inv.apply_at(Change::Replace(Kind::Pod, vec![pod("cart", "uid-a", "10.3.0.9")]), t0);
        inv.apply_at(Change::Delete(pod("cart", "uid-a", "10.3.0.9")), t0 + Duration::from_secs(100));
        inv.apply_at(Change::Apply(pod("search", "uid-b", "10.3.0.9")), t0 + Duration::from_secs(110));
        let mut c = Correlator::new(inv, "n".into(), 0, Duration::from_secs(300), Duration::ZERO);
        let at = t0 + Duration::from_secs(50);
        let mut r = super::tests::raw(EventKind::Drop, "10.3.0.9", 1234, "203.0.113.1", 443, "TCP");
        (r.time, r.last_seen) = (at, at);
        r.reason = Some("NETFILTER_DROP".into());
        r.reason_class = Some(ReasonClass::Policy);
        let Some(StoreOp::Insert(record)) = c.handle(&r).map(|h| h.op) else { panic!("stored") };
        assert_eq!(record.source.pod.as_deref(), Some("cart"), "the pod that held the address at the time");
        assert_eq!(record.source.labels.unwrap()["app"], "cart");
        let later = DatapathRecord { time: SystemTime::now(), last_seen: SystemTime::now(), src_port: 1235, ..r };
        let Some(StoreOp::Insert(record)) = c.handle(&later).map(|h| h.op) else { panic!("stored") };
        assert_eq!(record.source.pod.as_deref(), Some("search"));
    }
}
