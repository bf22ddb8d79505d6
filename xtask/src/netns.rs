//! Work inside a network namespace from a short-lived thread that entered it, and plain HTTP/1.0
//! GETs to servers that listen there (the lab's node): the socket is created in the namespace and
//! used from anywhere.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// Runs `f` on a thread that entered network namespace `netns`: sockets it creates (netlink
/// included) and interface indexes it uses belong to that namespace.
pub fn run_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let name = netns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<T> {
        let ns = std::fs::File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("no network namespace {name}"))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {name}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in network namespace {netns} panicked"))?
}

/// A TCP connection opened from inside network namespace `netns`.
pub fn connect(netns: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    Ok(run_in(netns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??)
}

/// GET `path` from `addr` in `netns`: the status code and body.
pub fn get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = connect(netns, addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("malformed HTTP response from {addr}{path}") };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status code")?;
    Ok((status, body.to_owned()))
}
