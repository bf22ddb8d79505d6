//! The store: records survive a reopen, indexes answer filters, retention removes by age and
//! size, and an unreadable file is moved aside.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::filter::FlowFilter;
use super::record::{Attribution, FLOW_SCHEMA, FlowRecord, FlowVerdict, PolicyVerdict, PortSweep};
use super::store::{Query, Retention, Store, StoreOp, Written};
use crate::cluster::{EndpointKind, Identity};
use crate::policy::PolicyRef;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("netiso-store-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn filtered(filter: FlowFilter) -> Query {
    Query { filter, ..Default::default() }
}

fn pod(ns: &str, name: &str, ip: &str, port: u16) -> Identity {
    Identity {
        kind: EndpointKind::Pod,
        namespace: Some(ns.into()),
        pod: Some(name.into()),
        workload: None,
        labels: Some([("app".to_owned(), name.to_owned())].into()),
        node: None,
        service: None,
        ip: ip.parse().unwrap(),
        port,
    }
}

/// A record of a flow between `from` and `to` at `id` nanoseconds since the epoch (also for other
/// modules' tests).
pub(crate) fn record(id: u64, verdict: FlowVerdict, from: Identity, to: Identity, policy: Option<&str>) -> FlowRecord {
    let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(id);
    FlowRecord {
        schema: FLOW_SCHEMA,
        id,
        time,
        last_seen: time,
        node: "n".into(),
        verdict,
        protocol: crate::datapath::record::IpProtocol::Tcp,
        source: from,
        destination: to,
        icmp_type: None,
        icmp_code: None,
        reason: (verdict == FlowVerdict::Dropped).then(|| "NETFILTER_DROP".into()),
        reason_class: None,
        reason_inferred: false,
        location: None,
        interface: None,
        direction: None,
        observed_at: None,
        is_reply: false,
        packets: 1,
        bytes: 60,
        attempts: 1,
        ports: None,
        policy: PolicyVerdict {
            verdict: None,
            direction: None,
            attribution: Attribution::DeniedByNetworkPolicy,
            policies: policy
                .map(|p| {
                    let (ns, name) = p.split_once('/').unwrap();
                    vec![PolicyRef { namespace: ns.into(), name: name.into(), resource_version: Some("7".into()) }]
                })
                .unwrap_or_default(),
            summary: String::new(),
            egress: None,
            ingress: None,
        },
        inventory_stale: false,
        evidence: None,
    }
}

/// The payload bytes these records take in a store of their own.
fn stored_bytes(records: &[FlowRecord]) -> u64 {
    let dir = TempDir::new("measure");
    let store = Store::open(&dir.0.join("e.redb"), Retention::default()).unwrap();
    store.write(&records.iter().map(|r| StoreOp::Insert(Box::new(r.clone()))).collect::<Vec<_>>()).unwrap();
    store.stats().bytes
}

fn now_id(offset_secs: u64) -> u64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;
    now - offset_secs * 1_000_000_000
}

#[test]
fn records_carry_their_schema_and_a_newer_one_is_refused_not_misread() {
    let r = record(1, FlowVerdict::Dropped, pod("a", "x", "10.0.0.1", 1), pod("b", "y", "10.0.0.2", 80), None);
    let mut json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["schema"], FLOW_SCHEMA);
    json.as_object_mut().unwrap().remove("schema");
    let stored_before_the_field: FlowRecord = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(stored_before_the_field.schema, 1);
    json["schema"] = (FLOW_SCHEMA + 1).into();
    let err = serde_json::from_value::<FlowRecord>(json).unwrap_err().to_string();
    assert!(err.contains("newer than this netiso reads") && err.contains("upgrade netiso"), "{err}");
}

#[test]
fn records_survive_a_reopen_and_are_found_by_every_index() {
    let dir = TempDir::new("reopen");
    let path = dir.0.join("evidence.redb");
    let (a, b, c) = (now_id(30), now_id(20), now_id(10));
    {
        let store = Store::open(&path, Retention::default()).unwrap();
        store
            .write(&[
                StoreOp::Insert(Box::new(record(
                    a,
                    FlowVerdict::Dropped,
                    pod("develop", "debug", "10.0.0.1", 40000),
                    pod("production", "api", "10.0.0.2", 8080),
                    Some("production/deny"),
                ))),
                StoreOp::Insert(Box::new(record(
                    b,
                    FlowVerdict::Forwarded,
                    pod("ingress-nginx", "controller", "10.0.0.3", 40001),
                    pod("production", "api", "10.0.0.2", 8080),
                    None,
                ))),
                StoreOp::Insert(Box::new(record(
                    c,
                    FlowVerdict::Forwarded,
                    pod("develop", "debug", "10.0.0.1", 40002),
                    pod("kube-system", "dns", "10.0.0.4", 53),
                    None,
                ))),
                StoreOp::Count {
                    id: b,
                    packets: 42,
                    bytes: 4200,
                    last_seen: SystemTime::now(),
                    attempts: 7,
                    ports: None,
                },
            ])
            .unwrap();
    }
    let store = Store::open(&path, Retention::default()).unwrap();
    assert_eq!(store.last_id().unwrap(), c);
    assert_eq!(store.stats().records, 3);
    let ids = |q: Query| store.query(&q).unwrap().iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(Query::default()), vec![c, b, a], "newest first");
    assert_eq!(ids(filtered(FlowFilter { verdict: Some(FlowVerdict::Dropped), ..Default::default() })), vec![a]);
    assert_eq!(ids(filtered(FlowFilter { namespace: Some("production".into()), ..Default::default() })), vec![b, a]);
    assert_eq!(
        ids(filtered(FlowFilter { from_pod: Some("develop/debug".parse().unwrap()), ..Default::default() })),
        vec![c, a]
    );
    assert_eq!(
        ids(filtered(FlowFilter {
            to_pod: Some("production/api".parse().unwrap()),
            verdict: Some(FlowVerdict::Forwarded),
            ..Default::default()
        })),
        vec![b]
    );
    assert_eq!(ids(filtered(FlowFilter { policy: Some("production/deny".into()), ..Default::default() })), vec![a]);
    assert_eq!(
        ids(filtered(FlowFilter { from_label: Some("app=controller".parse().unwrap()), ..Default::default() })),
        vec![b]
    );
    assert_eq!(ids(filtered(FlowFilter { to_port: Some(53), ..Default::default() })), vec![c]);
    assert_eq!(ids(Query { limit: 1, ..Default::default() }), vec![c]);
    assert_eq!(ids(Query { after_id: Some(b), ..Default::default() }), vec![c]);
    let counted = store.get(b).unwrap().unwrap();
    assert_eq!((counted.packets, counted.attempts), (42, 7));
    assert_eq!(store.get(a).unwrap().unwrap().attempts, 1);
}

#[test]
fn a_listing_pages_through_every_record_without_repeating_one() {
    let dir = TempDir::new("pages");
    let store = Store::open(&dir.0.join("evidence.redb"), Retention::default()).unwrap();
    let ids: Vec<u64> = (0..25).map(|i| now_id(100) + i).collect();
    let ops: Vec<StoreOp> = ids
        .iter()
        .map(|&id| {
            let verdict = if id % 2 == 0 { FlowVerdict::Dropped } else { FlowVerdict::Forwarded };
            let from = pod("develop", "debug", "10.0.0.1", 40000);
            StoreOp::Insert(Box::new(record(id, verdict, from, pod("production", "api", "10.0.0.2", 8080), None)))
        })
        .collect();
    store.write(&ops).unwrap();
    // Through the time range and through an index (the verdict's, a pod prefix's), newest or
    // oldest first.
    let dropped = ids.iter().filter(|i| *i % 2 == 0).count();
    let api = || Some("production/ap".parse().unwrap());
    for (filter, expected) in [
        (FlowFilter::default(), ids.len()),
        (FlowFilter { verdict: Some(FlowVerdict::Dropped), ..Default::default() }, dropped),
        (FlowFilter { to_pod: api(), verdict: Some(FlowVerdict::Dropped), ..Default::default() }, dropped),
    ] {
        for oldest_first in [false, true] {
            let mut read = Vec::new();
            let mut next = None;
            loop {
                let (before_id, after_id) = if oldest_first { (None, next) } else { (next, None) };
                let query = Query {
                    limit: 10,
                    before_id,
                    after_id,
                    oldest_first,
                    filter: filter.clone(),
                    ..Default::default()
                };
                let page = store.query_page(&query).unwrap();
                assert!(page.records.len() <= 10);
                read.extend(page.records.iter().map(|r| r.id));
                match (page.more, page.next) {
                    (true, Some(id)) => next = Some(id),
                    (false, None) => break,
                    other => panic!("more and next disagree: {other:?}"),
                }
            }
            let mut unique = read.clone();
            unique.dedup();
            assert_eq!((read.len(), unique.len()), (expected, expected), "{filter:?}: {read:?}");
            if oldest_first {
                assert!(read.windows(2).all(|w| w[0] < w[1]), "oldest first across pages");
            } else {
                assert!(read.windows(2).all(|w| w[0] > w[1]), "newest first across pages");
            }
        }
    }
    let until = std::time::UNIX_EPOCH + Duration::from_nanos(ids[4]);
    let first_five = store.query(&Query { until: Some(until), oldest_first: true, ..Default::default() }).unwrap();
    assert_eq!(first_five.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..5]);
    let excluded = Query {
        exclude: Some(FlowFilter { verdict: Some(FlowVerdict::Dropped), ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(store.query(&excluded).unwrap().len(), ids.len() - dropped);
}

#[test]
fn retention_removes_by_age_and_by_size_and_counts_evictions() {
    let dir = TempDir::new("retention");
    let path = dir.0.join("evidence.redb");
    let store = Store::open(&path, Retention { max_age: Duration::from_secs(3600), max_bytes: 1 << 30 }).unwrap();
    let old = now_id(7200);
    let recent: Vec<u64> = (1..=5).map(|i| now_id(100 - i)).collect();
    let mut ops = vec![StoreOp::Insert(Box::new(record(
        old,
        FlowVerdict::Dropped,
        pod("a", "x", "10.0.0.1", 1),
        pod("b", "y", "10.0.0.2", 2),
        Some("b/p"),
    )))];
    ops.extend(recent.iter().map(|&id| {
        StoreOp::Insert(Box::new(record(
            id,
            FlowVerdict::Forwarded,
            pod("a", "x", "10.0.0.1", 1),
            pod("b", "y", "10.0.0.2", 2),
            None,
        )))
    }));
    store.write(&ops).unwrap();
    assert_eq!(store.enforce_retention(SystemTime::now()).unwrap(), 1);
    assert!(store.get(old).unwrap().is_none());
    assert!(
        store.query(&filtered(FlowFilter { policy: Some("b/p".into()), ..Default::default() })).unwrap().is_empty(),
        "index entries go too"
    );
    drop(store);

    let forwarded =
        |id| record(id, FlowVerdict::Forwarded, pod("a", "x", "10.0.0.1", 1), pod("b", "y", "10.0.0.2", 2), None);
    let newest: Vec<FlowRecord> = recent.iter().rev().map(|&id| forwarded(id)).collect();
    let two_and_a_half = (stored_bytes(&newest[..2]) + stored_bytes(&newest[..3])) / 2;
    let store =
        Store::open(&path, Retention { max_age: Duration::from_secs(3600), max_bytes: two_and_a_half }).unwrap();
    assert_eq!(store.enforce_retention(SystemTime::now()).unwrap(), 3);
    let left: Vec<u64> = store.query(&Query::default()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(left, vec![recent[4], recent[3]], "the newest are kept");
    assert_eq!(store.stats().evictions, 4);
}

#[test]
fn records_of_one_conversation_share_it_and_its_evidence_until_the_last_is_removed() {
    let dir = TempDir::new("shared-evidence");
    let path = dir.0.join("evidence.redb");
    let keep_all = Retention { max_age: Duration::from_secs(3600), max_bytes: 1 << 30 };
    let store = Store::open(&path, keep_all).unwrap();
    let first = super::correlate::tests::denied_record(8080);
    let evidence = first.evidence.clone().expect("a denied flow carries its evidence");
    let evidence_bytes = serde_json::to_vec(&evidence).unwrap().len() as u64;
    let record_bytes = serde_json::to_vec(&first.clone().listed()).unwrap().len() as u64;
    // A flood: the same conversation from a thousand source ports.
    let flood: Vec<FlowRecord> = (0..1000u64)
        .map(|i| {
            let mut r = first.clone();
            r.id = now_id(100) + i;
            r.source.port = 40000 + i as u16;
            r
        })
        .collect();
    store.write(&flood.iter().map(|r| StoreOp::Insert(Box::new(r.clone()))).collect::<Vec<_>>()).unwrap();
    let stored = store.stats().bytes;
    assert!(
        stored < evidence_bytes + 1000 * (record_bytes + 64),
        "{stored} bytes for 1000 records of {record_bytes} bytes and one evidence of {evidence_bytes}"
    );
    assert!(evidence_bytes > 1000, "the evidence is what sharing saves: {evidence_bytes} bytes");
    let repeated = (stored - stored_bytes(&flood[..1])) / 999;
    assert!(repeated <= 300, "a repeated conversation's record takes {repeated} bytes, its listing {record_bytes}");
    for r in [&flood[0], &flood[999]] {
        assert_eq!(store.get(r.id).unwrap().unwrap().evidence.as_ref(), Some(&evidence), "each record keeps it");
    }
    store
        .write(&[StoreOp::Count {
            id: flood[5].id,
            packets: 3,
            bytes: 180,
            last_seen: flood[5].time,
            attempts: 1,
            ports: None,
        }])
        .unwrap();
    let counted = store.get(flood[5].id).unwrap().unwrap();
    assert_eq!((counted.packets, counted.evidence.as_ref()), (3, Some(&evidence)), "a count update keeps it");
    let listed = store.query(&Query { limit: 2000, ..Default::default() }).unwrap();
    assert_eq!(listed.len(), 1000);
    drop(store);

    let one_left = Retention { max_age: Duration::from_secs(3600), max_bytes: stored_bytes(&flood[999..]) };
    let store = Store::open(&path, one_left).unwrap();
    assert_eq!(store.enforce_retention(SystemTime::now()).unwrap(), 999);
    assert_eq!(store.get(flood[999].id).unwrap().unwrap().evidence, Some(evidence), "the last one still has it");
    drop(store);

    let none_left = Retention { max_age: Duration::from_secs(3600), max_bytes: 0 };
    let store = Store::open(&path, none_left).unwrap();
    assert_eq!(store.enforce_retention(SystemTime::now()).unwrap(), 1);
    assert_eq!(store.stats().bytes, 0, "the evidence goes with its last record");
}

#[test]
fn a_record_stored_with_its_own_evidence_is_still_read_whole() {
    let dir = TempDir::new("inline-evidence");
    let path = dir.0.join("evidence.redb");
    let r = super::correlate::tests::denied_record(8080);
    // As stores written before evidence was shared hold it: inside the record's JSON.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("records")).unwrap();
            records.insert(r.id, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, Retention::default()).unwrap();
    assert_eq!(store.get(r.id).unwrap(), Some(r.clone()));
    let listed: Vec<FlowRecord> = store.query(&Query::default()).unwrap().into_iter().map(FlowRecord::listed).collect();
    assert_eq!(listed, vec![r.listed()]);
}

#[test]
fn a_record_stored_whole_beside_its_shared_evidence_is_still_read_and_counted() {
    let dir = TempDir::new("whole-record");
    let path = dir.0.join("evidence.redb");
    let r = super::correlate::tests::denied_record(8080);
    let evidence = serde_json::to_vec(&r.evidence).unwrap();
    let key = 7u128;
    // As stores written before conversations were shared hold a record: its whole JSON but the
    // evidence, which is shared under its digest.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("records")).unwrap();
            let json = serde_json::to_vec(&r.clone().listed()).unwrap();
            records.insert(r.id, [&b"E"[..], &key.to_be_bytes(), &json].concat().as_slice()).unwrap();
            let mut shared = txn.open_table(redb::TableDefinition::<u128, &[u8]>::new("evidence")).unwrap();
            shared.insert(key, evidence.as_slice()).unwrap();
            let mut refs = txn.open_table(redb::TableDefinition::<u128, u64>::new("evidence_refs")).unwrap();
            refs.insert(key, 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, Retention::default()).unwrap();
    assert_eq!(store.get(r.id).unwrap(), Some(r.clone()));
    let count = StoreOp::Count { id: r.id, packets: 9, bytes: 540, last_seen: r.time, attempts: 3, ports: None };
    let counted = store.write(&[count]).unwrap();
    let expected = FlowRecord { packets: 9, bytes: 540, attempts: 3, ..r.clone() };
    assert_eq!(counted, vec![expected.clone().listed()]);
    assert_eq!(store.get(r.id).unwrap(), Some(expected), "counted, with its evidence");
}

#[test]
fn the_size_limit_holds_at_every_write() {
    let dir = TempDir::new("size-at-write");
    let path = dir.0.join("evidence.redb");
    let make = |id: u64| {
        record(id, FlowVerdict::Dropped, pod("a", "x", "10.0.0.1", 1), pod("b", "y", "10.0.0.2", 2), Some("b/p"))
    };
    let first = now_id(100);
    let ids: Vec<u64> = (0..50).map(|i| first + i).collect();
    let newest: Vec<FlowRecord> = ids.iter().rev().map(|&id| make(id)).collect();
    let limit = (stored_bytes(&newest[..10]) + stored_bytes(&newest[..11])) / 2;
    let store = Store::open(&path, Retention { max_age: Duration::from_secs(3600), max_bytes: limit }).unwrap();
    for batch in ids.chunks(7) {
        store.write(&batch.iter().map(|&id| StoreOp::Insert(Box::new(make(id)))).collect::<Vec<_>>()).unwrap();
        let stats = store.stats();
        assert!(stats.bytes <= limit, "{} bytes stored with a limit of {limit}", stats.bytes);
    }
    let kept: Vec<u64> = store.query(&Query::default()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(kept, ids.iter().rev().take(10).copied().collect::<Vec<_>>(), "the newest are kept");
    assert_eq!(store.stats().evictions, 40);
    assert_eq!(
        store
            .query(&Query { limit: 100, ..filtered(FlowFilter { policy: Some("b/p".into()), ..Default::default() }) })
            .unwrap()
            .len(),
        10
    );
}

#[test]
fn of_a_records_counts_in_one_batch_the_last_is_written_with_the_latest_ports() {
    let dir = TempDir::new("counts");
    let store = Store::open(&dir.0.join("e.redb"), Retention::default()).unwrap();
    let scan =
        record(now_id(100), FlowVerdict::Dropped, pod("a", "x", "10.0.0.1", 1), pod("b", "y", "10.0.0.2", 0), None);
    let count = |attempts: u64, ports: Option<&str>| StoreOp::Count {
        id: scan.id,
        packets: attempts,
        bytes: 60 * attempts,
        last_seen: scan.time,
        attempts,
        ports: ports.map(|ranges| PortSweep { count: attempts as u32, ranges: ranges.into() }),
    };
    store.write(&[StoreOp::Insert(Box::new(scan.clone()))]).unwrap();
    let counted = store.write(&[count(2, Some("17-18")), count(3, Some("17-19")), count(4, None)]).unwrap();
    assert_eq!(counted.len(), 1, "announced once");
    let stored = store.get(scan.id).unwrap().unwrap();
    assert_eq!((stored.packets, stored.attempts), (4, 4));
    assert_eq!(stored.ports.as_ref().map(|p| p.ranges.as_str()), Some("17-19"));
    assert_eq!(counted[0], stored);
    store.write(&[count(5, None)]).unwrap();
    assert_eq!(store.get(scan.id).unwrap().unwrap().ports, stored.ports, "a count without ports keeps them");
}

#[test]
fn an_unreadable_store_is_moved_aside_and_a_fresh_one_works() {
    let dir = TempDir::new("corrupt");
    let path = dir.0.join("evidence.redb");
    std::fs::write(&path, vec![0xa5u8; 64 * 1024]).unwrap();
    let store = Store::open(&path, Retention::default()).unwrap();
    store
        .write(&[StoreOp::Insert(Box::new(record(
            now_id(1),
            FlowVerdict::Dropped,
            pod("a", "x", "10.0.0.1", 1),
            pod("b", "y", "10.0.0.2", 2),
            None,
        )))])
        .unwrap();
    assert_eq!(store.stats().records, 1);
    let aside: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("evidence.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept for inspection");
}

/// A tmpfs of its own, unmounted (with everything in it) when dropped.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Self {
        let dir = TempDir::new(tag);
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir.0)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs (the test runs as root)");
        Tmpfs(dir)
    }

    fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0.0).status();
    }
}

#[test]
fn a_store_on_a_read_only_filesystem_is_an_error_and_is_not_moved() {
    let fs = Tmpfs::mount("readonly", "4m");
    let path = fs.0.0.join("evidence.redb");
    drop(Store::open(&path, Retention::default()).unwrap());
    let before = std::fs::read(&path).unwrap();
    fs.remount("ro");
    let Err(err) = Store::open(&path, Retention::default()) else { panic!("opened a store on a read-only filesystem") };
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()) && message.contains("writable"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the store is left as it was");
    let names: Vec<_> = std::fs::read_dir(&fs.0.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("evidence.redb")], "nothing moved aside");
}

#[tokio::test]
async fn the_writer_batches_and_announces_inserts_and_new_counts_of_drops() {
    let dir = TempDir::new("writer");
    let store = Arc::new(Store::open(&dir.0.join("e.redb"), Retention::default()).unwrap());
    let (writer, task) =
        super::store::spawn_writer(store.clone(), Duration::from_millis(20), Duration::from_secs(3600));
    let mut announced = writer.written.subscribe();
    for i in 0..100u64 {
        writer
            .send(StoreOp::Insert(Box::new(record(
                now_id(200) + i,
                FlowVerdict::Forwarded,
                pod("a", "x", "10.0.0.1", 1),
                pod("b", "y", "10.0.0.2", 2),
                None,
            ))))
            .await;
    }
    let mut next = async || tokio::time::timeout(Duration::from_secs(5), announced.recv()).await.unwrap().unwrap();
    let Written::Inserted(first) = next().await else { panic!("an insert is announced as one") };
    assert_eq!(first.source.pod.as_deref(), Some("x"));
    // New counts of a dropped record are announced (a follower sees a repeated attempt); a
    // forwarded record's are not.
    let dropped =
        record(now_id(300), FlowVerdict::Dropped, pod("a", "x", "10.0.0.1", 1), pod("b", "y", "10.0.0.2", 2), None);
    let count = |r: &FlowRecord, attempts| StoreOp::Count {
        id: r.id,
        packets: attempts,
        bytes: 60 * attempts,
        last_seen: r.time,
        attempts,
        ports: None,
    };
    writer.send(StoreOp::Insert(Box::new(dropped.clone()))).await;
    writer.send(count(&first, 5)).await;
    writer.send(count(&dropped, 2)).await;
    let mut counted = None;
    while counted.is_none() {
        if let Written::Counted(r) = next().await {
            counted = Some(r);
        }
    }
    let counted = counted.unwrap();
    assert_eq!((counted.id, counted.attempts, counted.packets), (dropped.id, 2, 2));
    drop(writer);
    task.await.unwrap();
    assert_eq!(store.stats().records, 101);
}

/// A real full disk: the store on a 4 MiB tmpfs filled up by another file. Writes fail, are
/// counted and held; once the file is removed they succeed again and nothing is lost.
#[tokio::test]
async fn the_store_recovers_when_a_full_disk_has_space_again() {
    use std::io::Write;
    let fs = Tmpfs::mount("full", "4m");
    let store = Arc::new(Store::open(&fs.0.0.join("evidence.redb"), Retention::default()).unwrap());
    let (writer, task) =
        super::store::spawn_writer(store.clone(), Duration::from_millis(20), Duration::from_secs(3600));
    let filler = fs.0.0.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
    }
    const RECORDS: u64 = 200;
    let big = "x".repeat(8 * 1024);
    for i in 0..RECORDS {
        let mut from = pod("a", "x", "10.0.0.1", 1);
        from.labels = Some([("note".to_owned(), big.clone())].into());
        let r = record(now_id(300) + i, FlowVerdict::Dropped, from, pod("b", "y", "10.0.0.2", 2), None);
        writer.send(StoreOp::Insert(Box::new(r))).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.health().failing.is_none() {
        assert!(std::time::Instant::now() < deadline, "writes to a full filesystem fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, error) = store.health().failing.unwrap();
    assert!(error.contains("No space left"), "{error}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.health().failing.is_some() || store.stats().records < RECORDS {
        assert!(std::time::Instant::now() < deadline, "writes succeed again: {:?} {:?}", store.health(), store.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = store.stats();
    assert_eq!(stats.records, RECORDS, "every held record is written");
    assert!(stats.failed_writes >= 1);
    assert_eq!(stats.lost_operations, 0);
    drop(writer);
    task.await.unwrap();
}
