//! A removed mapping's connections: conntrack would keep sending a UDP
//! peer's datagrams, and an established TCP connection's segments, to the
//! old pod after its mapping is removed or moves (a namespace that lost the
//! port keeps its open connections otherwise). This deletes the entries whose
//! original destination is the public address:port/proto (ctnetlink, through
//! netlink-packet-netfilter), as kube-proxy does for UDP on endpoint changes.
//! A key that keeps its mapping but admits fewer sources (`sourceRanges`)
//! loses the entries from the sources it no longer admits.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::model::{NatKey, Proto};
use crate::net::dump::{read_dump, DumpError};

/// What to flush.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Every entry to these keys.
    pub whole: BTreeSet<NatKey>,
    /// The entries to these keys from a source outside the ranges listed.
    pub outside: BTreeMap<NatKey, Vec<ipnet::IpNet>>,
    /// The entries to these keys that were not DNATed (they went to the
    /// node itself, before the key admitted their source or existed).
    pub unnated: BTreeSet<NatKey>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.whole.is_empty() && self.outside.is_empty() && self.unnated.is_empty()
    }

    fn keys(&self) -> impl Iterator<Item = &NatKey> {
        self.whole
            .iter()
            .chain(self.outside.keys())
            .chain(self.unnated.iter())
    }

    /// Whether the entry from `source` to `dst` goes; `natted`: its reply
    /// comes from elsewhere than `dst` (it was DNATed).
    fn doomed(&self, dst: &NatKey, source: Option<IpAddr>, natted: bool) -> bool {
        self.whole.contains(dst)
            || (!natted && self.unnated.contains(dst))
            || self.outside.get(dst).is_some_and(|admitted| {
                source.is_none_or(|s| !admitted.iter().any(|n| n.contains(&s)))
            })
    }
}

/// Errors while flushing conntrack entries.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("conntrack netlink message: {0}")]
    Decode(String),
    #[error("conntrack dump: {0}")]
    Dump(#[from] DumpError),
    #[error("the kernel refused a conntrack request: errno {0}")]
    Refused(i32),
}

fn request(msg: ConntrackMessage, family: NetfilterProtoFamily, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            msg,
        )),
    );
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// The original-direction destination of an entry, if it is TCP or UDP,
/// and its source address.
fn destination(tuple: &[Tuple]) -> Option<(NatKey, Option<IpAddr>)> {
    let (key, src, _) = endpoints(tuple)?;
    Some((key, src))
}

/// A tuple's destination (as a key, if TCP or UDP), its source address and
/// source port.
fn endpoints(tuple: &[Tuple]) -> Option<(NatKey, Option<IpAddr>, Option<u16>)> {
    let mut src = None;
    let mut sport = None;
    let mut dst = None;
    let mut port = None;
    let mut proto = None;
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(Protocol::Udp) => proto = Some(Proto::Udp),
                        ProtoTuple::Protocol(Protocol::Tcp) => proto = Some(Proto::Tcp),
                        ProtoTuple::DestinationPort(d) => port = Some(*d),
                        ProtoTuple::SourcePort(s) => sport = Some(*s),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let key = NatKey {
        public_ip: dst?,
        public_port: port?,
        proto: proto?,
    };
    Some((key, src, sport))
}

/// Whether an entry was DNATed: its reply does not come from the original
/// destination.
fn natted(orig: &NatKey, reply: Option<&[Tuple]>) -> bool {
    match reply.and_then(endpoints) {
        Some((_, from, from_port)) => {
            from != Some(orig.public_ip) || from_port != Some(orig.public_port)
        }
        None => true,
    }
}

/// Deletes every conntrack entry whose original destination is one of
/// `targets` (protocol, public address, public port), from any source or
/// from outside the ranges still admitted. Returns how many were
/// deleted. Runs in the calling thread's network namespace.
pub fn flush(targets: &Targets) -> Result<usize, ConntrackError> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut seq = 0;
    let mut deleted = 0;
    // A dump answers for the family its header names, and a delete's tuple
    // is read in the family of its header: one round per family.
    for (v6, family) in [
        (false, NetfilterProtoFamily::IPv4),
        (true, NetfilterProtoFamily::IPv6),
    ] {
        if targets.keys().any(|k| k.public_ip.is_ipv6() == v6) {
            deleted += flush_family(&mut sock, family, targets, &mut seq)?;
        }
    }
    Ok(deleted)
}

fn flush_family(
    sock: &mut Socket,
    family: NetfilterProtoFamily,
    targets: &Targets,
    seq: &mut u32,
) -> Result<usize, ConntrackError> {
    *seq += 1;
    sock.send(
        &request(ConntrackMessage::Get(vec![]), family, NLM_F_DUMP, *seq),
        0,
    )?;

    let mut doomed: Vec<Vec<Tuple>> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    read_dump(sock, &mut buf, |m: NetfilterMessage| {
        let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = m.inner else {
            return;
        };
        let (mut orig, mut reply) = (None, None);
        for a in attrs {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
                ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
                _ => {}
            }
        }
        let Some(t) = orig else {
            return;
        };
        if let Some((d, s)) = destination(&t) {
            if targets.doomed(&d, s, natted(&d, reply.as_deref())) {
                doomed.push(t);
            }
        }
    })?;
    let mut deleted = 0;
    for tuple in doomed {
        *seq += 1;
        sock.send(
            &request(
                ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
                family,
                NLM_F_ACK,
                *seq,
            ),
            0,
        )?;
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[..n])
            .map_err(|e| ConntrackError::Decode(e.to_string()))?;
        match msg.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                // ENOENT: it expired meanwhile; that is the goal anyway.
                let code = e.code.map_or(0, |c| c.get());
                if code != -libc::ENOENT {
                    return Err(ConntrackError::Refused(code));
                }
            }
            _ => deleted += 1,
        }
    }
    Ok(deleted)
}
