//! Types that cross the kernel/user boundary. Everything here is `#[repr(C)]`, has no padding the
//! compiler could fill with garbage (explicit `_pad` fields instead), and is valid for any bit
//! pattern, so user space can read it straight out of a map or the ring buffer.
#![no_std]

/// Addresses are 16 bytes; IPv4 uses the IPv4-mapped form `::ffff:a.b.c.d` so one key type
/// covers both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Host byte order. Zero for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    /// ICMP/ICMPv6 type and code; zero for other protocols.
    pub icmp_type: u8,
    pub icmp_code: u8,
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// One kernel drop site for one flow: the aggregation key of the drop map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub tuple: FlowTuple,
    /// The kernel's `enum skb_drop_reason` value (names are resolved from the running kernel), or
    /// [`REASON_NONE`] on kernels that pass no reason (before 5.17).
    pub reason: u32,
    /// Inode number of the network namespace of the packet's device (0: no device).
    pub netns: u32,
    /// Kernel address of the code that freed the packet (symbolised from /proc/kallsyms).
    pub location: u64,
}

/// Packets seen at a tc hook, per 5-tuple and direction: the aggregation key of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub tuple: FlowTuple,
    /// [`DIRECTION_FROM_POD`] or [`DIRECTION_TO_POD`].
    pub direction: u8,
    pub _pad: [u8; 7],
}

/// tc ingress of a host-side veth: the packet leaves the pod.
pub const DIRECTION_FROM_POD: u8 = 1;
/// tc egress of a host-side veth: the packet enters the pod.
pub const DIRECTION_TO_POD: u8 = 2;

/// Per-CPU counters for one key; user space sums them over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the first and last packet on this CPU.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Interface index of the last packet.
    pub ifindex: u32,
    /// OR of every TCP flag byte seen (flows only).
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
}

/// What a ring-buffer record announces.
pub const EVENT_DROP: u8 = 1;
pub const EVENT_FLOW: u8 = 2;

/// A key was inserted into its map, the first since user space last drained the maps (which reads
/// every key): it brings the next drain forward. Later new keys are not announced until user space
/// clears [`NEW_KEYS_PENDING`], so a storm of new keys costs the ring buffer a record per drain, not
/// one per key.
pub const EVENT_FLAG_NEW_KEY: u8 = 1;

/// Index of the one slot of the `NEW_KEYS` array: non-zero while a new key has been announced and
/// the maps not drained since.
pub const NEW_KEYS_PENDING: u32 = 0;
/// The map was full: the key is not in the map, and this record is the only trace of the packet.
pub const EVENT_FLAG_MAP_FULL: u8 = 2;

/// A ring-buffer record. Sent only when new keys wait for a drain or a key cannot be stored, so a
/// flood of identical packets costs user space one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u8,
    pub flags: u8,
    /// Flows only: [`DIRECTION_FROM_POD`] or [`DIRECTION_TO_POD`].
    pub direction: u8,
    pub tcp_flags: u8,
    pub ifindex: u32,
    pub tuple: FlowTuple,
    /// Drops only.
    pub reason: u32,
    /// Length of the packet in bytes.
    pub len: u32,
    /// Drops only.
    pub location: u64,
    pub timestamp_ns: u64,
    /// Drops only: as [`DropKey::netns`].
    pub netns: u32,
    pub _pad: u32,
}

/// Indexes of the loss counters (a per-CPU array). Every way a packet can go unrecorded has one.
pub const LOSS_RINGBUF_FULL: u32 = 0;
pub const LOSS_DROP_MAP_FULL: u32 = 1;
pub const LOSS_FLOW_MAP_FULL: u32 = 2;
/// A packet whose headers could not be read (truncated, or not IP).
pub const LOSS_UNPARSED: u32 = 3;
pub const LOSS_COUNTERS: u32 = 4;

/// Offsets into kernel structures, read from the running kernel's BTF by user space and handed to
/// the programs as a global, so no layout is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub skb_iif: u32,
    pub net_device_ifindex: u32,
    /// `sk_buff.protocol`, the ethertype in network byte order.
    pub skb_protocol: u32,
    /// `net_device.nd_net.net`, the device's `struct net *`.
    pub net_device_net: u32,
    /// `net.ns.inum`, the namespace's inode number.
    pub net_inum: u32,
}

/// The drop reason of kernels that give none: outside the filter array, so never filtered.
pub const REASON_NONE: u32 = u32::MAX;

/// Size of the reason filter array: larger than any `enum skb_drop_reason` so far (128 on 6.18).
pub const MAX_DROP_REASONS: u32 = 512;

/// Every dropped IP packet by cause, whatever became of its detail (a full map, a filtered
/// reason, headers that could not be read): a per-CPU array indexed by the reason, with one slot
/// more for drops without a reason (before 5.17) or beyond [`MAX_DROP_REASONS`].
pub const DROP_TOTAL_SLOTS: u32 = MAX_DROP_REASONS + 1;
pub const DROP_TOTAL_NO_REASON: u32 = MAX_DROP_REASONS;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropTotal {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for FlowTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DropKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DropTotal {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The layouts are shared with the kernel: a size change must be deliberate.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowTuple>(), 40);
        assert_eq!(size_of::<DropKey>(), 56);
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(size_of::<Counters>(), 40);
        assert_eq!(size_of::<Event>(), 80);
        assert_eq!(size_of::<KernelOffsets>(), 40);
        assert_eq!(size_of::<DropTotal>(), 16);
    }
}
