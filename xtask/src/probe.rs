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

/// How a probe ended: what the sender learns tells a drop from a reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered.
    Through,
    /// Nothing came back before the timeout (a silent drop).
    NoAnswer,
    /// A TCP reset or an ICMP port unreachable.
    Refused,
    /// An ICMP error other than port unreachable (administratively prohibited, ...).
    Unreachable,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Through => "ALLOWED",
            Outcome::NoAnswer => "DROPPED",
            Outcome::Refused => "REFUSED",
            Outcome::Unreachable => "REJECTED",
        })
    }
}

impl Outcome {
    /// The probe subcommand's exit status.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Through => 0,
            Outcome::NoAnswer => 1,
            Outcome::Refused => 2,
            Outcome::Unreachable => 3,
        }
    }

    pub fn from_exit_code(code: i32) -> Self {
        match code {
            0 => Outcome::Through,
            2 => Outcome::Refused,
            3 => Outcome::Unreachable,
            _ => Outcome::NoAnswer,
        }
    }

    fn of_error(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Outcome::Refused,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Outcome::Unreachable,
            _ => Outcome::NoAnswer,
        }
    }

    fn of_answer(answered: std::io::Result<usize>) -> Self {
        match answered {
            Ok(0) => Outcome::NoAnswer,
            Ok(_) => Outcome::Through,
            Err(e) => Outcome::of_error(&e),
        }
    }
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
pub fn tcp(addr: SocketAddr, source_port: u16, timeout: Duration) -> Outcome {
    let mut stream = match connect(addr, source_port, timeout) {
        Ok(stream) => stream,
        Err(e) => return Outcome::of_error(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut line = [0u8; 64];
    Outcome::of_answer(stream.read(&mut line))
}

/// Sends a datagram from `source_port` (0: any) and waits for its echo. The socket is connected,
/// so an ICMP error comes back as an error.
pub fn udp(addr: SocketAddr, source_port: u16, timeout: Duration) -> Outcome {
    let exchange = || -> std::io::Result<usize> {
        let socket = UdpSocket::bind(any_addr(&addr, source_port))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(addr)?;
        socket.send(b"netiso-lab")?;
        let mut buf = [0u8; 64];
        socket.recv(&mut buf)
    };
    Outcome::of_answer(exchange())
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

/// Resolves `name` (A record) at `server` over UDP or TCP, from `source_port` (0: any).
pub fn dns(
    server: SocketAddr,
    source_port: u16,
    name: &str,
    over_tcp: bool,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let id = std::process::id() as u16;
    let query = dns_query(name, id);
    let response = if over_tcp {
        let mut stream = connect(server, source_port, timeout)?;
        // The client closes first here: a reset instead of TIME_WAIT lets the next probe use
        // the same source port at once.
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(&(query.len() as u16).to_be_bytes())?;
        stream.write_all(&query)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut body)?;
        body
    } else {
        let socket = UdpSocket::bind(any_addr(&server, source_port))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(server)?;
        socket.send(&query)?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        buf[..n].to_vec()
    };
    dns_answers(&response, id)
}

/// How resolving `name` at `server` ended: through only with at least one address.
pub fn dns_outcome(server: SocketAddr, source_port: u16, name: &str, over_tcp: bool, timeout: Duration) -> Outcome {
    match dns(server, source_port, name, over_tcp, timeout) {
        Ok(ips) if !ips.is_empty() => Outcome::Through,
        Ok(_) => Outcome::NoAnswer,
        Err(e) => e.downcast_ref::<std::io::Error>().map_or(Outcome::NoAnswer, Outcome::of_error),
    }
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
            if tcp(addr, 0, Duration::from_millis(200)) == Outcome::Through {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(up, "server answers TCP over IPv4");
        assert_eq!(udp(addr, 0, Duration::from_millis(500)), Outcome::Through);
        assert_eq!(tcp(format!("[::1]:{port}").parse().unwrap(), 0, Duration::from_millis(500)), Outcome::Through);
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(tcp(closed, 0, Duration::from_millis(200)), Outcome::Refused);
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(udp(closed, 0, Duration::from_millis(500)), Outcome::Refused, "the port unreachable is heard");
    }
}
