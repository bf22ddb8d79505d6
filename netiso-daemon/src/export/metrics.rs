//! Prometheus metrics (OpenMetrics text via prometheus-client). Labels are namespaces, reason
//! names and policy names only: no IPs and no pod names, so cardinality stays bounded by the
//! cluster's configuration rather than its traffic.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::datapath::reasons::{ReasonClass, classify};
use crate::datapath::{DatapathStats, NO_REASON};
use crate::evidence::correlate::Handled;
use crate::evidence::record::{Attribution, FlowVerdict};
use crate::evidence::store::StoreStats;
use crate::inventory::InventoryStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason_class: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceDropLabels {
    source_namespace: String,
    destination_namespace: String,
    /// Which side's policies denied it (`ingress`, `egress`, `both`), or `none`.
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConversationLabels {
    source_namespace: String,
    source_workload: String,
    destination_namespace: String,
    destination_workload: String,
    destination_port: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    /// The namespace of the pods the policies isolate.
    namespace: String,
    direction: String,
    /// The policies isolating the pod in that direction, sorted.
    isolated_by: String,
    /// The policy and rule that came nearest to admitting the flow ("" where none has a rule for
    /// the direction: a default deny).
    nearest_policy: String,
    nearest_rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespacePairLabels {
    source_namespace: String,
    destination_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Totals read from elsewhere (the kernel, the store) become counters by their increments.
#[derive(Default)]
struct Seen {
    lost: [u64; 3],
    ring_events: u64,
    foreign_drops: u64,
    evictions: u64,
    failed_writes: u64,
    lost_operations: u64,
    kernel_drops: HashMap<String, (u64, u64)>,
}

pub struct Metrics {
    registry: Registry,
    drops: Family<ReasonLabels, Counter>,
    kernel_drops: Family<ReasonLabels, Counter>,
    kernel_dropped_bytes: Family<ReasonLabels, Counter>,
    namespace_drops: Family<NamespaceDropLabels, Counter>,
    policy_drops: Family<PolicyLabels, Counter>,
    blocked: Family<ConversationLabels, Counter>,
    forwarded_flows: Family<NamespacePairLabels, Counter>,
    forwarded_packets: Family<NamespacePairLabels, Counter>,
    forwarded_bytes: Family<NamespacePairLabels, Counter>,
    interfaces: Gauge,
    lost_events: Family<SourceLabels, Counter>,
    ring_events: Counter,
    foreign_drops: Counter,
    records_processed: Counter,
    evaluation: Histogram,
    inventory_objects: Family<KindLabels, Gauge>,
    inventory_since_sync: Gauge<f64, AtomicU64>,
    inventory_stale: Gauge,
    store_records: Gauge,
    store_bytes: Gauge,
    store_evictions: Counter,
    store_write_failures: Counter,
    store_lost_operations: Counter,
    accept_errors: Family<ListenerLabels, Counter>,
    seen: Mutex<Seen>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("netiso");
        let m = Metrics {
            drops: Family::default(),
            kernel_drops: Family::default(),
            kernel_dropped_bytes: Family::default(),
            namespace_drops: Family::default(),
            policy_drops: Family::default(),
            blocked: Family::default(),
            forwarded_flows: Family::default(),
            forwarded_packets: Family::default(),
            forwarded_bytes: Family::default(),
            interfaces: Gauge::default(),
            lost_events: Family::default(),
            ring_events: Counter::default(),
            foreign_drops: Counter::default(),
            records_processed: Counter::default(),
            evaluation: Histogram::new([0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1]),
            inventory_objects: Family::default(),
            inventory_since_sync: Gauge::default(),
            inventory_stale: Gauge::default(),
            store_records: Gauge::default(),
            store_bytes: Gauge::default(),
            store_evictions: Counter::default(),
            store_write_failures: Counter::default(),
            store_lost_operations: Counter::default(),
            accept_errors: Family::default(),
            seen: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "drops",
            "Dropped packets recorded as flows (this node's and its pods' namespaces, the reasons --drop-reasons keeps), by reason class and kernel reason",
            m.drops.clone(),
        );
        registry.register(
            "kernel_drops",
            "Every IP packet the kernel dropped on the host, counted in the kernel by reason (`none` before Linux 5.17): complete even when flow records were lost or filtered",
            m.kernel_drops.clone(),
        );
        registry.register(
            "kernel_dropped_bytes",
            "Bytes of every IP packet the kernel dropped on the host, by reason",
            m.kernel_dropped_bytes.clone(),
        );
        registry.register(
            "namespace_drops",
            "Dropped packets by source and destination namespace and the side whose policies denied them",
            m.namespace_drops.clone(),
        );
        registry.register(
            "policy_drops",
            "Dropped packets NetworkPolicy denied, by denying side: the pods' namespace, the direction, the policies isolating them and the rule that came nearest",
            m.policy_drops.clone(),
        );
        registry.register(
            "blocked_packets",
            "Dropped packets by conversation: source and destination workload (a pod's owner; world, node or a Service otherwise) and destination port",
            m.blocked.clone(),
        );
        registry.register("forwarded_flows", "Forwarded flows by namespace pair", m.forwarded_flows.clone());
        registry.register("forwarded_packets", "Forwarded packets by namespace pair", m.forwarded_packets.clone());
        registry.register("forwarded_bytes", "Forwarded bytes by namespace pair", m.forwarded_bytes.clone());
        registry.register(
            "datapath_interfaces_attached",
            "Interfaces the tc programs are attached to",
            m.interfaces.clone(),
        );
        registry.register(
            "datapath_lost_events",
            "Packets the datapath could not record in full, by cause (ringbuf_full, drop_map_full, flow_map_full)",
            m.lost_events.clone(),
        );
        registry.register(
            "datapath_ring_events",
            "Ring-buffer records read (new keys and overflows)",
            m.ring_events.clone(),
        );
        registry.register(
            "datapath_foreign_drops",
            "Dropped packets seen in network namespaces that are neither this node's nor its pods' (not recorded)",
            m.foreign_drops.clone(),
        );
        registry.register("records_processed", "Datapath records correlated", m.records_processed.clone());
        registry.register(
            "policy_evaluation_seconds",
            "Time to identify both ends and evaluate NetworkPolicy for a new flow",
            m.evaluation.clone(),
        );
        registry.register("inventory_objects", "Objects in the inventory by kind", m.inventory_objects.clone());
        registry.register(
            "inventory_seconds_since_sync",
            "Seconds since the inventory last received a change or a list",
            m.inventory_since_sync.clone(),
        );
        registry.register("inventory_stale", "1 while a source of the inventory is failing", m.inventory_stale.clone());
        registry.register("store_records", "Flow records in the evidence store", m.store_records.clone());
        registry.register("store_bytes", "Bytes of encoded records in the evidence store", m.store_bytes.clone());
        registry.register("store_evictions", "Records removed by retention", m.store_evictions.clone());
        registry.register(
            "store_write_failures",
            "Evidence store write batches that failed (held and written again once writes succeed)",
            m.store_write_failures.clone(),
        );
        registry.register(
            "store_lost_operations",
            "Evidence store operations given up because writes kept failing",
            m.store_lost_operations.clone(),
        );
        registry.register(
            "http_accept_errors",
            "Connections a listener failed to accept (out of file descriptors, memory); it retries",
            m.accept_errors.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "netiso's version", build);
        Metrics { registry, ..m }
    }

    /// Counts one handled datapath record.
    pub fn observe(&self, h: &Handled) {
        self.records_processed.inc();
        if let Some(elapsed) = h.evaluation {
            self.evaluation.observe(elapsed.as_secs_f64());
        }
        let f = &h.facts;
        let packets = h.delta_packets;
        match f.verdict {
            FlowVerdict::Dropped => {
                self.drops
                    .get_or_create(&ReasonLabels {
                        reason_class: f.reason_class.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                        reason: f.reason.clone().unwrap_or_default(),
                    })
                    .inc_by(packets);
                let direction = f
                    .policy_direction
                    .filter(|_| f.attribution == Attribution::DeniedByNetworkPolicy)
                    .map(|d| d.as_str().to_owned());
                self.namespace_drops
                    .get_or_create(&NamespaceDropLabels {
                        source_namespace: f.source_namespace.clone(),
                        destination_namespace: f.destination_namespace.clone(),
                        direction: direction.clone().unwrap_or_else(|| "none".into()),
                    })
                    .inc_by(packets);
                let c = &f.conversation;
                self.blocked
                    .get_or_create(&ConversationLabels {
                        source_namespace: f.source_namespace.clone(),
                        source_workload: c.source_workload.clone(),
                        destination_namespace: f.destination_namespace.clone(),
                        destination_workload: c.destination_workload.clone(),
                        destination_port: c.destination_port.clone(),
                        protocol: c.protocol.clone(),
                    })
                    .inc_by(packets);
                for side in &f.denied_by {
                    let (nearest_policy, nearest_rule) = match &side.nearest {
                        Some((policy, rule)) => (policy.clone(), rule.map(|r| r.to_string()).unwrap_or_default()),
                        None => (String::new(), String::new()),
                    };
                    self.policy_drops
                        .get_or_create(&PolicyLabels {
                            namespace: side.namespace.clone(),
                            direction: side.direction.as_str().to_owned(),
                            isolated_by: side.isolated_by.clone(),
                            nearest_policy,
                            nearest_rule,
                        })
                        .inc_by(packets);
                }
            }
            FlowVerdict::Forwarded => {
                let pair = NamespacePairLabels {
                    source_namespace: f.source_namespace.clone(),
                    destination_namespace: f.destination_namespace.clone(),
                };
                if matches!(h.op, crate::evidence::store::StoreOp::Insert(_)) {
                    self.forwarded_flows.get_or_create(&pair).inc();
                }
                self.forwarded_packets.get_or_create(&pair).inc_by(packets);
                self.forwarded_bytes.get_or_create(&pair).inc_by(h.delta_bytes);
            }
        }
    }

    /// The accept-error counter of one listener (`api`, `metrics`), created at 0.
    pub fn accept_errors(&self, listener: &str) -> Counter {
        self.accept_errors.get_or_create(&ListenerLabels { listener: listener.into() }).clone()
    }

    /// Brings the gauges and externally kept totals up to date.
    pub fn refresh(&self, datapath: &DatapathStats, inventory: &InventoryStatus, store: &StoreStats) {
        self.interfaces.set(datapath.interfaces_attached as i64);
        let mut seen = self.seen.lock().expect("metrics lock");
        let lost = [datapath.ringbuf_full, datapath.drop_map_full, datapath.flow_map_full];
        for (i, source) in ["ringbuf_full", "drop_map_full", "flow_map_full"].into_iter().enumerate() {
            // Touch every cause so the series exist (at 0) before anything is lost.
            let counter = self.lost_events.get_or_create(&SourceLabels { source: source.into() });
            counter.inc_by(lost[i].saturating_sub(seen.lost[i]));
        }
        seen.lost = lost;
        for (reason, total) in &datapath.kernel_drops {
            let reason_class = if reason == NO_REASON { ReasonClass::Other } else { classify(reason) };
            let labels = ReasonLabels { reason_class: reason_class.as_str().into(), reason: reason.clone() };
            let before = seen.kernel_drops.insert(reason.clone(), (total.packets, total.bytes)).unwrap_or_default();
            self.kernel_drops.get_or_create(&labels).inc_by(total.packets.saturating_sub(before.0));
            self.kernel_dropped_bytes.get_or_create(&labels).inc_by(total.bytes.saturating_sub(before.1));
        }
        self.ring_events.inc_by(datapath.ring_events.saturating_sub(seen.ring_events));
        seen.ring_events = datapath.ring_events;
        self.foreign_drops.inc_by(datapath.foreign_drops.saturating_sub(seen.foreign_drops));
        seen.foreign_drops = datapath.foreign_drops;
        self.store_evictions.inc_by(store.evictions.saturating_sub(seen.evictions));
        seen.evictions = store.evictions;
        self.store_write_failures.inc_by(store.failed_writes.saturating_sub(seen.failed_writes));
        seen.failed_writes = store.failed_writes;
        self.store_lost_operations.inc_by(store.lost_operations.saturating_sub(seen.lost_operations));
        seen.lost_operations = store.lost_operations;
        for (kind, count) in &inventory.objects {
            self.inventory_objects.get_or_create(&KindLabels { kind: kind.to_string() }).set(*count as i64);
        }
        let since = inventory
            .last_sync
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        self.inventory_since_sync.set(since);
        self.inventory_stale.set(i64::from(inventory.stale));
        self.store_records.set(store.records as i64);
        self.store_bytes.set(store.bytes as i64);
    }

    /// The classic Prometheus text format (0.0.4), for clients that do not ask for OpenMetrics:
    /// the same samples, with counter families named by their `_total` samples and no `# EOF`.
    pub fn encode_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

/// Rewrites an OpenMetrics exposition into the Prometheus text format.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let om = "# HELP netiso_drops Packets dropped.\n# TYPE netiso_drops counter\nnetiso_drops_total{reason=\"X\"} 3\n# HELP netiso_store_records Records.\n# TYPE netiso_store_records gauge\nnetiso_store_records 7\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP netiso_drops_total Packets dropped.\n# TYPE netiso_drops_total counter\nnetiso_drops_total{reason=\"X\"} 3\n# HELP netiso_store_records Records.\n# TYPE netiso_store_records gauge\nnetiso_store_records 7\n"
        );
    }

    #[test]
    fn flows_and_drops_are_counted_by_namespace_and_policy() {
        use crate::evidence::correlate::{DeniedSide, FlowFacts, Handled, WorkloadConversation};
        use crate::evidence::store::StoreOp;
        use crate::policy::Direction;
        let m = Metrics::new();
        let facts = std::sync::Arc::new(FlowFacts {
            verdict: FlowVerdict::Dropped,
            reason: Some("NETFILTER_DROP".into()),
            reason_class: Some(crate::datapath::reasons::ReasonClass::Policy),
            source_namespace: "develop".into(),
            destination_namespace: "production".into(),
            attribution: Attribution::DeniedByNetworkPolicy,
            policy_direction: Some(crate::evidence::record::PolicySides::Ingress),
            denied_by: vec![DeniedSide {
                direction: Direction::Ingress,
                namespace: "production".into(),
                isolated_by: "allow-from-ingress-nginx,default-deny-all".into(),
                nearest: Some(("allow-from-ingress-nginx".into(), Some(0))),
            }],
            conversation: WorkloadConversation {
                source_workload: "debug".into(),
                destination_workload: "api".into(),
                destination_port: "8080".into(),
                protocol: "TCP".into(),
            },
        });
        let h = Handled {
            op: StoreOp::Count {
                id: 1,
                packets: 3,
                bytes: 180,
                last_seen: SystemTime::now(),
                attempts: 1,
                ports: None,
            },
            facts,
            delta_packets: 3,
            delta_bytes: 180,
            evaluation: Some(Duration::from_micros(20)),
        };
        m.observe(&h);
        let text = m.encode();
        assert!(text.contains(r#"netiso_policy_drops_total{namespace="production",direction="ingress",isolated_by="allow-from-ingress-nginx,default-deny-all",nearest_policy="allow-from-ingress-nginx",nearest_rule="0"} 3"#), "{text}");
        assert_eq!(
            text.matches("netiso_policy_drops_total{").count(),
            1,
            "each drop counted once per denying side: {text}"
        );
        assert!(text.contains(r#"netiso_namespace_drops_total{source_namespace="develop",destination_namespace="production",direction="ingress"} 3"#), "{text}");
        assert!(text.contains(r#"netiso_drops_total{reason_class="policy",reason="NETFILTER_DROP"} 3"#), "{text}");
        assert!(text.contains(r#"netiso_blocked_packets_total{source_namespace="develop",source_workload="debug",destination_namespace="production",destination_workload="api",destination_port="8080",protocol="TCP"} 3"#), "{text}");
        assert!(!text.contains("10.244."), "no addresses in labels");
    }

    #[test]
    fn store_write_failures_and_foreign_drops_count_by_their_increments() {
        let m = Metrics::new();
        let inventory = InventoryStatus { synced: true, stale: false, objects: Default::default(), last_sync: None };
        let mut datapath = DatapathStats { foreign_drops: 4, ..Default::default() };
        let mut store = StoreStats { failed_writes: 2, ..Default::default() };
        m.refresh(&datapath, &inventory, &store);
        datapath.foreign_drops = 5;
        store.failed_writes = 3;
        store.lost_operations = 1;
        m.refresh(&datapath, &inventory, &store);
        let text = m.encode();
        assert!(text.contains("netiso_store_write_failures_total 3"), "{text}");
        assert!(text.contains("netiso_store_lost_operations_total 1"), "{text}");
        assert!(text.contains("netiso_datapath_foreign_drops_total 5"), "{text}");
    }

    #[test]
    fn kernel_drop_totals_count_by_their_increments_per_reason() {
        use netiso_common::DropTotal;
        let m = Metrics::new();
        let inventory = InventoryStatus { synced: true, stale: false, objects: Default::default(), last_sync: None };
        let store = StoreStats::default();
        let mut datapath = DatapathStats::default();
        datapath.kernel_drops.insert("NETFILTER_DROP".into(), DropTotal { packets: 3, bytes: 180 });
        m.refresh(&datapath, &inventory, &store);
        datapath.kernel_drops.insert("NETFILTER_DROP".into(), DropTotal { packets: 5, bytes: 300 });
        datapath.kernel_drops.insert(NO_REASON.into(), DropTotal { packets: 1, bytes: 40 });
        m.refresh(&datapath, &inventory, &store);
        let text = m.encode();
        assert!(
            text.contains(r#"netiso_kernel_drops_total{reason_class="policy",reason="NETFILTER_DROP"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"netiso_kernel_dropped_bytes_total{reason_class="policy",reason="NETFILTER_DROP"} 300"#),
            "{text}"
        );
        assert!(text.contains(r#"netiso_kernel_drops_total{reason_class="other",reason="none"} 1"#), "{text}");
    }
}
