//! Where the kernel's connection tracking sent a connection: kube-proxy DNATs a Service's
//! ClusterIP to a backend, and the conntrack entry's reply tuple names that backend. Asked over
//! ctnetlink, one entry at a time, for connections whose translated packet netiso did not see (a
//! backend on another node).

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use super::record::IpProtocol;

/// A connection's original direction: what the client sent, before any translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub protocol: IpProtocol,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Where connections were translated to.
pub trait Translations: Send {
    /// The address the connection's packets were delivered to after DNAT, if it was translated
    /// and is still tracked.
    fn translated_destination(&mut self, connection: &Connection) -> Option<SocketAddr>;
}

/// The connection tracking table of this network namespace.
pub struct Conntrack {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Conntrack {
    /// Needs CAP_NET_ADMIN in the namespace, and the kernel's nf_conntrack_netlink.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        // The kernel answers a GET at once; a bound keeps a lost answer from stalling the caller.
        let bound = nix::sys::time::TimeVal::new(1, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &bound)?;
        Ok(Conntrack { socket, sequence: 0, buffer: vec![0; 8192] })
    }

    /// The entry whose original tuple is `connection`: its reply tuple's source, the address the
    /// connection really reaches. `None` when no entry matches (never tracked, or expired).
    pub fn reply_source(&mut self, connection: &Connection) -> io::Result<Option<SocketAddr>> {
        let protocol = match connection.protocol {
            IpProtocol::Tcp => CtProtocol::Tcp,
            IpProtocol::Udp => CtProtocol::Udp,
            IpProtocol::Sctp => CtProtocol::Sctp,
            _ => return Ok(None),
        };
        let family = match connection.source {
            SocketAddr::V4(_) => NetfilterProtoFamily::IPv4,
            SocketAddr::V6(_) => NetfilterProtoFamily::IPv6,
        };
        let original = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(connection.source.ip()),
                IPTuple::DestinationAddress(connection.destination.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(protocol),
                ProtoTuple::SourcePort(connection.source.port()),
                ProtoTuple::DestinationPort(connection.destination.port()),
            ]),
        ];
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(original)]),
            )),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buffer[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("ctnetlink answer: {e}")))?;
                let length = message.header.length as usize;
                if message.header.sequence_number == self.sequence {
                    return answer(message.payload);
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

impl Translations for Conntrack {
    fn translated_destination(&mut self, connection: &Connection) -> Option<SocketAddr> {
        match self.reply_source(connection) {
            Ok(source) => source.filter(|s| *s != connection.destination),
            Err(e) => {
                tracing::debug!(error = %e, ?connection, "conntrack lookup failed");
                None
            }
        }
    }
}

fn answer(payload: NetlinkPayload<NetfilterMessage>) -> io::Result<Option<SocketAddr>> {
    match payload {
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
            ..
        }) => Ok(reply_source(&attributes)),
        NetlinkPayload::Error(e) => match e.code {
            Some(code) if code.get() == -(nix::errno::Errno::ENOENT as i32) => Ok(None),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(None),
        },
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected ctnetlink answer {other:?}"))),
    }
}

/// The reply tuple's source: where the connection's answers come from.
fn reply_source(attributes: &[ConntrackAttribute]) -> Option<SocketAddr> {
    let reply = attributes.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleReply(tuple) => Some(tuple),
        _ => None,
    })?;
    let mut ip = None;
    let mut port = None;
    for part in reply {
        match part {
            Tuple::Ip(parts) => {
                ip = parts.iter().find_map(|p| match p {
                    IPTuple::SourceAddress(a) => Some(*a),
                    _ => None,
                })
            }
            Tuple::Proto(parts) => {
                port = parts.iter().find_map(|p| match p {
                    ProtoTuple::SourcePort(p) => Some(*p),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}
