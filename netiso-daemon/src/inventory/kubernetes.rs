//! Feeds the inventory from the Kubernetes API: one kube-rs watcher per kind, with backoff.
//! Errors never stop the daemon: the kind is marked stale until its watch works again, and a
//! relist (after `410 Gone` or a reconnect) replaces what was known.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;

use super::{Change, Inventory, Kind, Object};

async fn follow<K>(client: kube::Client, inventory: Arc<Inventory>, kind: Kind, wrap: fn(K) -> Object)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // Api::all lists namespaced kinds across every namespace.
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).backoff(CappedBackoff::default()).boxed();
    let mut listing: Option<Vec<Object>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                inventory.set_stale(kind, false);
                match event {
                    watcher::Event::Init => listing = Some(Vec::new()),
                    watcher::Event::InitApply(o) => listing.get_or_insert_with(Vec::new).push(wrap(o)),
                    watcher::Event::InitDone => {
                        let objects = listing.take().unwrap_or_default();
                        tracing::info!(kind = kind.as_str(), objects = objects.len(), "listed");
                        inventory.apply(Change::Replace(kind, objects));
                    }
                    watcher::Event::Apply(o) => inventory.apply(Change::Apply(wrap(o))),
                    watcher::Event::Delete(o) => inventory.apply(Change::Delete(wrap(o))),
                }
            }
            Err(e) => {
                inventory.set_stale(kind, true);
                tracing::warn!(kind = kind.as_str(), error = %e, "watch failed; retrying with backoff, records are marked stale meanwhile");
            }
        }
    }
}

/// A failing watch retries at least this often, so a kind with no error for longer than this
/// (while the API answers) has recovered.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

const MIN_BACKOFF: Duration = Duration::from_millis(500);

/// Exponential retry delays capped at [`MAX_BACKOFF`]; reset by the first success.
struct CappedBackoff {
    next: Duration,
}

impl Default for CappedBackoff {
    fn default() -> Self {
        CappedBackoff { next: MIN_BACKOFF }
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(delay)
    }
}

impl Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

/// While the inventory is stale, asks the API server for its version: once it answers, kinds
/// whose watches have stopped failing are fresh again even if nothing changed in them.
async fn probe_recovery(client: kube::Client, inventory: Arc<Inventory>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if inventory.status().stale && client.apiserver_version().await.is_ok() {
            inventory.clear_stale_quiet_for(MAX_BACKOFF * 2);
        }
    }
}

/// Starts one watcher task per kind the inventory needs, and the recovery probe.
pub fn spawn(client: kube::Client, inventory: Arc<Inventory>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(probe_recovery(client.clone(), inventory.clone())),
        tokio::spawn(follow::<Namespace>(client.clone(), inventory.clone(), Kind::Namespace, Object::Namespace)),
        tokio::spawn(follow::<Node>(client.clone(), inventory.clone(), Kind::Node, Object::Node)),
        tokio::spawn(follow::<Pod>(client.clone(), inventory.clone(), Kind::Pod, Object::Pod)),
        tokio::spawn(follow::<NetworkPolicy>(
            client.clone(),
            inventory.clone(),
            Kind::NetworkPolicy,
            Object::NetworkPolicy,
        )),
        tokio::spawn(follow::<Service>(client.clone(), inventory.clone(), Kind::Service, Object::Service)),
        tokio::spawn(follow::<ReplicaSet>(client, inventory, Kind::ReplicaSet, Object::ReplicaSet)),
    ]
}
