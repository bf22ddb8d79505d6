//! The API's delegated authentication under faults: an API server that accepts reviews and never
//! answers, callers that flood it with tokens, and grants revoked while a follow stream is open.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::apiserver::{FakeApiServer, namespace};
use support::{Cleanup, Daemon, connect, curl, node_and_pod, start_daemon, tag, udp_flows_from_pod, wait_until};

const FLOWS: &str = "https://127.0.0.1:9963/v1/flows";

/// A daemon in its own node namespace whose API asks `fake` about every token.
/// The scratch directory (kubeconfig, store, the generated CA) goes with the returned `TempDir`.
async fn daemon_asking_a_fake(prefix: &str) -> (String, String, Cleanup, FakeApiServer, Daemon, tempfile::TempDir) {
    let tag = tag(prefix);
    let (node, pod, mut cleanup) = node_and_pod(&tag);
    let fake = FakeApiServer::start_in(Some(&node)).await;
    fake.apply(namespace("default", json!({"kubernetes.io/metadata.name": "default"})));
    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let kubeconfig = dir.join("kubeconfig");
    fake.kubeconfig(&kubeconfig);
    let store = dir.join("evidence.redb");
    cleanup.files.push(store.clone());
    let args = ["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "n1", "--api-auth", "kubernetes"];
    let daemon =
        start_daemon(&node, &store, &[&args[..], &["--auth-cache-ttl", "2s", "--drain-interval", "200ms"]].concat());
    (node, pod, cleanup, fake, daemon, scratch)
}

/// `count` API calls at once, each with its token: their (status, body), in order.
fn concurrent_calls(node: &str, tokens: Vec<String>) -> Vec<(u16, String)> {
    let calls: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let node = node.to_owned();
            std::thread::spawn(move || {
                let header = format!("Authorization: Bearer {token}");
                curl(&node, &["--max-time", "60", FLOWS, "-H", &header])
            })
        })
        .collect();
    calls.into_iter().map(|c| c.join().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_never_answers_costs_callers_seconds_and_is_asked_once_per_token() {
    let (node, _pod, _cleanup, fake, mut daemon, _scratch) = daemon_asking_a_fake("nf").await;
    fake.add_token("t-alice", "alice", &[]);
    fake.grant("alice", true);
    fake.stall_reviews(true);

    // Twelve callers with one token: one review, and every caller refused within seconds.
    let answers = concurrent_calls(&node, vec!["t-alice".to_owned(); 12]);
    for (status, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains("did not answer the review within 5s"), "{body}");
    }
    assert_eq!(fake.reviews(), 1, "identical reviews in flight are made once");

    // Thirty callers with distinct made-up tokens: refused, and the API server sees a bounded few.
    let before = fake.reviews();
    let answers = concurrent_calls(&node, (0..30).map(|i| format!("made-up-{i}")).collect());
    assert!(answers.iter().all(|(status, _)| *status == 503), "{answers:?}");
    let asked = fake.reviews() - before;
    assert!(asked <= 8, "{asked} reviews reached the API server for 30 callers");

    // Answered again: a refused token is cached too, so repeating it does not ask again.
    fake.stall_reviews(false);
    let header = "Authorization: Bearer not-a-token";
    assert_eq!(curl(&node, &[FLOWS, "-H", header]).0, 401);
    let before = fake.reviews();
    assert_eq!(curl(&node, &[FLOWS, "-H", header]).0, 401);
    assert_eq!(fake.reviews(), before, "the negative decision came from the cache");
    assert_eq!(curl(&node, &[FLOWS, "-H", "Authorization: Bearer t-alice"]).0, 200);
    assert!(daemon.is_running());
    daemon.stop().unwrap();
}

/// `netiso observe -f` as `token`'s holder; its stdout and stderr lines as they come.
fn follow(node: &str, ca: &Path, token: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node, env!("CARGO_BIN_EXE_netiso"), "observe", "-f", "-o", "json"])
        .args(["--server", "https://127.0.0.1:9963", "--token", token, "--ca-file"])
        .arg(ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    (child, lines)
}

/// The last lines, for failure messages (a stream carries many).
fn tail(lines: &Mutex<Vec<String>>) -> Vec<String> {
    let lines = lines.lock().unwrap();
    lines[lines.len().saturating_sub(3)..].to_vec()
}

fn received(lines: &Mutex<Vec<String>>, port: u16) -> bool {
    lines.lock().unwrap().iter().any(|l| l.contains(&format!("\"port\":{port}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_ends_an_open_follow_stream_within_the_cache_ttl() {
    let (node, pod, _cleanup, fake, mut daemon, scratch) = daemon_asking_a_fake("nv").await;
    connect(&node, &pod);
    fake.add_token("t-erin", "erin", &[]);
    fake.add_token("t-frank", "frank", &[]);
    fake.grant("erin", true);
    fake.grant("frank", true);
    let ca = scratch.path().join("api-ca.pem");
    let (mut erin, erin_lines) = follow(&node, &ca, "t-erin");
    let (mut frank, frank_lines) = follow(&node, &ca, "t-frank");

    udp_flows_from_pod(&pod, 47101, 1, 9451);
    let both = || received(&erin_lines, 9451) && received(&frank_lines, 9451);
    assert!(wait_until(Duration::from_secs(30), both), "{:?} {:?}", tail(&erin_lines), tail(&frank_lines));

    fake.grant("erin", false);
    assert!(
        wait_until(Duration::from_secs(30), || erin.try_wait().unwrap().is_some()),
        "erin's stream still open after her grant was revoked: {:?}",
        tail(&erin_lines)
    );
    assert!(!erin.wait().unwrap().success());
    let said = erin_lines.lock().unwrap().join("\n");
    assert!(said.contains("stream ended: user erin may not get nodes/proxy n1"), "{said}");

    // A caller whose grant stands keeps the stream, across several re-checks.
    udp_flows_from_pod(&pod, 47102, 1, 9452);
    assert!(wait_until(Duration::from_secs(30), || received(&frank_lines, 9452)), "{:?}", tail(&frank_lines));
    assert!(frank.try_wait().unwrap().is_none(), "{:?}", tail(&frank_lines));
    frank.kill().unwrap();
    frank.wait().unwrap();
    daemon.stop().unwrap();
}
