//! Program entry points, maps and the aggregation logic.
//!
//! Everything a program calls is `#[inline(always)]`, so each program is one function: Linux 6.1
//! and 5.10 refuse a called function that takes a pointer argument ("reg type unsupported for
//! arg#0"), and add each call frame's stack rounded up to 32 bytes against the 512-byte limit.

// `Atomic*::fetch_add` needs compare-and-swap, which BPF lacks; the intrinsic with its result
// unused is the XADD instruction.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{__sk_buff, BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, classifier, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, TcContext},
};
use aya_log_ebpf::debug;
use netiso_common::{
    Counters, DIRECTION_FROM_POD, DIRECTION_TO_POD, DROP_TOTAL_NO_REASON, DROP_TOTAL_SLOTS, DropKey, DropTotal,
    EVENT_DROP, EVENT_FLAG_MAP_FULL, EVENT_FLAG_NEW_KEY, EVENT_FLOW, Event, FlowKey, KernelOffsets, LOSS_COUNTERS,
    LOSS_DROP_MAP_FULL, LOSS_FLOW_MAP_FULL, LOSS_RINGBUF_FULL, LOSS_UNPARSED, MAX_DROP_REASONS, NEW_KEYS_PENDING,
    REASON_NONE,
};

use crate::headers::{ETH_P_IP, ETH_P_IPV6, HeaderSource, Parsed, parse_ip};

/// Set by user space from the running kernel's BTF before loading.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    skb_head: 0,
    skb_len: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_dev: 0,
    skb_iif: 0,
    net_device_ifindex: 0,
    skb_protocol: 0,
    net_device_net: 0,
    net_inum: 0,
});

/// Whether the kernel has `bpf_ktime_get_coarse_ns` (from 5.11); set by user space before
/// loading. The verifier reads the frozen value and never visits the branch not taken, so the
/// programs load where the helper does not exist.
#[unsafe(no_mangle)]
static COARSE_CLOCK: Global<u8> = Global::new(1);

/// Sizes are defaults; user space sets them at load time. Drops are few per key and a scan brings
/// a key per port: their map is shared by the CPUs (its memory does not grow with their number),
/// while forwarded flows, a packet path, count per CPU without atomics.
#[map]
static DROPS: HashMap<DropKey, Counters> = HashMap::with_max_entries(32768, 0);
#[map]
static FLOWS: PerCpuHashMap<FlowKey, Counters> = PerCpuHashMap::with_max_entries(65536, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// Non-zero at index `reason` keeps drops with that `enum skb_drop_reason`; written by user space.
#[map]
static DROP_REASON_FILTER: Array<u8> = Array::with_max_entries(MAX_DROP_REASONS, 0);
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_COUNTERS, 0);
/// Whether a new key was announced since user space last drained the maps; cleared by it.
#[map]
static NEW_KEYS: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static DROP_TOTALS: PerCpuArray<DropTotal> = PerCpuArray::with_max_entries(DROP_TOTAL_SLOTS, 0);

const EEXIST: i32 = 17;
/// `skb->network_header` when unset (`(typeof(skb->network_header))~0U`).
const HEADER_UNSET: u16 = 0xffff;

/// Counts a packet the programs could not record in full. The first such packet of each cause on
/// a CPU, and each time that count doubles, is also logged, so the cause shows without a line per
/// packet in a flood.
#[inline(always)]
fn count_loss(index: u32) {
    let Some(counter) = LOSSES.get_ptr_mut(index) else { return };
    // SAFETY: a per-CPU array slot is only written by this CPU, and programs do not nest on one
    // CPU for these hooks, so the increment cannot race.
    let count = unsafe {
        *counter += 1;
        *counter
    };
    if count.is_power_of_two() {
        log_loss(index, count);
    }
}

/// The log line of a loss (aya-log, debug level). User space sets the level before loading; with
/// logging off the verifier prunes the log code. Not inlined: one copy per program, verified once
/// rather than at each call site (which made Linux 5.10 and 6.1 take too long to verify), and its
/// arguments are scalars, which those kernels accept in a called function. aya-log's macros take a
/// program context they do not use; this function has none to give.
#[inline(never)]
fn log_loss(index: u32, count: u64) {
    match index {
        LOSS_RINGBUF_FULL => debug!(&(), "ring buffer full: new keys not announced ({} on this CPU)", count),
        LOSS_DROP_MAP_FULL => {
            debug!(&(), "drop map full: drops of new keys recorded one by one ({} on this CPU)", count)
        }
        LOSS_FLOW_MAP_FULL => {
            debug!(&(), "flow map full: packets of new flows recorded one by one ({} on this CPU)", count)
        }
        _ => debug!(&(), "IP packet not parsed: headers unset or cut short ({} on this CPU)", count),
    }
}

/// First sightings are rare and order flows (a reply must sort after its request), so they get
/// the precise clock even where later packets use the coarse one.
#[inline(always)]
fn precise_now() -> u64 {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Flows need first/last seen to a tick, not a nanosecond; the coarse clock (the same
/// CLOCK_MONOTONIC base) is several times cheaper on the per-packet path.
#[inline(always)]
fn coarse_now() -> u64 {
    if COARSE_CLOCK.load() != 0 {
        // SAFETY: a helper without preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        precise_now()
    }
}

/// What one packet adds to its key's counters.
#[derive(Clone, Copy)]
struct Sample {
    now: u64,
    len: u32,
    ifindex: u32,
    tcp_flags: u8,
}

/// A map of counters by key, as [`record`] uses it.
trait CounterMap<K> {
    fn counters(&self, key: &K) -> Option<*mut Counters>;
    fn insert(&self, key: &K, first: &Counters) -> Result<(), i32>;
    /// Adds a packet to counters found in this map.
    fn add(counters: *mut Counters, sample: Sample);
}

impl<K> CounterMap<K> for PerCpuHashMap<K, Counters> {
    #[inline(always)]
    fn counters(&self, key: &K) -> Option<*mut Counters> {
        self.get_ptr_mut(key)
    }

    #[inline(always)]
    fn insert(&self, key: &K, first: &Counters) -> Result<(), i32> {
        PerCpuHashMap::insert(self, key, first, BPF_NOEXIST as u64)
    }

    #[inline(always)]
    fn add(counters: *mut Counters, sample: Sample) {
        // SAFETY: `counters` points at this CPU's slot of a per-CPU hash entry, which only this
        // CPU writes (see `count_loss`).
        let c = unsafe { &mut *counters };
        if c.packets == 0 {
            c.first_seen_ns = precise_now();
        }
        c.packets += 1;
        c.bytes += sample.len as u64;
        c.last_seen_ns = sample.now;
        c.ifindex = sample.ifindex;
        c.tcp_flags |= sample.tcp_flags;
    }
}

impl<K> CounterMap<K> for HashMap<K, Counters> {
    #[inline(always)]
    fn counters(&self, key: &K) -> Option<*mut Counters> {
        self.get_ptr_mut(key)
    }

    #[inline(always)]
    fn insert(&self, key: &K, first: &Counters) -> Result<(), i32> {
        HashMap::insert(self, key, first, BPF_NOEXIST as u64)
    }

    #[inline(always)]
    fn add(counters: *mut Counters, sample: Sample) {
        // SAFETY: `counters` points at an entry of a hash map, valid for this program run, that
        // other CPUs may update at the same time: the counts are added atomically (an XADD, which
        // every supported kernel has); the last-seen time, interface and flags are plain stores,
        // the last writer's, and a flag a racing CPU set may be missed.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).bytes, sample.len as u64);
            (*counters).last_seen_ns = sample.now;
            (*counters).ifindex = sample.ifindex;
            (*counters).tcp_flags |= sample.tcp_flags;
        }
    }
}

/// Whether a new key is the first since user space last drained the maps, to be announced. CPUs
/// racing here may both announce one: user space drains once for both.
#[inline(always)]
fn first_new_key() -> bool {
    let Some(pending) = NEW_KEYS.get_ptr_mut(NEW_KEYS_PENDING) else { return true };
    // SAFETY: a valid slot of an array map; a racing write stores the same value.
    unsafe {
        if *pending != 0 {
            return false;
        }
        *pending = 1;
    }
    true
}

/// Counts one packet under `key`: in place when the key exists (the fast path, which builds no
/// event), otherwise by inserting it, announcing on the ring buffer the first new key since the
/// last drain. When the map is full the ring-buffer record is the only trace of the packet, and
/// the loss is counted either way.
#[inline(always)]
fn record<K, M: CounterMap<K>>(map: &M, key: &K, sample: Sample, map_full_loss: u32, event: impl FnOnce(u8) -> Event) {
    if let Some(counters) = map.counters(key) {
        M::add(counters, sample);
        return;
    }
    let first = Counters {
        packets: 1,
        bytes: sample.len as u64,
        first_seen_ns: precise_now(),
        last_seen_ns: sample.now,
        ifindex: sample.ifindex,
        tcp_flags: sample.tcp_flags,
        _pad: [0; 3],
    };
    let flags = match map.insert(key, &first) {
        Ok(()) if first_new_key() => EVENT_FLAG_NEW_KEY,
        Ok(()) => return,
        // Another CPU inserted the key between our lookup and insert.
        Err(e) if e == -EEXIST => {
            if let Some(counters) = map.counters(key) {
                M::add(counters, sample);
            }
            return;
        }
        Err(_) => {
            count_loss(map_full_loss);
            EVENT_FLAG_MAP_FULL
        }
    };
    if EVENTS.output(&event(flags), 0).is_err() {
        count_loss(LOSS_RINGBUF_FULL);
    }
}

// ---- drops: tp_btf/kfree_skb ----
//
// The BTF-typed tracepoint passes the tracepoint's arguments by position, and kernels only ever
// append to them: (skb, location) before 5.17, + reason from 5.17, + rx_sk from 6.11. Reading an
// argument the kernel does not pass is refused by the verifier, so there are two programs; user
// space loads the one that matches the argument count in the running kernel's BTF.

struct KernelMemory(u64);

impl HeaderSource for KernelMemory {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly on a bad one.
        unsafe { bpf_probe_read_kernel((self.0 + offset as u64) as *const [u8; N]).ok() }
    }

    fn read_into<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> Option<()> {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel_buf((self.0 + offset as u64) as *const u8, out).ok() }
    }
}

#[inline(always)]
fn read_kernel<T>(addr: u64) -> Option<T> {
    // SAFETY: as above; `T` is a plain integer at every call site.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// For kernels from 5.17: `kfree_skb(skb, location, reason, ...)`.
#[btf_tracepoint(function = "kfree_skb")]
fn netiso_drop(ctx: BtfTracePointContext) -> i32 {
    let _ = record_drop(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

/// For kernels before 5.17, which pass no reason: `kfree_skb(skb, location)`.
#[btf_tracepoint(function = "kfree_skb")]
fn netiso_drop_loc(ctx: BtfTracePointContext) -> i32 {
    let _ = record_drop(ctx.arg(0), ctx.arg(1), REASON_NONE);
    0
}

/// Adds a dropped packet to its cause's total: one slot of a per-CPU array, which no flood can
/// fill.
#[inline(always)]
fn count_drop(reason: u32, len: u32) {
    let slot = if reason < DROP_TOTAL_NO_REASON { reason } else { DROP_TOTAL_NO_REASON };
    let Some(total) = DROP_TOTALS.get_ptr_mut(slot) else { return };
    // SAFETY: this CPU's slot of a per-CPU array, only written by this CPU (see `count_loss`).
    let total = unsafe { &mut *total };
    total.packets += 1;
    total.bytes += len as u64;
}

#[inline(always)]
fn record_drop(skb: u64, location: u64, reason: u32) -> Option<()> {
    let off = OFFSETS.load();
    let protocol = u16::from_be(read_kernel(skb + off.skb_protocol as u64)?);
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return None;
    }
    let len: u32 = read_kernel(skb + off.skb_len as u64).unwrap_or(0);
    count_drop(reason, len);
    if let Some(keep) = DROP_REASON_FILTER.get(reason)
        && *keep == 0
    {
        return None;
    }
    let head: u64 = read_kernel(skb + off.skb_head as u64)?;
    let network_header: u16 = read_kernel(skb + off.skb_network_header as u64)?;
    if network_header == HEADER_UNSET || head == 0 {
        count_loss(LOSS_UNPARSED);
        return None;
    }
    let Some(Parsed { tuple, tcp_flags }) = parse_ip(&KernelMemory(head), protocol, network_header as usize) else {
        count_loss(LOSS_UNPARSED);
        return None;
    };
    let dev: u64 = read_kernel(skb + off.skb_dev as u64).unwrap_or(0);
    // The tracepoint fires for every namespace on the host: the device's namespace tells which.
    let (ifindex, netns): (u32, u32) = if dev != 0 {
        let net: u64 = read_kernel(dev + off.net_device_net as u64).unwrap_or(0);
        let netns = if net != 0 { read_kernel(net + off.net_inum as u64).unwrap_or(0) } else { 0 };
        (read_kernel(dev + off.net_device_ifindex as u64).unwrap_or(0), netns)
    } else {
        (read_kernel(skb + off.skb_iif as u64).unwrap_or(0), 0)
    };
    let key = DropKey { tuple, reason, netns, location };
    // SAFETY: a helper without preconditions.
    let sample = Sample { now: unsafe { bpf_ktime_get_ns() }, len, ifindex, tcp_flags };
    record(&DROPS, &key, sample, LOSS_DROP_MAP_FULL, |flags| Event {
        kind: EVENT_DROP,
        flags,
        direction: 0,
        tcp_flags,
        ifindex,
        tuple,
        reason,
        len,
        location,
        timestamp_ns: sample.now,
        netns,
        _pad: 0,
    });
    Some(())
}

// ---- allowed flows: tc on pod-facing interfaces ----

struct Packet<'a>(&'a TcContext);

impl HeaderSource for Packet<'_> {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Direct packet access avoids a helper call per header; headers beyond the linear
        // part of the buffer fall back to bpf_skb_load_bytes.
        let start = self.0.data() + offset;
        if start + N <= self.0.data_end() {
            // SAFETY: the verifier-checked bound above keeps the N bytes inside the packet.
            return Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) });
        }
        self.0.load(offset).ok()
    }

    fn read_into<const N: usize>(&self, offset: usize, out: &mut [u8; N]) -> Option<()> {
        let start = self.0.data() + offset;
        if start + N <= self.0.data_end() {
            // SAFETY: as in `read`.
            *out = unsafe { core::ptr::read_unaligned(start as *const [u8; N]) };
            return Some(());
        }
        // `load` passes the helper a constant size; Linux 6.1 and 5.10 refuse `load_bytes`,
        // whose size the verifier cannot prove non-zero.
        *out = self.0.load(offset).ok()?;
        Some(())
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_8021Q: u16 = 0x8100;

#[classifier]
fn netiso_from_pod(ctx: TcContext) -> i32 {
    observe(&ctx, DIRECTION_FROM_POD);
    TC_ACT_UNSPEC
}

#[classifier]
fn netiso_to_pod(ctx: TcContext) -> i32 {
    observe(&ctx, DIRECTION_TO_POD);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) {
    let packet = Packet(ctx);
    let Some(eth) = packet.read::<{ ETH_HLEN + 4 }>(0) else {
        return;
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be_bytes([eth[16], eth[17]]);
        l3 += 4;
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return;
    }
    let Some(Parsed { tuple, tcp_flags }) = parse_ip(&packet, ethertype, l3) else {
        count_loss(LOSS_UNPARSED);
        return;
    };
    let key = FlowKey { tuple, direction, _pad: [0; 7] };
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: `skb` is the valid `__sk_buff` the program was called with.
    let (len, ifindex) = unsafe { ((*skb).len, (*skb).ifindex) };
    let sample = Sample { now: coarse_now(), len, ifindex, tcp_flags };
    record(&FLOWS, &key, sample, LOSS_FLOW_MAP_FULL, |flags| Event {
        kind: EVENT_FLOW,
        flags,
        direction,
        tcp_flags,
        ifindex,
        tuple,
        reason: 0,
        len,
        location: 0,
        timestamp_ns: sample.now,
        netns: 0,
        _pad: 0,
    });
}
