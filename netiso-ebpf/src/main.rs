//! netiso's kernel programs. Both only observe: the tracepoint cannot change anything, and the tc
//! programs always return `TC_ACT_UNSPEC` (TCX_NEXT), which leaves the verdict to whatever runs
//! after them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod headers;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this point, so it never runs.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The host build of the workspace compiles this crate too; only the bpf target has programs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
