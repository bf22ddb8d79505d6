//! The policy engine: exact `networking.k8s.io/v1` NetworkPolicy semantics with explanations.
//! Pure: no I/O, no clocks, no globals, so it is tested and benchmarked directly.

pub mod compile;
pub mod engine;
pub mod model;
pub mod render;
pub mod selector;
pub mod suggest;
pub mod whatif;

pub use compile::{PolicyError, PolicyRef};
pub use engine::{
    Clause, ClausePeer, ClausePort, Direction, Endpoint, EngineError, Explanation, PolicyEngine, Verdict,
};
pub use model::{ClusterState, ContainerPort, EndpointRef, Flow, Labels, NamespaceInfo, PodInfo, Protocol};
#[cfg(test)]
mod tests;
