//! Plain HTTP/1.0 GETs to servers that listen inside a network namespace (the lab's node): the
//! socket is created in that namespace by a short-lived thread and used from anywhere.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// A TCP connection opened from inside network namespace `netns`.
pub fn connect(netns: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let name = netns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        let ns = std::fs::File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("no network namespace {name}"))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
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
