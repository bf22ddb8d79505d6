//! Who is on each end of a flow: namespaces, pods and policies, from manifests or the API.

pub mod manifests;
