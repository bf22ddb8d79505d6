//! What the correlator spends per new flow on the paths a node's traffic takes: a pod-to-pod flow
//! (held as it leaves, recorded as it arrives), a Service flow (held for the ClusterIP, learned
//! and recorded at the backend after DNAT) and a flow to the world (held, then released as
//! forwarded). Run with `cargo bench -p netiso-daemon --bench correlate`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netiso::datapath::record::IpProtocol;
use netiso::datapath::{DatapathRecord, Direction, EventKind};
use netiso::evidence::correlate::{Correlator, HOLD};
use netiso::inventory::{Change, Inventory, Kind, Object, manifests};

/// Flows per correlator: fresh source ports, so every flow is a new key.
const CHUNK: u64 = 50_000;

fn inventory() -> Arc<Inventory> {
    let loaded =
        manifests::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/course.yaml")))
            .expect("the course fixture loads");
    let inventory = Inventory::new(&[], Duration::from_secs(3600));
    for kind in Kind::ALL {
        let objects: Vec<Object> = loaded.objects.iter().filter(|o| o.kind() == kind).cloned().collect();
        inventory.apply_at(Change::Replace(kind, objects), SystemTime::now() - Duration::from_secs(60));
    }
    let dns = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"k8s-app": "kube-dns"}}
    }))
    .expect("a Service");
    inventory.apply(Change::Apply(Object::Service(dns)));
    inventory
}

/// The course's inventory and `count` more pods elsewhere, as on a large cluster.
fn inventory_with_pods(count: u32) -> Arc<Inventory> {
    let inventory = inventory();
    let at = SystemTime::now() - Duration::from_secs(60);
    for i in 0..count {
        let pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("load-{i}"), "namespace": "load", "uid": format!("load-{i}")},
            "spec": {"nodeName": format!("node-{}", i % 100), "containers": []},
            "status": {"podIP": format!("10.{}.{}.{}", 200 + i / 65536, (i / 256) % 256, i % 256)}
        }))
        .expect("a pod");
        inventory.apply_at(Change::Apply(Object::Pod(pod)), at);
    }
    inventory
}

fn record(direction: Direction, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> DatapathRecord {
    let now = SystemTime::now();
    DatapathRecord {
        event: EventKind::Flow,
        time: now,
        last_seen: now,
        src_ip: src,
        dst_ip: dst,
        src_port: sport,
        dst_port: dport,
        protocol: IpProtocol::Udp,
        icmp_type: None,
        icmp_code: None,
        reason: None,
        reason_class: None,
        reason_inferred: false,
        location: None,
        netns: None,
        direction: Some(direction),
        ifindex: 3,
        interface: Some("veth10".into()),
        packets: 1,
        bytes: 80,
        tcp_flags: None,
        overflow: false,
        new_key: true,
        delta_packets: 1,
        delta_bytes: 80,
    }
}

/// `iters` flows, each the records `flow(port)` makes, with every hold released: the time per flow.
fn per_flow(iters: u64, inventory: &Arc<Inventory>, flow: impl Fn(u16) -> Vec<DatapathRecord>) -> Duration {
    let mut spent = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let mut correlator = Correlator::new(inventory.clone(), "lab".into(), 0, Duration::from_secs(300), HOLD);
        let batch: Vec<Vec<DatapathRecord>> = (0..CHUNK.min(iters - done)).map(|i| flow(1024 + i as u16)).collect();
        let start = Instant::now();
        for records in &batch {
            for r in records {
                black_box(correlator.handle(r));
            }
        }
        black_box(correlator.release(Instant::now() + HOLD));
        spent += start.elapsed();
        done += batch.len() as u64;
    }
    spent
}

fn correlate(c: &mut Criterion) {
    let inventory = inventory();
    let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
    let (debug, api, coredns) = (ip("10.244.0.10"), ip("10.244.0.30"), ip("10.244.0.53"));
    let (cluster_ip, world) = (ip("10.96.0.10"), ip("203.0.113.10"));
    let mut group = c.benchmark_group("correlate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("pod to pod", |b| {
        b.iter_custom(|iters| {
            per_flow(iters, &inventory, |port| {
                vec![
                    record(Direction::FromPod, debug, port, api, 8080),
                    record(Direction::ToPod, debug, port, api, 8080),
                ]
            })
        })
    });
    group.bench_function("through a Service", |b| {
        b.iter_custom(|iters| {
            per_flow(iters, &inventory, |port| {
                vec![
                    record(Direction::FromPod, debug, port, cluster_ip, 53),
                    record(Direction::ToPod, debug, port, coredns, 53),
                ]
            })
        })
    });
    group.bench_function("to the world", |b| {
        b.iter_custom(|iters| {
            per_flow(iters, &inventory, |port| vec![record(Direction::FromPod, debug, port, world, 443)])
        })
    });
    let large = inventory_with_pods(10_000);
    let load = ip("10.200.0.7");
    group.bench_function("to the world, among 10,000 pods", |b| {
        b.iter_custom(|iters| per_flow(iters, &large, |port| vec![record(Direction::FromPod, load, port, world, 443)]))
    });
    group.finish();
}

criterion_group!(benches, correlate);
criterion_main!(benches);
