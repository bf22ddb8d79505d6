//! Builds the eBPF programs (netiso-ebpf) for the bpf target and places the object in OUT_DIR,
//! where `datapath` embeds it.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "netiso-ebpf")
        .ok_or_else(|| anyhow!("netiso-ebpf is not in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("netiso-ebpf has no directory"))?.as_str();
    // The workspace pins one stable toolchain; `-Z build-std=core` for the bpf target needs
    // RUSTC_BOOTSTRAP=1, set here so it reaches only the nested eBPF build, never the userspace crates.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain =
        std::env::var("RUSTUP_TOOLCHAIN").context("RUSTUP_TOOLCHAIN is not set: build with rustup's cargo")?;
    aya_build::build_ebpf(
        [Package { name: "netiso-ebpf", root_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}
