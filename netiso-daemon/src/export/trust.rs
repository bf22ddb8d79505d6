//! Publishing the CA of the API's generated certificate, so that `netiso observe --kube` can
//! verify every daemon without trust handed out by hand: each daemon writes its CA under its node's
//! name into one ConfigMap (`netiso-api-ca`, created with the DaemonSet), which clients read
//! through the API server as they read `kube-root-ca.crt`. Keys of nodes the cluster no longer has
//! are removed, so the ConfigMap stays within its size limit as nodes come and go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::inventory::Inventory;

/// The ConfigMap `--kube` clients read, in the netiso pods' namespace.
pub const CONFIGMAP: &str = "netiso-api-ca";

/// How often a published CA is checked again (restored if the ConfigMap lost it).
const RECHECK: Duration = Duration::from_secs(600);
/// Retries after a failure start here and double up to `RECHECK`.
const FIRST_RETRY: Duration = Duration::from_secs(2);

/// Where the CA goes: a ConfigMap, as `NAME` (in the client's default namespace, the pod's own
/// in a cluster) or `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub namespace: Option<String>,
    pub name: String,
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (namespace, name) = match text.split_once('/') {
            Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
            None => (None, text.to_owned()),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !valid(&name) || namespace.as_deref().is_some_and(|ns| !valid(ns)) {
            return Err(format!("`{text}` is not a ConfigMap name (NAME or NAMESPACE/NAME, lowercase)"));
        }
        Ok(Target { namespace, name })
    }
}

/// The merge patch that publishes `pem` under `node` and removes the keys of nodes not in `known`
/// (when known: the inventory has listed the nodes). None when the ConfigMap already says it.
fn patch(
    published: &BTreeMap<String, String>,
    node: &str,
    pem: &str,
    known: Option<&BTreeSet<String>>,
) -> Option<Value> {
    let mut data = serde_json::Map::new();
    if published.get(node).map(String::as_str) != Some(pem) {
        data.insert(node.to_owned(), json!(pem));
    }
    if let Some(known) = known.filter(|k| !k.is_empty()) {
        for departed in published.keys().filter(|k| k.as_str() != node && !known.contains(*k)) {
            data.insert(departed.clone(), Value::Null);
        }
    }
    (!data.is_empty()).then(|| json!({ "data": data }))
}

/// Publishes `pem` for `node` now and keeps it published: retried with backoff while the API
/// server or the ConfigMap is missing, checked again every ten minutes.
pub fn spawn(
    client: kube::Client,
    target: Target,
    node: String,
    pem: String,
    inventory: Arc<Inventory>,
) -> tokio::task::JoinHandle<()> {
    let namespace = target.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    tokio::spawn(async move {
        let mut retry = FIRST_RETRY;
        let mut announced = false;
        loop {
            match publish(&configmaps, &target.name, &node, &pem, &inventory).await {
                Ok(removed) => {
                    if !announced || removed > 0 {
                        tracing::info!(configmap = %format!("{namespace}/{}", target.name), key = %node, departed_nodes_removed = removed, "API CA published");
                    }
                    announced = true;
                    retry = FIRST_RETRY;
                    tokio::time::sleep(RECHECK).await;
                }
                Err(e) => {
                    let fix = match &e {
                        kube::Error::Api(s) if s.code == 404 => {
                            "create it (deploy/netiso creates it with the DaemonSet)"
                        }
                        kube::Error::Api(s) if s.code == 403 => {
                            "grant the netiso service account get and patch on it (Role netiso-api-ca-publisher)"
                        }
                        _ => "retrying",
                    };
                    tracing::warn!(configmap = %format!("{namespace}/{}", target.name), error = %e, fix, "cannot publish the API CA: `netiso observe --kube` cannot verify this node until it is");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RECHECK);
                }
            }
        }
    })
}

/// One check and, when needed, one patch; the number of departed nodes' keys removed.
async fn publish(
    configmaps: &Api<ConfigMap>,
    name: &str,
    node: &str,
    pem: &str,
    inventory: &Inventory,
) -> Result<usize, kube::Error> {
    let current = configmaps.get(name).await?;
    let published = current.data.unwrap_or_default();
    let known = inventory.node_names();
    let Some(patch) = patch(&published, node, pem, known.as_ref()) else {
        return Ok(0);
    };
    let removed = patch["data"].as_object().map_or(0, |d| d.values().filter(|v| v.is_null()).count());
    configmaps.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_node_publishes_its_own_key_and_removes_departed_nodes_keys() {
        let published = map(&[("node-a", "A"), ("node-b", "B"), ("gone", "G")]);
        assert_eq!(
            patch(&published, "node-a", "A2", Some(&set(&["node-a", "node-b"]))),
            Some(json!({"data": {"node-a": "A2", "gone": null}}))
        );
        assert_eq!(patch(&published, "node-a", "A", Some(&set(&["node-a", "node-b", "gone"]))), None, "nothing to do");
        assert_eq!(
            patch(&published, "node-c", "C", None),
            Some(json!({"data": {"node-c": "C"}})),
            "nodes not listed yet: nothing is removed"
        );
        assert_eq!(patch(&published, "node-a", "A", Some(&set(&[]))), None, "an empty node list removes nothing");
        assert_eq!(
            patch(&map(&[]), "node-a", "A", Some(&set(&["node-b"]))),
            Some(json!({"data": {"node-a": "A"}})),
            "its own key stays even before its Node is seen"
        );
    }

    #[test]
    fn targets_are_configmap_names() {
        assert_eq!("netiso-api-ca".parse(), Ok(Target { namespace: None, name: "netiso-api-ca".into() }));
        assert_eq!("netiso/ca".parse(), Ok(Target { namespace: Some("netiso".into()), name: "ca".into() }));
        for bad in ["", "a/", "/a", "Upper", "a/b/c", "a b"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
