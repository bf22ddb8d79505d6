//! netiso: a per-node eBPF flow observer that names the NetworkPolicy behind every drop.
//!
//! The data path reads in module order: `datapath` (kernel events) → `inventory` (who is on each
//! end) → `policy` (which NetworkPolicy decides) → `evidence` (records kept on the node) →
//! `export` (logs, metrics, API). `cluster` is the vocabulary below them all; `daemon` wires the
//! stages into the node daemon.

pub mod cluster;
pub mod datapath;
pub mod evidence;
pub mod export;
pub mod inventory;
pub mod policy;

pub mod daemon;

pub mod cli;
