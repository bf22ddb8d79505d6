//! Evidence: flow records built from datapath events and the inventory, and kept on the node.

pub mod attribution;
pub mod correlate;
pub mod engines;
pub mod filter;
pub mod record;
pub mod store;

#[cfg(test)]
pub(crate) mod tests;
