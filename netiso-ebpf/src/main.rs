//! netiso's kernel programs. Both only observe: the tracepoint cannot change anything, and the tc
//! programs always return `TC_ACT_UNSPEC` (TCX_NEXT), which leaves the verdict to whatever runs
//! after them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The atomic add of the shared drop map's counters (see `programs`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

// The parser is plain Rust over a `HeaderSource`: its unit tests run on the host, over byte slices.
#[cfg(any(target_arch = "bpf", test))]
mod headers;
#[cfg(target_arch = "bpf")]
mod programs;

/// The kernel lets only programs under a GPL-compatible license call GPL-only helpers, such as
/// `bpf_probe_read_kernel` in the drop tracepoint; the programs are MIT or GPL-2.0 (Cargo.toml).
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A loop, not `unreachable_unchecked`: LLVM must keep every path that can panic (a bounds
    // check it could not prove), so that the verifier sees it and refuses the program (it refuses
    // such a loop) instead of loading one whose checks were deleted.
    loop {
        core::hint::spin_loop();
    }
}

/// The host build of the workspace compiles this crate too; only the bpf target has programs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
