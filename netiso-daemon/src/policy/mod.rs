//! The policy engine: exact `networking.k8s.io/v1` NetworkPolicy semantics with explanations.
//! Pure: no I/O, no clocks, no globals, so it is tested and benchmarked directly.

pub mod clauses;
pub mod compile;
pub mod engine;
pub mod explain;
pub mod model;
pub mod render;
pub mod selector;
pub mod suggest;
pub mod whatif;

pub use clauses::{Clause, ClausePeer, ClausePort};
pub use compile::{PolicyError, PolicyRef};
pub use engine::{Direction, Endpoint, EngineError, PolicyEngine, Verdict};
pub use explain::Explanation;
pub use model::{ClusterState, ContainerPort, EndpointRef, Flow, Labels, NamespaceInfo, PodInfo, Protocol};
#[cfg(test)]
mod tests;
