//! The daemon started in-process with `netiso::daemon::start`, as `netiso run` starts it: on a
//! thread inside a node namespace (every thread of its runtime is created there), it attaches,
//! records a dropped flow, serves it on the port it picked, and detaches when stopped.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use netiso::daemon::{self, Config};
use netiso::datapath::DatapathConfig;
use netiso::evidence::record::FlowList;
use netiso::export::auth::ApiAuth;
use support::{connect, curl, node_and_pod, tag, tc_programs, udp_from_pod, wait_until};

fn config(store: std::path::PathBuf) -> Config {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        datapath: DatapathConfig {
            interface_patterns: vec![],
            drop_reasons: "default".into(),
            drop_map_entries: 1024,
            flow_map_entries: 1024,
            drain_interval: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(60),
        },
        print_records: None,
        manifests: None,
        kubeconfig: None,
        node_name: "in-process".into(),
        store,
        retention: Duration::from_secs(3600),
        store_max_bytes: 64 << 20,
        listen: any_port,
        metrics_listen: any_port,
        api_auth: ApiAuth::None,
        auth_cache_ttl: Duration::from_secs(10),
        tls: None,
        connection_timeout: Duration::from_secs(30),
        blocked_log_interval: Duration::from_secs(60),
        publish_api_ca: None,
    }
}

#[test]
fn a_daemon_started_in_process_records_serves_and_detaches() {
    let tag = tag("np");
    let (node, pod, _cleanup) = node_and_pod(&tag);
    connect(&node, &pod);
    let scratch = tempfile::tempdir().unwrap();
    let config = config(scratch.path().join("evidence.redb"));
    let namespace = std::fs::File::open(format!("/run/netns/{node}")).unwrap();
    let (api, stats) = std::thread::spawn(move || {
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let running = daemon::start(config).await.unwrap_or_else(|e| panic!("{e:#}"));
            let api = running.api_address();
            assert_ne!(api.port(), 0, "the daemon reports the port it bound");
            assert_eq!(tc_programs(&node, "vpod").len(), 2, "{:?}", tc_programs(&node, "vpod"));
            udp_from_pod(&pod, 44601, 9461);
            let url = format!("http://{api}/v1/flows?verdict=dropped&port=9461");
            let dropped = || {
                let list: Option<FlowList> = serde_json::from_str(&curl(&node, &[&url]).1).ok();
                list.map(|l| l.flows.iter().filter(|r| r.destination.port == 9461 && r.source.port == 44601).count())
            };
            assert!(wait_until(Duration::from_secs(20), || dropped() == Some(1)), "{:?}", dropped());
            let (status, _) = curl(&node, &[&format!("http://{}/readyz", running.metrics_address())]);
            assert_eq!(status, 200);
            (api, running.stop().await.unwrap_or_else(|e| panic!("{e:#}")))
        })
    })
    .join()
    .unwrap();
    assert!(stats.records >= 1, "{stats:?}");
    assert!(tc_programs(&format!("{tag}-node"), "vpod").is_empty(), "programs left attached after stop");
    let (status, _) = curl(&format!("{tag}-node"), &[&format!("http://{api}/healthz")]);
    assert_eq!(status, 0, "the API still answers after stop");
}
