//! The listeners hold when the process runs out of file descriptors: idle connections that never
//! handshake are closed after `--connection-timeout`, accepting resumes by itself, and readiness
//! says meanwhile that the API listener cannot accept.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{curl, node_and_pod, start_daemon, tag, wait_until, write_certificate};

/// One request on a kept-alive HTTP/1.1 connection: (status, body).
fn get(connection: &mut TcpStream, path: &str) -> (u16, String) {
    write!(connection, "GET {path} HTTP/1.1\r\nHost: netiso\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = connection.read(&mut chunk).expect("the kept-alive connection answers");
        assert!(n > 0, "the kept-alive connection was closed");
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a content-length");
        if body.len() >= length {
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            return (status, body[..length].to_owned());
        }
    }
}

/// TCP connections opened from inside `netns`, returned open (a socket keeps its namespace).
fn connect_from(netns: &str, to: &str, count: usize) -> Vec<TcpStream> {
    let path = format!("/run/netns/{netns}");
    let to = to.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        (0..count).map(|_| TcpStream::connect(&to).unwrap()).collect()
    })
    .join()
    .unwrap()
}

#[test]
fn the_api_listener_survives_running_out_of_file_descriptors() {
    let tag = tag("nm");
    let (node, _pod, mut cleanup) = node_and_pod(&tag);
    // Removed when dropped, also when the test fails: it holds keys and kubeconfigs.
    let scratch = tempfile::Builder::new().prefix(&tag).tempdir().unwrap();
    let dir = scratch.path();
    let (ca, cert, key) = write_certificate(dir, "api");
    let store = dir.join("evidence.redb");
    cleanup.files.push(store.clone());
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let mut daemon = start_daemon(&node, &store, &[&tls[..], &["--connection-timeout", "3s"]].concat());
    let api = |ca: &std::path::Path| {
        curl(&node, &["--max-time", "5", "--cacert", ca.to_str().unwrap(), "https://127.0.0.1:9963/v1/flows"])
    };
    assert!(wait_until(Duration::from_secs(20), || curl(&node, &["http://127.0.0.1:9962/readyz"]).0 == 200));
    assert_eq!(api(&ca).0, 200);

    // A probe's connection, opened while descriptors are free and kept alive by asking often.
    let mut probe = connect_from(&node, "127.0.0.1:9962", 1).pop().unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(get(&mut probe, "/readyz").0, 200);

    // Leave the daemon 16 descriptors, then hold 48 connections that never start TLS: 16 are
    // accepted, the rest wait in the listen backlog (128) while accept fails with EMFILE.
    let open = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).unwrap().count();
    let limit = format!("--nofile={}", open + 16);
    let lowered =
        std::process::Command::new("prlimit").args(["--pid", &daemon.pid().to_string(), &limit]).status().unwrap();
    assert!(lowered.success());
    let idle = connect_from(&node, "127.0.0.1:9963", 48);

    let mut seen = (0, String::new());
    let unready = wait_until(Duration::from_secs(30), || {
        seen = get(&mut probe, "/readyz");
        seen.0 == 503 && seen.1.contains("the api listener cannot accept connections")
    });
    assert!(unready, "readiness did not report the failing listener: {seen:?}");
    let (_, metrics) = get(&mut probe, "/metrics");
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("netiso_http_accept_errors_total{listener=\"api\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(errors.is_some_and(|e| e > 0.0), "accept errors not counted: {errors:?}");

    // The idle connections time out, the backlog drains, and the API answers again: the listener
    // never stopped.
    drop(probe);
    let recovered = wait_until(Duration::from_secs(90), || {
        api(&ca).0 == 200 && curl(&node, &["--max-time", "5", "http://127.0.0.1:9962/readyz"]).0 == 200
    });
    assert!(
        recovered,
        "the API did not come back: {:?}",
        daemon.diagnostics().iter().rev().take(5).collect::<Vec<_>>()
    );
    let mut first = &idle[0];
    first.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(first.read(&mut [0u8; 16]).unwrap(), 0, "an idle connection that never handshook was closed");
    assert!(daemon.is_running());
    assert!(daemon.diagnostics().iter().any(|l| l.contains("accepting connections again")));
    drop(idle);
    daemon.stop().unwrap();
}
