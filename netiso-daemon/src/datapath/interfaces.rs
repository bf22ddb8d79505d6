//! Watches the network namespace's links over rtnetlink so the tc programs follow pod
//! interfaces as they appear and go, and its addresses, which are the node's own.

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{MulticastGroup, new_connection, new_multicast_connection};
use tokio::sync::mpsc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub is_veth: bool,
    /// For a pair device (veth, netkit) whose peer is in another namespace: that namespace's
    /// nsid as this namespace knows it.
    pub peer_netns_id: Option<i32>,
}

#[derive(Debug)]
pub enum LinkChange {
    Present(Link),
    Gone(u32),
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut is_veth = false;
    let mut peer_netns_id = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkNetNsId(id) => peer_netns_id = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                is_veth |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    Some(Link { index: msg.header.index, name: name?, is_veth, peer_netns_id })
}

/// Current links of this network namespace.
pub async fn list() -> std::io::Result<Vec<Link>> {
    let (conn, handle, _) = new_connection()?;
    let task = tokio::spawn(conn);
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(std::io::Error::other)?;
    task.abort();
    Ok(links.iter().filter_map(link_of).collect())
}

/// Sends every current link, then every change, until the receiver is dropped. Subscribes before
/// listing so a link created in between is not missed (it may be reported twice, which the
/// consumer tolerates).
pub async fn watch(changes: mpsc::Sender<LinkChange>) -> std::io::Result<()> {
    let (conn, _handle, mut messages) = new_multicast_connection(&[MulticastGroup::Link])?;
    let task = tokio::spawn(conn);
    for link in list().await? {
        if changes.send(LinkChange::Present(link)).await.is_err() {
            task.abort();
            return Ok(());
        }
    }
    while let Some((message, _)) = messages.next().await {
        let change = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link_of(&link).map(LinkChange::Present),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Some(LinkChange::Gone(link.header.index))
            }
            _ => None,
        };
        if let Some(change) = change
            && changes.send(change).await.is_err()
        {
            break;
        }
    }
    task.abort();
    Ok(())
}

/// The interface's own address: IFA_LOCAL where given (it differs from IFA_ADDRESS, the peer's,
/// on point-to-point links), else IFA_ADDRESS.
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let attribute = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    attribute(true).or_else(|| attribute(false))
}

/// This network namespace's addresses, loopback left out: what traffic from this node comes from.
pub async fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let (conn, handle, _) = new_connection()?;
    let task = tokio::spawn(conn);
    let listed = handle.address().get().execute().try_collect::<Vec<AddressMessage>>().await;
    task.abort();
    let mut addresses: Vec<IpAddr> =
        listed.map_err(std::io::Error::other)?.iter().filter_map(address_of).filter(|ip| !ip.is_loopback()).collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Sends the addresses, then again after every address change, until the receiver is dropped.
/// Subscribes before the first listing, so no change goes unseen.
pub async fn watch_addresses(updates: mpsc::Sender<Vec<IpAddr>>) -> std::io::Result<()> {
    let groups = [MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr];
    let (conn, _handle, mut messages) = new_multicast_connection(&groups)?;
    let task = tokio::spawn(conn);
    let result = async {
        if updates.send(addresses().await?).await.is_err() {
            return Ok(());
        }
        while messages.next().await.is_some() {
            if updates.send(addresses().await?).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}
