//! Traffic for the lab: a TCP/UDP echo server and probes that report whether a flow got through.
//! They run inside a pod's network namespace through `ip netns exec`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};

/// Serves TCP and UDP on `port` (IPv4 and IPv6): TCP answers one line and closes, UDP echoes.
pub fn serve(port: u16) -> anyhow::Result<()> {
    let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let tcp = TcpListener::bind(any).with_context(|| format!("binding TCP {port}"))?;
    let udp = UdpSocket::bind(any).with_context(|| format!("binding UDP {port}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    for stream in tcp.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = writeln!(stream, "ok {peer}");
        });
    }
    Ok(())
}

fn any_addr(remote: &SocketAddr, port: u16) -> SocketAddr {
    let ip = if remote.is_ipv4() { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
    SocketAddr::new(ip, port)
}

/// Connects from `source_port` (0: any) so the flow's 5-tuple is known in advance.
fn connect(addr: SocketAddr, source_port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&any_addr(&addr, source_port).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Connects from `source_port` (0: any) and reads the server's line.
pub fn tcp(addr: SocketAddr, source_port: u16, timeout: Duration) -> bool {
    let Ok(mut stream) = connect(addr, source_port, timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut line = [0u8; 64];
    matches!(stream.read(&mut line), Ok(n) if n > 0)
}

/// Sends a datagram from `source_port` (0: any) and waits for its echo.
pub fn udp(addr: SocketAddr, source_port: u16, timeout: Duration) -> bool {
    let Ok(socket) = UdpSocket::bind(any_addr(&addr, source_port)) else { return false };
    let _ = socket.set_read_timeout(Some(timeout));
    if socket.send_to(b"netiso-lab", addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(socket.recv_from(&mut buf), Ok((n, _)) if n > 0)
}

fn dns_query(name: &str, id: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The IPv4 addresses in the answer section of a response to [`dns_query`].
fn dns_answers(response: &[u8], id: u16) -> anyhow::Result<Vec<IpAddr>> {
    if response.len() < 12 || response[..2] != id.to_be_bytes() {
        bail!("not a response to our query");
    }
    let rcode = response[3] & 0x0f;
    if rcode != 0 {
        bail!("DNS error rcode {rcode}");
    }
    let answers = u16::from_be_bytes([response[6], response[7]]) as usize;
    // Skip the header and the echoed question.
    let mut at = 12;
    while at < response.len() && response[at] != 0 {
        at += response[at] as usize + 1;
    }
    at += 5;
    let mut ips = Vec::new();
    for _ in 0..answers {
        // Name (a pointer, or labels), then type, class, ttl, rdlength.
        if response.get(at).is_some_and(|b| b & 0xc0 == 0xc0) {
            at += 2;
        } else {
            while at < response.len() && response[at] != 0 {
                at += response[at] as usize + 1;
            }
            at += 1;
        }
        let header = response.get(at..at + 10).context("truncated answer")?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let len = u16::from_be_bytes([header[8], header[9]]) as usize;
        at += 10;
        let data = response.get(at..at + len).context("truncated answer")?;
        if rtype == 1 && len == 4 {
            ips.push(IpAddr::from([data[0], data[1], data[2], data[3]]));
        }
        at += len;
    }
    Ok(ips)
}

/// Resolves `name` (A record) at `server` over UDP or TCP.
pub fn dns(server: SocketAddr, name: &str, over_tcp: bool, timeout: Duration) -> anyhow::Result<Vec<IpAddr>> {
    let id = std::process::id() as u16;
    let query = dns_query(name, id);
    let response = if over_tcp {
        let mut stream = TcpStream::connect_timeout(&server, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(&(query.len() as u16).to_be_bytes())?;
        stream.write_all(&query)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut body)?;
        body
    } else {
        let socket = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(&query, server)?;
        let mut buf = [0u8; 512];
        let (n, _) = socket.recv_from(&mut buf)?;
        buf[..n].to_vec()
    };
    dns_answers(&response, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_with_a_compressed_name() {
        let id = 7;
        let mut response = dns_query("api.production.svc.cluster.local", id);
        response[2] = 0x81;
        response[3] = 0x80;
        response[7] = 1; // one answer
        response.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 244, 0, 30]);
        assert_eq!(dns_answers(&response, id).unwrap(), vec![IpAddr::from([10, 244, 0, 30])]);
        response[3] = 0x83;
        assert!(dns_answers(&response, id).is_err(), "NXDOMAIN is an error");
    }

    #[test]
    fn echo_server_and_probes_over_loopback() {
        let port = {
            let l = TcpListener::bind("[::1]:0").unwrap();
            l.local_addr().unwrap().port()
        };
        std::thread::spawn(move || serve(port));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut up = false;
        for _ in 0..50 {
            if tcp(addr, 0, Duration::from_millis(200)) {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(up, "server answers TCP over IPv4");
        assert!(udp(addr, 0, Duration::from_millis(500)));
        assert!(tcp(format!("[::1]:{port}").parse().unwrap(), 0, Duration::from_millis(500)));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(!tcp(closed, 0, Duration::from_millis(200)));
    }
}
