//! The node's own services, read from the kernel with NETLINK_SOCK_DIAG (no
//! `ss`): TCP listeners and unconnected UDP sockets of the network namespace
//! the agent runs in (the host's), per family. Kernel tunnel sockets (VXLAN,
//! Geneve) are UDP sockets of the kernel and show up here like user ones.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{
    nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use super::dump::{read_dump, DumpError};
use crate::model::{Families, Family, Proto};
use crate::plan::admission::{Bound, NodeServices};

/// Why the node's sockets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("cannot read the node's sockets (NETLINK_SOCK_DIAG): {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot read the node's sockets (NETLINK_SOCK_DIAG): {0}")]
    Dump(#[from] DumpError),
}

/// Every TCP listener and unconnected UDP socket of `families`, with its
/// protocol, port and local address (the wildcard included). One dump per
/// family and protocol on one netlink socket.
pub fn node_services(families: Families) -> Result<NodeServices, SocketsError> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // An IPv6 wildcard without IPV6_V6ONLY takes IPv4 too: IPv6 sockets are
    // read for an IPv4-only agent as well.
    let mut wanted: Vec<Family> = families.iter().collect();
    if !wanted.contains(&Family::Ipv6) {
        wanted.push(Family::Ipv6);
    }
    for family in wanted {
        // A UDP socket that serves is unconnected (TCP_CLOSE in the diag
        // states); a connected one is somebody's client.
        for (proto, states) in [
            (Proto::Tcp, StateFlags::LISTEN),
            (Proto::Udp, StateFlags::CLOSE),
        ] {
            dump(&mut sock, &mut buf, family, proto, states, &mut found)?;
        }
    }
    Ok(NodeServices::from_sockets(found))
}

fn dump(
    sock: &mut Socket,
    buf: &mut [u8],
    family: Family,
    proto: Proto,
    states: StateFlags,
    found: &mut Vec<(Proto, u16, Bound)>,
) -> Result<(), SocketsError> {
    let (af, socket_id) = match family {
        Family::Ipv4 => (AF_INET, SocketId::new_v4()),
        Family::Ipv6 => (AF_INET6, SocketId::new_v6()),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: af,
            protocol: match proto {
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
            },
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut out = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut out);
    sock.send(&out, 0)?;
    read_dump(sock, buf, |m: SockDiagMessage| {
        let SockDiagMessage::InetResponse(r) = m else {
            return;
        };
        let id = &r.header.socket_id;
        // Sockets not yet bound to a port serve nothing.
        if id.source_port == 0 {
            return;
        }
        let v6only = r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true)));
        found.push((
            proto,
            id.source_port,
            Bound {
                addr: id.source_address,
                v6only,
            },
        ));
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NatKey;

    /// Runs in the test process's own network namespace: reads sockets the
    /// test opened itself on loopback, which nothing else can have.
    #[test]
    fn finds_a_tcp_listener_and_a_bound_udp_socket_but_not_a_connected_one() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(udp.local_addr().unwrap()).unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let s = node_services(Families::default()).unwrap();
        let key = |addr: std::net::SocketAddr, proto| NatKey {
            public_ip: addr.ip(),
            public_port: addr.port(),
            proto,
        };
        assert!(s
            .serving(&key(tcp.local_addr().unwrap(), Proto::Tcp))
            .is_some());
        assert!(s
            .serving(&key(udp.local_addr().unwrap(), Proto::Udp))
            .is_some());
        assert!(s
            .serving(&key(client.local_addr().unwrap(), Proto::Udp))
            .is_none());
        if let Some(v6) = v6 {
            assert!(s
                .serving(&key(v6.local_addr().unwrap(), Proto::Tcp))
                .is_some());
        }
    }
}
