//! netiso's developer tooling: the local lab (the course scenario in network namespaces, with
//! NetworkPolicies enforced by nftables), its traffic probes, the benchmark driver, the datapath
//! suite in VMs of other kernels, the image and the DaemonSet's container run from it, and the
//! removal of what a killed run leaves behind.

pub mod bench;
pub mod build;
pub mod demo;
pub mod image;
pub mod lab;
pub mod leftovers;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod sh;
pub mod storm;
pub mod vm;
