//! The nftables flavor's elements: keys, data and owner comments as the
//! kernel stores them, the batch messages that add and delete them, and
//! their decoding from a dump.

use super::*;
#[cfg(test)]
use crate::firewall::comment_for;
use crate::firewall::wire::udata;
use crate::firewall::MAX_COMMENT;

// Element encodings: every concatenated field padded to 4 bytes.
pub(super) fn proto_field(p: Proto) -> [u8; 4] {
    [p.number(), 0, 0, 0]
}

pub(super) fn port_field(port: u16) -> [u8; 4] {
    let b = port.to_be_bytes();
    [b[0], b[1], 0, 0]
}

pub(super) fn port_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn proto_at(b: &[u8], at: usize) -> Option<Proto> {
    Proto::from_number(*b.get(at)?)
}

/// NFTNL_UDATA_SET_ELEM_COMMENT, the TLV nft reads as an element's comment
/// (the oracle of `comment_udata_into`).
#[cfg(test)]
fn comment_udata(owner: &PodRef) -> Vec<u8> {
    let c = comment_for(owner);
    let mut v = vec![0u8, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

#[cfg(test)]
pub(super) fn parse_comment_udata(u: &[u8]) -> Option<PodRef> {
    parse_element_comment(udata::comment_of(u)?).map(|(owner, _)| owner)
}

/// An element's comment: the owner, after `first-last ` for a port of a
/// range's part (an owner comment has no space).
pub(super) fn parse_element_comment(c: &str) -> Option<(PodRef, Option<(u16, u16)>)> {
    let Some((head, owner)) = c.split_once(' ') else {
        return Some((PodRef::from_comment(c)?, None));
    };
    let (lo, hi) = head.split_once('-')?;
    let range = (lo.parse().ok()?, hi.parse().ok()?);
    Some((PodRef::from_comment(owner)?, Some(range)))
}

/// A key or data value: concatenated fields, each padded to 4 bytes (at
/// most four of them, two IPv6 addresses the longest). Fixed size: encoding
/// 15,000 elements allocates nothing per element.
#[derive(Clone, Copy)]
pub(super) struct Value {
    bytes: [u8; 40],
    len: usize,
}

impl Value {
    fn of(fields: &[&[u8]]) -> Value {
        let mut v = Value {
            bytes: [0; 40],
            len: 0,
        };
        for f in fields {
            v.bytes[v.len..v.len + f.len()].copy_from_slice(f);
            v.len += f.len();
        }
        v
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// One element: key (and the end of its interval, in an interval set),
/// optional data, comment (the owner, borrowed).
pub(super) struct Element<'a> {
    pub(super) key: Value,
    pub(super) key_end: Option<Value>,
    pub(super) data: Option<Value>,
    pub(super) owner: Option<&'a PodRef>,
    /// The element is a port of a range's part (first and last port of
    /// the part): said in front of the owner in the comment, so the part
    /// reads back as one mapping.
    pub(super) range: Option<(u16, u16)>,
}

/// NFTNL_UDATA_SET_ELEM_COMMENT for `owner` into `buf` (cleared first),
/// as `comment_udata` but without allocating.
fn comment_udata_into(buf: &mut Vec<u8>, owner: &PodRef, range: Option<(u16, u16)>) {
    use std::io::Write;
    buf.clear();
    buf.extend_from_slice(&[0, 0]);
    if let Some((lo, hi)) = range {
        let _ = write!(buf, "{lo}-{hi} ");
    }
    buf.extend_from_slice(owner.namespace.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(owner.name.as_bytes());
    let mut end = buf.len();
    if end - 2 > MAX_COMMENT {
        // Cut as `comment_for` cuts: at a character boundary.
        let text = std::str::from_utf8(&buf[2..]).unwrap_or_default();
        let mut cut = MAX_COMMENT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        end = 2 + cut;
    }
    buf.truncate(end);
    buf.push(0);
    buf[1] = (end - 2 + 1) as u8;
}

/// One NEWSETELEM/DELSETELEM message a batch carries, for its description
/// should the kernel refuse it (`Flavor::describe`): writing a text for
/// every message would cost more than encoding it.
#[derive(Clone, Copy, Debug)]
pub struct ElementMsg {
    seq: u32,
    set: &'static str,
    delete: bool,
    count: usize,
}

impl ElementMsg {
    pub(super) fn describe(
        sent: &[ElementMsg],
        seq: u32,
        family: Family,
        table: &str,
    ) -> Option<String> {
        let m = sent.iter().find(|m| m.seq == seq)?;
        let verb = if m.delete { "delete" } else { "add" };
        Some(format!(
            "{verb} {} element(s) of {} in table {} {table}",
            m.count,
            m.set,
            view::nft_family(family)
        ))
    }
}

/// Writes element messages into a batch for one table, chunked below the
/// 64 KiB limit of one netlink attribute, and remembers what each is.
pub(super) struct ElementWriter<'b> {
    batch: &'b mut NftBatch,
    family: Family,
    table: &'b str,
    pub(super) sent: Vec<ElementMsg>,
    /// The comment of the element being written (one buffer for them all).
    udata: Vec<u8>,
    /// The layout counts traffic: every DNAT key is also a counted element.
    traffic: bool,
}

impl<'b> ElementWriter<'b> {
    pub(super) fn new(
        batch: &'b mut NftBatch,
        family: Family,
        table: &'b str,
        traffic: bool,
    ) -> Self {
        ElementWriter {
            batch,
            family,
            table,
            sent: Vec::with_capacity(4),
            udata: Vec::with_capacity(2 + MAX_COMMENT + 1),
            traffic,
        }
    }

    /// The elements go straight into the batch: no buffer per message.
    pub(super) fn write<'a>(
        &mut self,
        set: &'static str,
        elems: impl IntoIterator<Item = Element<'a>>,
        delete: bool,
    ) {
        const CHUNK_BYTES: usize = 48 * 1024;
        let mut elems = elems.into_iter().peekable();
        let (ty, flags) = if delete {
            (sys::NFT_MSG_DELSETELEM, 0)
        } else {
            (
                sys::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE as u32 | libc::NLM_F_EXCL as u32,
            )
        };
        while elems.peek().is_some() {
            let mut count = 0usize;
            // Sequence numbers count the messages; the batch begin is 0.
            let seq = self.batch.len() as u32 + 1;
            let (table, udata) = (self.table, &mut self.udata);
            self.batch.add_with(ty, flags, self.family, |m| {
                m.str(sys::NFTA_SET_ELEM_LIST_TABLE, table)
                    .str(sys::NFTA_SET_ELEM_LIST_SET, set)
                    .nest(sys::NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                        let start = list.len();
                        while list.len() - start < CHUNK_BYTES {
                            let Some(e) = elems.next() else { break };
                            list.nest(sys::NFTA_LIST_ELEM, |a| {
                                a.nest(sys::NFTA_SET_ELEM_KEY, |k| {
                                    k.bytes(sys::NFTA_DATA_VALUE, e.key.as_slice());
                                });
                                if let Some(end) = &e.key_end {
                                    a.nest(sys::NFTA_SET_ELEM_KEY_END, |k| {
                                        k.bytes(sys::NFTA_DATA_VALUE, end.as_slice());
                                    });
                                }
                                if !delete {
                                    if let Some(d) = &e.data {
                                        a.nest(sys::NFTA_SET_ELEM_DATA, |k| {
                                            k.bytes(sys::NFTA_DATA_VALUE, d.as_slice());
                                        });
                                    }
                                    if let Some(o) = e.owner {
                                        comment_udata_into(udata, o, e.range);
                                        a.bytes(sys::NFTA_SET_ELEM_USERDATA, udata);
                                    }
                                }
                            });
                            count += 1;
                        }
                    });
            });
            self.sent.push(ElementMsg {
                seq,
                set,
                delete,
                count,
            });
        }
    }

    /// Every element of `rules`, added (or deleted), with `restricted` as the
    /// keys of `source_restricted` (they follow from the allow-lists: all of
    /// them for a whole table, the transitions for a change).
    pub(super) fn write_all(&mut self, rules: &RuleSet, restricted: &[NatKey], delete: bool) {
        self.write(names::NFT_DNAT_MAP, dnat_elements(&rules.dnat), delete);
        if self.traffic {
            // A key's counter goes with its mapping: a key that changes
            // hands starts again from zero.
            self.write(
                names::NFT_TRAFFIC_SET,
                traffic_elements(&rules.dnat),
                delete,
            );
        }
        self.write(names::NFT_SNAT_MAP, snat_elements(&rules.snat), delete);
        self.write(
            names::NFT_FORWARD_SET,
            forward_elements(&rules.forward),
            delete,
        );
        self.write(names::NFT_LOCAL_SET, local_elements(&rules.local), delete);
        self.write(
            names::NFT_SOURCES_SET,
            source_elements(&rules.allow),
            delete,
        );
        self.write(
            names::NFT_RESTRICTED_SET,
            restricted_elements(restricted),
            delete,
        );
    }
}

pub(super) use crate::model::source_restricted_ports;

fn key_value(k: &NatKey) -> Value {
    Value::of(&[
        &octets(&k.public_ip),
        &proto_field(k.proto),
        &port_field(k.public_port),
    ])
}

/// A restricted key has no owner comment: one key, one owner, whose comment
/// its `source_allowed` elements carry.
pub(super) fn restricted_elements(keys: &[NatKey]) -> impl Iterator<Item = Element<'_>> {
    keys.iter().map(|k| Element {
        key: key_value(k),
        key_end: None,
        data: None,
        owner: None,
        range: None,
    })
}

/// `key . source`, an interval from the first port and the range's
/// network address to the last port (a range's part) and its broadcast
/// address: one element per allowed range, however many ports.
pub(super) fn source_elements(v: &[SourceRule]) -> impl Iterator<Item = Element<'_>> {
    v.iter().map(|a| {
        let at = |port: u16, ip: std::net::IpAddr| {
            Value::of(&[
                &octets(&a.key.public_ip),
                &proto_field(a.key.proto),
                &port_field(port),
                &octets(&ip),
            ])
        };
        let last = a.key.public_port + a.span;
        Element {
            key: at(a.key.public_port, a.source.network()),
            key_end: Some(at(last, a.source.broadcast())),
            data: None,
            owner: Some(&a.owner),
            range: (a.span > 0).then_some((a.key.public_port, last)),
        }
    })
}

/// The restricted ports a change adds and deletes (`current`: the
/// allow-list before): the ports of the runs (`key`, `span`) of the first
/// keys it touches that have ranges after and not before, and the other
/// way round — a key's first range comes, its last goes, or a part grows,
/// shrinks or splits. Parts never overlap within a table and a key the
/// change does not touch keeps its ports, so the touched keys' ports
/// before and after differ exactly by what changes.
pub(super) fn restricted_changes(
    current: &[SourceRule],
    ch: &Changes,
) -> (Vec<NatKey>, Vec<NatKey>) {
    use crate::model::allow_of;
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let mut keys = crate::model::restricted_keys(&ch.add.allow);
    keys.extend(crate::model::restricted_keys(&ch.del.allow));
    keys.sort();
    keys.dedup();
    let ports = |runs: &[(NatKey, u16)]| -> Vec<NatKey> {
        let mut v: Vec<NatKey> = runs.iter().flat_map(|(k, span)| k.run(*span)).collect();
        v.sort();
        v.dedup();
        v
    };
    let (mut was_all, mut is_all) = (Vec::new(), Vec::new());
    for k in keys {
        // The runs of `k` with at least one range, before and after.
        let (before, plus, minus) = (
            allow_of(current, &k),
            allow_of(&ch.add.allow, &k),
            allow_of(&ch.del.allow, &k),
        );
        let mut spans: Vec<u16> = before.iter().chain(plus).map(|a| a.span).collect();
        spans.sort_unstable();
        spans.dedup();
        let count = |v: &[SourceRule], span: u16| v.iter().filter(|a| a.span == span).count();
        let was: Vec<(NatKey, u16)> = spans
            .iter()
            .filter(|&&s| count(before, s) > 0)
            .map(|&s| (k, s))
            .collect();
        let is: Vec<(NatKey, u16)> = spans
            .iter()
            .filter(|&&s| count(before, s) + count(plus, s) > count(minus, s))
            .map(|&s| (k, s))
            .collect();
        was_all.extend(was);
        is_all.extend(is);
    }
    let (was, is) = (ports(&was_all), ports(&is_all));
    add.extend(is.iter().filter(|p| was.binary_search(p).is_err()));
    del.extend(was.iter().filter(|p| is.binary_search(p).is_err()));
    (add, del)
}

/// The range marker of a mapping's elements (none for one port).
fn range_of(m: &Mapping) -> Option<(u16, u16)> {
    (m.span > 0).then(|| (m.key.public_port, m.port_end()))
}

/// One element per published port: nft has no DNAT with a port offset, so
/// a range's part is its ports, each to its own pod port.
pub(super) fn dnat_elements(v: &[Mapping]) -> impl Iterator<Item = Element<'_>> {
    v.iter().flat_map(|m| {
        m.ports().map(move |(key, pod_port)| Element {
            key: key_value(&key),
            key_end: None,
            data: Some(Value::of(&[&octets(&m.pod_ip), &port_field(pod_port)])),
            owner: Some(&m.owner),
            range: range_of(m),
        })
    })
}

/// A published port, counted (its owner's comment, as its DNAT element).
pub(super) fn traffic_elements(v: &[Mapping]) -> impl Iterator<Item = Element<'_>> {
    v.iter().flat_map(|m| {
        m.ports().map(move |(key, _)| Element {
            key: key_value(&key),
            key_end: None,
            data: None,
            owner: Some(&m.owner),
            range: range_of(m),
        })
    })
}

pub(super) fn snat_elements(v: &[SnatRule]) -> impl Iterator<Item = Element<'_>> {
    v.iter().map(|s| Element {
        key: Value::of(&[&octets(&s.pod_ip), &proto_field(s.proto)]),
        key_end: None,
        data: Some(Value::of(&[&octets(&s.public_ip)])),
        owner: Some(&s.owner),
        range: None,
    })
}

pub(super) fn forward_elements(v: &[ForwardRule]) -> impl Iterator<Item = Element<'_>> {
    v.iter().flat_map(|f| {
        let range = (f.span > 0).then(|| (f.pod_port, f.pod_port + f.span));
        f.ports().map(move |port| Element {
            key: Value::of(&[&octets(&f.pod_ip), &proto_field(f.proto), &port_field(port)]),
            key_end: None,
            data: None,
            owner: Some(&f.owner),
            range,
        })
    })
}

pub(super) fn local_elements(v: &[LocalPod]) -> impl Iterator<Item = Element<'_>> {
    v.iter().map(|l| Element {
        key: Value::of(&[&octets(&l.pod_ip)]),
        key_end: None,
        data: None,
        owner: Some(&l.owner),
        range: None,
    })
}

/// Element deletes first, then adds: a retargeted key is deleted and re-added
/// with its new data in the same batch.
/// `traffic`: the table counts traffic (its counted keys follow the DNATs).
pub(super) fn encode_changes(
    batch: &mut NftBatch,
    family: Family,
    table: &str,
    traffic: bool,
    current: &[SourceRule],
    ch: &Changes,
) -> Vec<ElementMsg> {
    let (restrict, free) = restricted_changes(current, ch);
    let mut w = ElementWriter::new(batch, family, table, traffic);
    w.write_all(&ch.del, &free, true);
    w.write_all(&ch.add, &restrict, false);
    w.sent
}

pub(super) fn decode_element(
    f: Family,
    set: &str,
    key: &[u8],
    data: &[u8],
    owner: PodRef,
    out: &mut RuleSet,
) -> bool {
    // The fields after the address start at its length.
    let n = encode::header(f).addr_len as usize;
    let ip_at = |b: &[u8], at: usize| encode::ip_at(b, at, f);
    match set {
        names::NFT_DNAT_MAP => {
            let (Some(key), Some(pod_ip), Some(pod_port)) =
                (nat_key_at(f, key), ip_at(data, 0), port_at(data, n))
            else {
                return false;
            };
            out.dnat.push(Mapping {
                key,
                pod_ip,
                pod_port,
                owner,
                span: 0,
            });
        }
        names::NFT_SNAT_MAP => {
            let (Some(pod_ip), Some(proto), Some(public_ip)) =
                (ip_at(key, 0), proto_at(key, n), ip_at(data, 0))
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
        names::NFT_LOCAL_SET => {
            let Some(pod_ip) = ip_at(key, 0) else {
                return false;
            };
            out.local.push(LocalPod { pod_ip, owner });
        }
        _ => {
            let (Some(pod_ip), Some(proto), Some(pod_port)) =
                (ip_at(key, 0), proto_at(key, n), port_at(key, n + 4))
            else {
                return false;
            };
            out.forward.push(ForwardRule {
                pod_ip,
                proto,
                pod_port,
                owner,
                span: 0,
            });
        }
    }
    true
}

/// `public_ip . proto . port` at the head of a key.
pub(super) fn nat_key_at(f: Family, key: &[u8]) -> Option<NatKey> {
    let n = encode::header(f).addr_len as usize;
    Some(NatKey {
        public_ip: encode::ip_at(key, 0, f)?,
        proto: proto_at(key, n)?,
        public_port: port_at(key, n + 4)?,
    })
}

/// A `source_allowed` element back to its rule: the interval must be one
/// CIDR (network to broadcast address) and one run of ports (a range's
/// part, marked so in its comment: `range`), as the agent writes them.
fn source_rule_at(
    f: Family,
    key: &[u8],
    end: &[u8],
    owner: PodRef,
    range: Option<(u16, u16)>,
) -> Option<SourceRule> {
    let n = encode::header(f).addr_len as usize;
    let (k, last_key) = (nat_key_at(f, key)?, nat_key_at(f, end)?);
    if (last_key.public_ip, last_key.proto) != (k.public_ip, k.proto) {
        return None;
    }
    let span = last_key.public_port.checked_sub(k.public_port)?;
    let marked = (span > 0).then_some((k.public_port, last_key.public_port));
    if range != marked {
        return None;
    }
    let (first, last) = (encode::ip_at(key, n + 8, f)?, encode::ip_at(end, n + 8, f)?);
    let source = cidr_of(first, last)?;
    Some(SourceRule {
        key: k,
        span,
        source,
        owner,
    })
}

/// The CIDR spanning exactly `first..=last`, if there is one.
pub(super) fn cidr_of(first: std::net::IpAddr, last: std::net::IpAddr) -> Option<ipnet::IpNet> {
    let bits = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v) => (u128::from(u32::from(v)), 32u32),
        std::net::IpAddr::V6(v) => (u128::from(v), 128u32),
    };
    let ((a, w), (b, w2)) = (bits(first), bits(last));
    if w != w2 || b < a {
        return None;
    }
    let host = (a ^ b).count_ones();
    let len = w - host;
    let net = ipnet::IpNet::new(first, len as u8).ok()?;
    (net.network() == first && net.broadcast() == last).then_some(net)
}

/// Element dumps of a table read before giving up on two that agree.
pub(super) const MAX_ELEMENT_DUMPS: u32 = 5;

/// Dumps through `dump` until two dumps in a row have the same
/// fingerprint, at most `max` times. The first dump only fingerprints
/// (`dump(false)`: nothing decoded, nothing allocated), the later ones also
/// decode (`dump(true)`), and the decoded read of the second of an agreeing
/// pair is returned; `None` if no two agreed. A dump read twice whole would
/// free thousands of small allocations at once, and glibc consolidates them
/// on the next larger request: an 80 µs stall in the change that follows.
pub(super) fn until_two_agree<T, E>(
    max: u32,
    mut dump: impl FnMut(bool) -> Result<(u64, Option<T>), E>,
) -> Result<Option<T>, E> {
    let (mut last, _) = dump(false)?;
    for _ in 1..max {
        let (fingerprint, read) = dump(true)?;
        if fingerprint == last {
            return Ok(read);
        }
        last = fingerprint;
    }
    Ok(None)
}

/// One dump of every set's elements: a fingerprint of what came (the same
/// elements in any order give the same one; a missing or repeated element
/// changes it), and with `out`, the rules they hold and whether each decoded
/// as the layout's (else the layout counts as drifted).
pub(super) fn read_elements(
    sock: &mut NfSocket,
    family: Family,
    local: bool,
    features: Features,
    tname: &str,
    mut out: Option<&mut RuleSet>,
) -> Result<(u64, bool), NetlinkError> {
    use std::hash::{Hash, Hasher};
    let (mut sum, mut count, mut decoded) = (0u64, 0u64, true);
    let mut restricted: Vec<NatKey> = Vec::new();
    let mut counted: Vec<NatKey> = Vec::new();
    let mut parts = Parts::default();
    for shape in &sets_of(family, local, features) {
        let scope = Scope::object(family.nfproto(), tname, shape.name);
        for msg in sock.dump_scoped(sys::NFT_MSG_GETSETELEM, &scope)? {
            let Some(list) = find_attr(&msg, sys::NFTA_SET_ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for (_, el) in parse_attrs(list) {
                let key = find_attr(el, sys::NFTA_SET_ELEM_KEY)
                    .and_then(|k| find_attr(k, sys::NFTA_DATA_VALUE))
                    .unwrap_or(&[]);
                let data = find_attr(el, sys::NFTA_SET_ELEM_DATA)
                    .and_then(|k| find_attr(k, sys::NFTA_DATA_VALUE))
                    .unwrap_or(&[]);
                let key_end = find_attr(el, sys::NFTA_SET_ELEM_KEY_END)
                    .and_then(|k| find_attr(k, sys::NFTA_DATA_VALUE));
                let udata = find_attr(el, sys::NFTA_SET_ELEM_USERDATA);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (shape.name, key, key_end, data, udata).hash(&mut h);
                sum = sum.wrapping_add(h.finish());
                count += 1;
                let Some(rules) = out.as_deref_mut() else {
                    continue;
                };
                if shape.name == names::NFT_RESTRICTED_SET || shape.name == names::NFT_TRAFFIC_SET {
                    let keys = if shape.name == names::NFT_TRAFFIC_SET {
                        &mut counted
                    } else {
                        &mut restricted
                    };
                    match nat_key_at(family, key) {
                        Some(k) => keys.push(k),
                        None => decoded = false,
                    }
                    continue;
                }
                // An element without an owner comment is not one of ours
                // as written; it is kept as "ownerless" so the diff
                // replaces it.
                let (owner, range) = udata
                    .and_then(udata::comment_of)
                    .and_then(parse_element_comment)
                    .unwrap_or_else(|| (PodRef::new("", ""), None));
                if shape.name == names::NFT_SOURCES_SET {
                    match source_rule_at(family, key, key_end.unwrap_or(&[]), owner, range) {
                        Some(a) => rules.allow.push(a),
                        None => decoded = false,
                    }
                    continue;
                }
                let before = (rules.dnat.len(), rules.forward.len());
                if !decode_element(family, shape.name, key, data, owner, rules) {
                    decoded = false;
                }
                if let Some(r) = range {
                    // A port of a range's part: joined with the others below.
                    if rules.dnat.len() > before.0 {
                        parts.dnat.extend(rules.dnat.pop().map(|m| (m, r)));
                    } else if rules.forward.len() > before.1 {
                        parts.forward.extend(rules.forward.pop().map(|f| (f, r)));
                    }
                }
            }
        }
    }
    if let Some(rules) = out {
        parts.join(rules);
        rules.normalize();
        // The restricted keys are exactly those with ranges: a key left
        // restricted without any would drop every source; one with ranges
        // but not restricted would let every source in.
        restricted.sort();
        if restricted != source_restricted_ports(&rules.allow) {
            decoded = false;
        }
        // Every published key is counted, and only those.
        counted.sort();
        let mut published: Vec<NatKey> = rules
            .dnat
            .iter()
            .flat_map(|m| m.ports().map(|(k, _)| k))
            .collect();
        published.sort();
        if features.traffic && counted != published {
            decoded = false;
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (sum, count).hash(&mut h);
    Ok((h.finish(), decoded))
}

/// The elements read that are ports of a range's part, with their marker.
#[derive(Default)]
struct Parts {
    dnat: Vec<(Mapping, (u16, u16))>,
    forward: Vec<(ForwardRule, (u16, u16))>,
}

impl Parts {
    /// Each complete part (every port of its marker, in order, one owner,
    /// one pod address, pod ports one offset apart) as one rule with its
    /// span; the ports of an incomplete one each alone, so the diff
    /// rewrites them.
    fn join(mut self, rules: &mut RuleSet) {
        // By address, protocol, port: the same ports of TCP and UDP would
        // interleave in key order.
        self.dnat
            .sort_by_key(|(m, _)| (m.key.public_ip, m.key.proto, m.key.public_port));
        rules.dnat.extend(join_runs(
            self.dnat,
            |m| m.key.public_port,
            |a, b| {
                (b.key.public_ip, b.key.proto, b.pod_ip, &b.owner)
                    == (a.key.public_ip, a.key.proto, a.pod_ip, &a.owner)
                    && (b.key.public_port, b.pod_port) == (a.key.public_port + 1, a.pod_port + 1)
            },
            |m, span| m.span = span,
        ));
        self.forward.sort();
        rules.forward.extend(join_runs(
            self.forward,
            |f| f.pod_port,
            |a, b| {
                (b.pod_ip, b.proto, &b.owner) == (a.pod_ip, a.proto, &a.owner)
                    && b.pod_port == a.pod_port + 1
            },
            |f, span| f.span = span,
        ));
    }
}

/// Joins runs of marked single-port rules (sorted so that a part's ports
/// follow each other): a run is complete when it starts at its marker's
/// first port and each rule `follows` the one before, with the same
/// marker, up to its last.
fn join_runs<T>(
    marked: Vec<(T, (u16, u16))>,
    port: impl Fn(&T) -> u16,
    follows: impl Fn(&T, &T) -> bool,
    set_span: impl Fn(&mut T, u16),
) -> Vec<T> {
    let mut out = Vec::with_capacity(marked.len());
    let mut it = marked.into_iter().peekable();
    while let Some((first, (lo, hi))) = it.next() {
        if port(&first) != lo || hi < lo {
            out.push(first);
            continue;
        }
        let mut run = vec![first];
        while run.len() <= usize::from(hi - lo) {
            let last = &run[run.len() - 1];
            match it.next_if(|(x, r)| *r == (lo, hi) && follows(last, x)) {
                Some((x, _)) => run.push(x),
                None => break,
            }
        }
        if run.len() == usize::from(hi - lo) + 1 {
            let mut whole = run.swap_remove(0);
            set_span(&mut whole, hi - lo);
            out.push(whole);
        } else {
            out.extend(run);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(port: u16, source: &str) -> SourceRule {
        SourceRule {
            key: NatKey {
                public_ip: "203.0.113.7".parse().unwrap(),
                public_port: port,
                proto: Proto::Tcp,
            },
            span: 0,
            source: source.parse().unwrap(),
            owner: PodRef::new("ns", "p"),
        }
    }

    #[test]
    fn a_restricted_range_split_frees_exactly_the_part_it_lost() {
        let part = |port: u16, span: u16| SourceRule {
            span,
            ..rule(port, "198.51.100.0/24")
        };
        let current = vec![part(10000, 99)];
        let mut ch = Changes::default();
        ch.del.allow = vec![part(10000, 99)];
        ch.add.allow = vec![part(10000, 39), part(10060, 39)];
        let (restrict, free) = restricted_changes(&current, &ch);
        let ports = |v: &[NatKey]| -> Vec<u16> { v.iter().map(|k| k.public_port).collect() };
        assert!(restrict.is_empty(), "{restrict:?}");
        assert_eq!(ports(&free), (10040..=10059).collect::<Vec<_>>());
        // And back: the part the range regains, nothing else.
        let current = vec![part(10000, 39), part(10060, 39)];
        let mut back = Changes::default();
        back.del.allow = current.clone();
        back.add.allow = vec![part(10000, 99)];
        let (restrict, free) = restricted_changes(&current, &back);
        assert_eq!(ports(&restrict), (10040..=10059).collect::<Vec<_>>());
        assert!(free.is_empty(), "{free:?}");
    }

    #[test]
    fn a_key_is_restricted_with_its_first_range_and_freed_with_its_last() {
        let current = vec![
            rule(25, "10.0.0.0/8"),
            rule(25, "192.0.2.0/24"),
            rule(26, "10.0.0.0/8"),
        ];
        let mut ch = Changes::default();
        // 25 loses one of two ranges (still restricted), 26 its only one
        // (freed), 27 gets its first (restricted), 28 one range swapped for
        // another within one change is no transition.
        ch.del.allow = vec![rule(25, "10.0.0.0/8"), rule(26, "10.0.0.0/8")];
        ch.add.allow = vec![rule(27, "198.51.100.0/24")];
        let (restrict, free) = restricted_changes(&current, &ch);
        assert_eq!(
            restrict.iter().map(|k| k.public_port).collect::<Vec<_>>(),
            [27]
        );
        assert_eq!(free.iter().map(|k| k.public_port).collect::<Vec<_>>(), [26]);
        let mut swap = Changes::default();
        swap.del.allow = vec![rule(26, "10.0.0.0/8")];
        swap.add.allow = vec![rule(26, "172.16.0.0/12")];
        assert_eq!(restricted_changes(&current, &swap), (vec![], vec![]));
    }

    #[test]
    fn a_change_of_ranges_alone_is_rendered_for_a_dry_run() {
        let nft = Nftables {
            names: Names::new("podnat"),
            family: Family::Ipv4,
            local: false,
            features: Features::ALL,
        };
        let state = NativeState {
            rules: RuleSet {
                allow: vec![rule(25, "10.0.0.0/8")],
                ..RuleSet::default()
            },
            ..NativeState::default()
        };
        let mut ch = Changes::default();
        ch.del.allow = vec![rule(25, "10.0.0.0/8")];
        ch.add.allow = vec![rule(26, "198.51.100.7/32")];
        let text = nft.render(&state, &NftPlan::Elements(ch));
        assert_eq!(
            text,
            "delete element ip podnat source_allowed { 203.0.113.7 . tcp . 25 . 10.0.0.0/8 }\n\
             delete element ip podnat source_restricted { 203.0.113.7 . tcp . 25 }\n\
             add element ip podnat source_allowed { 203.0.113.7 . tcp . 26 . 198.51.100.7 comment \"ns:p\" }\n\
             add element ip podnat source_restricted { 203.0.113.7 . tcp . 26 }\n"
        );
    }

    #[test]
    fn a_source_interval_decodes_only_as_a_cidr() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for (first, last, want) in [
            ("10.0.0.0", "10.255.255.255", Some("10.0.0.0/8")),
            ("198.51.100.7", "198.51.100.7", Some("198.51.100.7/32")),
            ("0.0.0.0", "255.255.255.255", Some("0.0.0.0/0")),
            ("2001:db8::", "2001:db8::3", Some("2001:db8::/126")),
            ("10.0.0.1", "10.0.0.2", None),
            ("10.0.0.0", "10.0.0.2", None),
            ("10.0.0.4", "10.0.0.0", None),
            ("10.0.0.0", "2001:db8::", None),
        ] {
            assert_eq!(
                cidr_of(ip(first), ip(last)).map(|n| n.to_string()),
                want.map(str::to_string),
                "{first}-{last}"
            );
        }
        // Encoded as the writer encodes it, decoded back, both families.
        for (public, source) in [
            ("203.0.113.7", "198.51.100.0/25"),
            ("2001:db8::7", "2001:db8:1::/48"),
        ] {
            let mut a = rule(993, source);
            a.key.public_ip = public.parse().unwrap();
            let f = Family::of(a.key.public_ip);
            for span in [0, 99] {
                a.span = span;
                let e = source_elements(std::slice::from_ref(&a)).next().unwrap();
                let back = |range| {
                    source_rule_at(
                        f,
                        e.key.as_slice(),
                        e.key_end.unwrap().as_slice(),
                        a.owner.clone(),
                        range,
                    )
                };
                assert_eq!(back(e.range), Some(a.clone()));
                // A part's element whose comment does not say so (or says
                // another part) is not the agent's as written.
                let other = if span == 0 { Some((993, 994)) } else { None };
                assert_eq!(back(other), None);
            }
        }
    }

    #[test]
    fn reads_until_two_agree() {
        use super::until_two_agree;
        // Each answer: a dump's fingerprint; a decoding dump returns it as
        // its read, so the result shows which dump was kept.
        let run = |answers: &[u64]| {
            let mut it = answers.iter().copied();
            let mut decoded = Vec::new();
            let got = until_two_agree(5, |decode| {
                decoded.push(decode);
                let f = it.next().ok_or("no more answers")?;
                Ok((f, decode.then_some(f)))
            });
            (got, decoded)
        };
        let t = true;
        assert_eq!(run(&[7, 7]), (Ok(Some(7)), vec![false, t]));
        // A dump that lost elements, then two complete ones.
        assert_eq!(run(&[6, 7, 7]), (Ok(Some(7)), vec![false, t, t]));
        assert_eq!(
            run(&[6, 7, 6, 7, 7]),
            (Ok(Some(7)), vec![false, t, t, t, t])
        );
        // Never two alike in five: given up on, not taken.
        assert_eq!(run(&[1, 2, 3, 4, 5, 5]).0, Ok(None));
        assert_eq!(run(&[1]).0, Err("no more answers"));
    }

    #[test]
    fn range_parts_read_back_joined_and_broken_ones_port_by_port() {
        let m = |port: u16, proto: Proto, pod_port: u16| Mapping {
            key: NatKey {
                public_ip: "203.0.113.7".parse().unwrap(),
                public_port: port,
                proto,
            },
            pod_ip: "10.1.0.5".parse().unwrap(),
            pod_port,
            owner: PodRef::new("voip", "pbx"),
            span: 0,
        };
        let mut parts = Parts::default();
        // The same three ports on both protocols (they interleave in key
        // order), and a part of four with its third port missing.
        for port in 100..=102 {
            for proto in [Proto::Tcp, Proto::Udp] {
                parts.dnat.push((m(port, proto, port + 1000), (100, 102)));
            }
        }
        for port in [200, 201, 203] {
            parts.dnat.push((m(port, Proto::Udp, port), (200, 203)));
        }
        parts.dnat.reverse();
        let mut rules = RuleSet::default();
        parts.join(&mut rules);
        rules.normalize();
        let got: Vec<(u16, Proto, u16, u16)> = rules
            .dnat
            .iter()
            .map(|m| (m.key.public_port, m.key.proto, m.pod_port, m.span))
            .collect();
        assert_eq!(
            got,
            [
                (100, Proto::Tcp, 1100, 2),
                (100, Proto::Udp, 1100, 2),
                (200, Proto::Udp, 200, 0),
                (201, Proto::Udp, 201, 0),
                (203, Proto::Udp, 203, 0),
            ]
        );
    }

    #[test]
    fn comments_are_written_as_comment_for_cuts_them() {
        let mut buf = Vec::new();
        for (ns, name) in [
            ("mail", "mx-0"),
            ("n", &"x".repeat(126)[..]),
            ("n", &"x".repeat(125)[..]),
            ("n", &"é".repeat(80)[..]),
            ("ns", &"ü".repeat(100)[..]),
        ] {
            let owner = PodRef::new(ns, name);
            comment_udata_into(&mut buf, &owner, None);
            assert_eq!(buf, comment_udata(&owner), "{owner}");
            assert_eq!(
                parse_comment_udata(&buf).map(|p| p.to_string()),
                Some(comment_for(&owner))
            );
        }
    }
}
