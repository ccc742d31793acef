//! The nftables flavor's elements: keys, data and owner comments as the
//! kernel stores them, the batch messages that add and delete them, and
//! their decoding from a dump.

use super::*;

// Element encodings: every concatenated field padded to 4 bytes.
pub(super) fn proto_field(p: Proto) -> [u8; 4] {
    [p.number(), 0, 0, 0]
}

pub(super) fn port_field(port: u16) -> [u8; 4] {
    let b = port.to_be_bytes();
    [b[0], b[1], 0, 0]
}

pub(super) fn key_ip_proto_port(ip: Ipv4Addr, p: Proto, port: u16) -> Vec<u8> {
    let mut k = ip.octets().to_vec();
    k.extend_from_slice(&proto_field(p));
    k.extend_from_slice(&port_field(port));
    k
}

pub(super) fn dnat_key(m: &Mapping) -> Vec<u8> {
    key_ip_proto_port(m.key.public_ip, m.key.proto, m.key.public_port)
}

pub(super) fn dnat_data(m: &Mapping) -> Vec<u8> {
    let mut d = m.pod_ip.octets().to_vec();
    d.extend_from_slice(&port_field(m.pod_port));
    d
}

pub(super) fn snat_key(s: &SnatRule) -> Vec<u8> {
    let mut k = s.pod_ip.octets().to_vec();
    k.extend_from_slice(&proto_field(s.proto));
    k
}

pub(super) fn forward_key(f: &ForwardRule) -> Vec<u8> {
    key_ip_proto_port(f.pod_ip, f.proto, f.pod_port)
}

pub(super) fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

pub(super) fn port_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn proto_at(b: &[u8], at: usize) -> Option<Proto> {
    Proto::from_number(*b.get(at)?)
}

/// NFTNL_UDATA_SET_ELEM_COMMENT, the TLV nft reads as an element's comment.
pub(super) fn comment_udata(owner: &PodRef) -> Vec<u8> {
    let c = comment_for(owner);
    let mut v = vec![0u8, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

pub(super) fn parse_comment_udata(u: &[u8]) -> Option<PodRef> {
    let mut rest = u;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let val = rest.get(2..2 + len)?;
        if ty == 0 {
            let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
            return PodRef::from_comment(std::str::from_utf8(&val[..end]).ok()?);
        }
        rest = &rest[2 + len..];
    }
    None
}

/// One element: key, optional data, comment.
pub(super) struct Element {
    pub(super) key: Vec<u8>,
    pub(super) data: Option<Vec<u8>>,
    pub(super) owner: Option<PodRef>,
}

/// Writes NEWSETELEM/DELSETELEM messages, chunked below the 64 KiB limit
/// of one netlink attribute.
pub(super) fn add_elements(
    batch: &mut NftBatch,
    table: &str,
    set: &str,
    elems: &[Element],
    delete: bool,
) {
    const CHUNK_BYTES: usize = 48 * 1024;
    let mut i = 0;
    while i < elems.len() {
        let mut list = Attrs::new();
        let start = i;
        while i < elems.len() && list.len() < CHUNK_BYTES {
            let e = &elems[i];
            list.nest(sys::NFTA_LIST_ELEM, |a| {
                a.nest(sys::NFTA_SET_ELEM_KEY, |k| {
                    k.bytes(sys::NFTA_DATA_VALUE, &e.key);
                });
                if !delete {
                    if let Some(d) = &e.data {
                        a.nest(sys::NFTA_SET_ELEM_DATA, |k| {
                            k.bytes(sys::NFTA_DATA_VALUE, d);
                        });
                    }
                    if let Some(o) = &e.owner {
                        a.bytes(sys::NFTA_SET_ELEM_USERDATA, &comment_udata(o));
                    }
                }
            });
            i += 1;
        }
        let mut m = Attrs::new();
        m.str(sys::NFTA_SET_ELEM_LIST_TABLE, table)
            .str(sys::NFTA_SET_ELEM_LIST_SET, set)
            .nest(sys::NFTA_SET_ELEM_LIST_ELEMENTS, |n| {
                *n = list.clone();
            });
        let (ty, flags, verb) = if delete {
            (sys::NFT_MSG_DELSETELEM, 0, "delete")
        } else {
            (
                sys::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE as u32 | libc::NLM_F_EXCL as u32,
                "add",
            )
        };
        batch.add(
            NftMsg::new(ty, flags, m),
            format!(
                "{verb} {} element(s) of {set} in table ip {table}",
                i - start
            ),
        );
    }
}

pub(super) fn dnat_elements(v: &[Mapping]) -> Vec<Element> {
    v.iter()
        .map(|m| Element {
            key: dnat_key(m),
            data: Some(dnat_data(m)),
            owner: Some(m.owner.clone()),
        })
        .collect()
}

pub(super) fn snat_elements(v: &[SnatRule]) -> Vec<Element> {
    v.iter()
        .map(|s| Element {
            key: snat_key(s),
            data: Some(s.public_ip.octets().to_vec()),
            owner: Some(s.owner.clone()),
        })
        .collect()
}

pub(super) fn forward_elements(v: &[ForwardRule]) -> Vec<Element> {
    v.iter()
        .map(|f| Element {
            key: forward_key(f),
            data: None,
            owner: Some(f.owner.clone()),
        })
        .collect()
}

/// Element deletes first, then adds: a retargeted key is deleted and re-added
/// with its new data in the same batch.
pub(super) fn encode_changes(batch: &mut NftBatch, table: &str, ch: &Changes) {
    add_elements(
        batch,
        table,
        names::NFT_DNAT_MAP,
        &dnat_elements(&ch.del.dnat),
        true,
    );
    add_elements(
        batch,
        table,
        names::NFT_SNAT_MAP,
        &snat_elements(&ch.del.snat),
        true,
    );
    add_elements(
        batch,
        table,
        names::NFT_FORWARD_SET,
        &forward_elements(&ch.del.forward),
        true,
    );
    add_elements(
        batch,
        table,
        names::NFT_DNAT_MAP,
        &dnat_elements(&ch.add.dnat),
        false,
    );
    add_elements(
        batch,
        table,
        names::NFT_SNAT_MAP,
        &snat_elements(&ch.add.snat),
        false,
    );
    add_elements(
        batch,
        table,
        names::NFT_FORWARD_SET,
        &forward_elements(&ch.add.forward),
        false,
    );
}

pub(super) fn decode_element(
    set: &str,
    key: &[u8],
    data: &[u8],
    owner: PodRef,
    out: &mut RuleSet,
) -> bool {
    match set {
        names::NFT_DNAT_MAP => {
            let (Some(public_ip), Some(proto), Some(public_port), Some(pod_ip), Some(pod_port)) = (
                ip_at(key, 0),
                proto_at(key, 4),
                port_at(key, 8),
                ip_at(data, 0),
                port_at(data, 4),
            ) else {
                return false;
            };
            out.dnat.push(Mapping {
                key: NatKey {
                    public_ip,
                    public_port,
                    proto,
                },
                pod_ip,
                pod_port,
                owner,
            });
        }
        names::NFT_SNAT_MAP => {
            let (Some(pod_ip), Some(proto), Some(public_ip)) =
                (ip_at(key, 0), proto_at(key, 4), ip_at(data, 0))
            else {
                return false;
            };
            out.snat.push(SnatRule {
                pod_ip,
                proto,
                public_ip,
                owner,
            });
        }
        _ => {
            let (Some(pod_ip), Some(proto), Some(pod_port)) =
                (ip_at(key, 0), proto_at(key, 4), port_at(key, 8))
            else {
                return false;
            };
            out.forward.push(ForwardRule {
                pod_ip,
                proto,
                pod_port,
                owner,
            });
        }
    }
    true
}
