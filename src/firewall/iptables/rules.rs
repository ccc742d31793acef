//! The agent's iptables rules as iptables-nft 1.8.9 encodes them (native
//! meta/payload/cmp for `-p`/`-s`/`-d`/`--dport`, xt-compat `match` and
//! `target` for the rest, a `counter` in every rule), and back: a rule read
//! from the kernel is the agent's only if what it decodes to has the very
//! same expressions.

use std::net::{IpAddr, Ipv4Addr};

use super::xt;
use crate::firewall::encode::{self, octets, Exprs, BASE_NETWORK, BASE_TRANSPORT, REG_1, TH_DPORT};
// `Exprs` (encode.rs) writes the wire form; the reduced `Expr` list below is
// what both directions agree on.
use crate::firewall::names::HAIRPIN_MARK;
use crate::firewall::netlink::{attr_be32, attr_str, find_attr, parse_attrs, sys, Attrs};
use crate::firewall::{comment_for, Names};
use crate::model::{Family, ForwardRule, LocalPod, Mapping, NatKey, PodRef, Proto, SnatRule};

/// The networks `<PREFIX>_POST` returns un-NATed, in the order the Go version
/// puts them at the head of its chain (its `internalNetworks`, inserted at
/// positions 1..4 by `ensureDefaults`): the networks of
/// `model::INTERNAL_NETWORKS`, ordered so `iptables-nft-save` prints the Go
/// version's very lines. The native flavor keeps its own order.
pub const GO_INTERNAL_NETWORKS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
];

/// The networks `<PREFIX>_POST` returns un-NATed in `f`'s table, in chain
/// order: IPv4 as the Go version; IPv6 (which it never had) fc00::/7,
/// fe80::/10, ::1/128.
pub fn internal_returns(f: Family) -> Vec<(IpAddr, u8)> {
    match f {
        Family::Ipv4 => GO_INTERNAL_NETWORKS
            .iter()
            .map(|(n, l)| (IpAddr::V4(*n), *l))
            .collect(),
        Family::Ipv6 => crate::model::internal_networks(f),
    }
}

/// One rule the agent writes. The variant order is the order inside a chain:
/// in `<PREFIX>_POST` the hairpin masquerade, then the internal-network
/// returns, then the SNATs; in `<PREFIX>_PRE` the hairpin marks before the
/// DNATs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentRule {
    /// `-m mark --mark 0x2000/0x2000 -m comment --comment "<prefix>[hairpin]"
    /// -j MASQUERADE` (`-localaccess`).
    Masquerade,
    /// `-d <GO_INTERNAL_NETWORKS[i]> -m comment --comment
    /// "<prefix>[no_snat_for_internal]" -j RETURN`.
    Return(usize),
    /// `-s P -m addrtype --dst-type LOCAL -m comment --comment ns:pod -j MARK
    /// --set-xmark 0x2000/0x2000` (`-localaccess`).
    Mark(LocalPod),
    Snat(SnatRule),
    Dnat(Mapping),
    Forward(ForwardRule),
    /// `-m comment --comment "<prefix>[jump_to_chain]" -j <chain>`.
    Jump(String),
    /// `-m addrtype --dst-type LOCAL -m comment --comment
    /// "<prefix>[jump_to_chain]" -j <chain>`: `<PREFIX>_OUTPUT` to
    /// `<PREFIX>_PRE`, for connections to the node's own addresses only.
    LocalJump(String),
}

impl AgentRule {
    /// What must stay in order inside a chain: the internal-network RETURNs
    /// before the SNATs. Rules of one rank match disjoint packets (or share
    /// the verdict), so any order of them is the same chain.
    pub fn rank(&self) -> u8 {
        match self {
            AgentRule::Masquerade => 0,
            AgentRule::Return(_) | AgentRule::Mark(_) => 1,
            _ => 2,
        }
    }
}

/// A rule ready for NFT_MSG_NEWRULE: expressions plus NFTA_RULE_COMPAT proto.
pub struct Encoded {
    pub exprs: Exprs,
    pub compat_proto: u32,
}

fn xt(kind: &str, name: &str, rev: u32, info: Vec<u8>) -> Expr {
    Expr::Xt {
        kind: kind.to_string(),
        name: name.to_string(),
        rev,
        info,
    }
}

fn cmp_eq(data: &[u8]) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op: sys::NFT_CMP_EQ,
        data: data.to_vec(),
    }
}

fn load(base: u32, offset: u32, len: u32) -> Expr {
    Expr::Payload {
        dreg: REG_1,
        base,
        offset,
        len,
    }
}

fn proto(e: &mut Vec<Expr>, p: Proto) {
    e.push(Expr::Meta {
        key: sys::NFT_META_L4PROTO,
        dreg: REG_1,
    });
    e.push(cmp_eq(&[p.number()]));
}

/// Which address: the source or the destination.
#[derive(Clone, Copy)]
enum Side {
    Src,
    Dst,
}

fn offset(side: Side, f: Family) -> u32 {
    let h = encode::header(f);
    match side {
        Side::Src => h.saddr,
        Side::Dst => h.daddr,
    }
}

/// `-s A/32` / `-d A/128`.
fn host(e: &mut Vec<Expr>, side: Side, ip: IpAddr) {
    let o = octets(&ip);
    e.push(load(
        BASE_NETWORK,
        offset(side, Family::of(ip)),
        o.len() as u32,
    ));
    e.push(cmp_eq(&o));
}

/// `-d net/len`: byte-aligned prefixes load only their bytes; others load
/// the address and mask it (as iptables-nft and ip6tables-nft do).
fn prefix(e: &mut Vec<Expr>, side: Side, net: IpAddr, len: u8) {
    let octets = octets(&net);
    let at = offset(side, Family::of(net));
    if len % 8 == 0 {
        let n = usize::from(len / 8);
        e.push(load(BASE_NETWORK, at, n as u32));
        e.push(cmp_eq(&octets[..n]));
    } else {
        let n = octets.len();
        e.push(load(BASE_NETWORK, at, n as u32));
        e.push(Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            len: n as u32,
            mask: encode::prefix_mask(len, n),
            xor: vec![0; n],
            op: 0,
        });
        e.push(cmp_eq(&octets));
    }
}

fn dport(e: &mut Vec<Expr>, port: u16) {
    e.push(load(BASE_TRANSPORT, TH_DPORT, 2));
    e.push(cmp_eq(&port.to_be_bytes()));
}

fn comment(e: &mut Vec<Expr>, c: &str) {
    e.push(xt("match", "comment", xt::COMMENT_REV, xt::comment_info(c)));
}

fn verdict(code: i32) -> Expr {
    Expr::Verdict { code, chain: None }
}

/// The expressions of `rule`, in iptables-nft's order: protocol, addresses,
/// then the matches as the view lists them, counter, verdict or target.
/// The one description of the encoding: `encode` serializes it, `decode`
/// compares what the kernel reports with it.
pub fn exprs_of(rule: &AgentRule, names: &Names, family: Family) -> Vec<Expr> {
    let mut e = Vec::with_capacity(10);
    match rule {
        AgentRule::Masquerade => {
            // `-m mark` is native in iptables-nft: meta mark & mask == mark.
            let bits = HAIRPIN_MARK.to_ne_bytes().to_vec();
            e.push(Expr::Meta {
                key: sys::NFT_META_MARK,
                dreg: REG_1,
            });
            e.push(Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                len: 4,
                mask: bits.clone(),
                xor: vec![0; 4],
                op: 0,
            });
            e.push(cmp_eq(&bits));
            comment(&mut e, &names.hairpin_comment);
            e.push(Expr::Counter);
            let info = xt::masquerade_info(family);
            e.push(xt("target", "MASQUERADE", xt::MASQUERADE_REV, info));
        }
        AgentRule::Mark(l) => {
            host(&mut e, Side::Src, l.pod_ip);
            let info = xt::addrtype_dst_local();
            e.push(xt("match", "addrtype", xt::ADDRTYPE_REV, info));
            comment(&mut e, &comment_for(&l.owner));
            e.push(Expr::Counter);
            let info = xt::mark_or(HAIRPIN_MARK);
            e.push(xt("target", "MARK", xt::MARK_REV, info));
        }
        AgentRule::Return(i) => {
            let (net, len) = internal_returns(family)[*i];
            prefix(&mut e, Side::Dst, net, len);
            comment(&mut e, &names.internal_comment);
            e.push(Expr::Counter);
            e.push(verdict(sys::NFT_RETURN));
        }
        AgentRule::Snat(s) => {
            proto(&mut e, s.proto);
            host(&mut e, Side::Src, s.pod_ip);
            comment(&mut e, &comment_for(&s.owner));
            e.push(Expr::Counter);
            e.push(match s.public_ip {
                IpAddr::V4(ip) => xt("target", "SNAT", xt::SNAT_REV, xt::snat_compat(ip)),
                IpAddr::V6(ip) => xt("target", "SNAT", xt::SNAT6_REV, xt::snat_range(ip)),
            });
        }
        AgentRule::Dnat(m) => {
            proto(&mut e, m.key.proto);
            host(&mut e, Side::Dst, m.key.public_ip);
            dport(&mut e, m.key.public_port);
            comment(&mut e, &comment_for(&m.owner));
            e.push(Expr::Counter);
            let info = xt::dnat_range2(m.pod_ip, m.pod_port);
            e.push(xt("target", "DNAT", xt::DNAT_REV, info));
        }
        AgentRule::Forward(f) => {
            // The Go version's order: `-m conntrack --ctstate NEW` before
            // `-m tcp --dport N` (its `getRule`).
            proto(&mut e, f.proto);
            host(&mut e, Side::Dst, f.pod_ip);
            let ct = xt::conntrack_state_new();
            e.push(xt("match", "conntrack", xt::CONNTRACK_REV, ct));
            dport(&mut e, f.pod_port);
            comment(&mut e, &comment_for(&f.owner));
            e.push(Expr::Counter);
            e.push(verdict(libc::NF_ACCEPT));
        }
        AgentRule::Jump(chain) | AgentRule::LocalJump(chain) => {
            if matches!(rule, AgentRule::LocalJump(_)) {
                let info = xt::addrtype_dst_local();
                e.push(xt("match", "addrtype", xt::ADDRTYPE_REV, info));
            }
            comment(&mut e, &names.jump_comment);
            e.push(Expr::Counter);
            e.push(Expr::Verdict {
                code: sys::NFT_JUMP,
                chain: Some(chain.clone()),
            });
        }
    }
    e
}

/// NFTA_RULE_COMPAT's protocol: that of `-p`, 0 without.
fn compat_proto(rule: &AgentRule) -> u32 {
    match rule {
        AgentRule::Snat(s) => s.proto.number().into(),
        AgentRule::Dnat(m) => m.key.proto.number().into(),
        AgentRule::Forward(f) => f.proto.number().into(),
        AgentRule::Return(_) | AgentRule::Jump(_) | AgentRule::LocalJump(_) => 0,
        AgentRule::Masquerade | AgentRule::Mark(_) => 0,
    }
}

/// The netlink form of reduced expressions (the inverse of `parse_exprs`).
fn serialize(list: &[Expr]) -> Exprs {
    let mut e = Exprs::new();
    for x in list {
        match x {
            Expr::Meta { key, dreg } => e.meta_load(*key, *dreg),
            Expr::Cmp { sreg, op, data } => e.cmp(*sreg, *op, data),
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => e.payload(*dreg, *base, *offset, *len),
            Expr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
                op,
            } => {
                debug_assert!(sreg == dreg && *len as usize == mask.len() && *op == 0);
                e.bitwise(*sreg, mask, xor)
            }
            Expr::Xt {
                kind,
                name,
                rev,
                info,
            } => e.raw(if kind == "target" { "target" } else { "match" }, |d| {
                d.str(xt::NFTA_XT_NAME, name)
                    .be32(xt::NFTA_XT_REV, *rev)
                    .bytes(xt::NFTA_XT_INFO, info);
            }),
            Expr::Counter => e.counter(),
            Expr::Verdict { code, chain } => e.verdict(*code, chain.as_deref()),
            Expr::Other(name) => unreachable!("exprs_of never produces {name}"),
        };
    }
    e
}

/// Encodes `rule` as iptables-nft (or ip6tables-nft, for `family` IPv6) does.
pub fn encode(rule: &AgentRule, names: &Names, family: Family) -> Encoded {
    Encoded {
        exprs: serialize(&exprs_of(rule, names, family)),
        compat_proto: compat_proto(rule),
    }
}

/// The NEWRULE attributes for `rule` in `table`/`chain`, optionally placed
/// relative to the rule with handle `position` (NFTA_RULE_POSITION), in the
/// attribute order iptables-nft writes.
pub fn rule_attrs(
    table: &str,
    chain: &str,
    position: Option<u64>,
    rule: &AgentRule,
    names: &Names,
    family: Family,
) -> Attrs {
    let enc = encode(rule, names, family);
    let mut a = Attrs::with_capacity(enc.exprs.attrs().len() + 96);
    a.str(sys::NFTA_RULE_TABLE, table)
        .str(sys::NFTA_RULE_CHAIN, chain);
    if let Some(h) = position {
        a.be64(sys::NFTA_RULE_POSITION, h);
    }
    a.nest_attrs(sys::NFTA_RULE_EXPRESSIONS, enc.exprs.attrs())
        .nest(sys::NFTA_RULE_COMPAT, |c| {
            c.be32(sys::NFTA_RULE_COMPAT_PROTO, enc.compat_proto)
                .be32(sys::NFTA_RULE_COMPAT_FLAGS, 0);
        });
    a
}

/// An expression reduced to what the agent's encoding determines: counter
/// values, and attributes newer kernels add to their dumps (e.g. the
/// bitwise operation, 0 = mask/xor), are left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        op: u32,
    },
    Xt {
        kind: String,
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    Counter,
    Verdict {
        code: i32,
        chain: Option<String>,
    },
    Other(String),
}

fn data_value(a: &[u8], ty: u16) -> Vec<u8> {
    find_attr(a, ty)
        .and_then(|d| find_attr(d, sys::NFTA_DATA_VALUE))
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

fn parse_expr(e: &[u8]) -> Expr {
    let name = attr_str(e, sys::NFTA_EXPR_NAME).unwrap_or_default();
    let d = find_attr(e, sys::NFTA_EXPR_DATA).unwrap_or(&[]);
    let u = |ty: u16| attr_be32(d, ty).unwrap_or(u32::MAX);
    match name.as_str() {
        "meta" => Expr::Meta {
            key: u(sys::NFTA_META_KEY),
            dreg: u(sys::NFTA_META_DREG),
        },
        "cmp" => Expr::Cmp {
            sreg: u(sys::NFTA_CMP_SREG),
            op: u(sys::NFTA_CMP_OP),
            data: data_value(d, sys::NFTA_CMP_DATA),
        },
        "payload" => Expr::Payload {
            dreg: u(sys::NFTA_PAYLOAD_DREG),
            base: u(sys::NFTA_PAYLOAD_BASE),
            offset: u(sys::NFTA_PAYLOAD_OFFSET),
            len: u(sys::NFTA_PAYLOAD_LEN),
        },
        "bitwise" => Expr::Bitwise {
            sreg: u(sys::NFTA_BITWISE_SREG),
            dreg: u(sys::NFTA_BITWISE_DREG),
            len: u(sys::NFTA_BITWISE_LEN),
            mask: data_value(d, sys::NFTA_BITWISE_MASK),
            xor: data_value(d, sys::NFTA_BITWISE_XOR),
            op: attr_be32(d, sys::NFTA_BITWISE_OP).unwrap_or(0),
        },
        "match" | "target" => Expr::Xt {
            kind: name.clone(),
            name: attr_str(d, xt::NFTA_XT_NAME).unwrap_or_default(),
            rev: u(xt::NFTA_XT_REV),
            info: find_attr(d, xt::NFTA_XT_INFO)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        },
        "counter" => Expr::Counter,
        "immediate" if u(sys::NFTA_IMMEDIATE_DREG) == sys::NFT_REG_VERDICT => {
            let v = find_attr(d, sys::NFTA_IMMEDIATE_DATA)
                .and_then(|x| find_attr(x, sys::NFTA_DATA_VERDICT))
                .unwrap_or(&[]);
            Expr::Verdict {
                code: attr_be32(v, sys::NFTA_VERDICT_CODE).unwrap_or(0) as i32,
                chain: attr_str(v, sys::NFTA_VERDICT_CHAIN),
            }
        }
        _ => Expr::Other(name),
    }
}

/// The expressions of NFTA_RULE_EXPRESSIONS, reduced.
pub fn parse_exprs(list: &[u8]) -> Vec<Expr> {
    parse_attrs(list).map(|(_, e)| parse_expr(e)).collect()
}

/// The chain a rule jumps or goes to, if its verdict does either: how a
/// parent chain's rule is recognized as a jump to one of the agent's chains,
/// whatever else it matches.
pub fn jump_target(exprs: &[Expr]) -> Option<&str> {
    exprs.iter().rev().find_map(|e| match e {
        Expr::Verdict { code, chain } if *code == sys::NFT_JUMP || *code == sys::NFT_GOTO => {
            chain.as_deref()
        }
        _ => None,
    })
}

/// The fields a rule of the agent's can carry, collected loosely; `decode`
/// then insists on the exact encoding.
#[derive(Default)]
struct Fields {
    proto: Option<Proto>,
    saddr: Option<IpAddr>,
    daddr: Option<IpAddr>,
    dport: Option<u16>,
    comment: Option<String>,
    dnat: Option<(IpAddr, u16)>,
    snat: Option<IpAddr>,
    /// The name of an xt target other than DNAT/SNAT (MARK, MASQUERADE).
    target: Option<String>,
    verdict: Option<(i32, Option<String>)>,
}

fn collect(exprs: &[Expr], family: Family) -> Fields {
    let mut f = Fields::default();
    let h = encode::header(family);
    let mut last_load: Option<&Expr> = None;
    for e in exprs {
        match e {
            Expr::Meta { .. } | Expr::Payload { .. } => last_load = Some(e),
            Expr::Cmp { data, .. } => {
                match last_load {
                    Some(Expr::Meta { key, .. }) if *key == sys::NFT_META_L4PROTO => {
                        f.proto = data.first().and_then(|&n| Proto::from_number(n));
                    }
                    Some(Expr::Payload {
                        base, offset, len, ..
                    }) if *base == BASE_NETWORK && *len == h.addr_len => {
                        let ip = encode::ip_at(data, 0, family);
                        if *offset == h.saddr {
                            f.saddr = ip;
                        } else if *offset == h.daddr {
                            f.daddr = ip;
                        }
                    }
                    Some(Expr::Payload {
                        base,
                        offset,
                        len: 2,
                        ..
                    }) if *base == BASE_TRANSPORT && *offset == TH_DPORT => {
                        f.dport = <[u8; 2]>::try_from(data.as_slice())
                            .ok()
                            .map(u16::from_be_bytes);
                    }
                    _ => {}
                }
                last_load = None;
            }
            Expr::Xt {
                kind, name, info, ..
            } => match (kind.as_str(), name.as_str()) {
                ("match", "comment") => f.comment = xt::parse_comment_info(info),
                ("target", "DNAT") => f.dnat = xt::parse_dnat_range2(info, family == Family::Ipv6),
                ("target", "SNAT") if family == Family::Ipv4 => {
                    f.snat = xt::parse_snat_compat(info).map(IpAddr::V4)
                }
                ("target", "SNAT") => f.snat = xt::parse_snat_range(info),
                ("target", other) => f.target = Some(other.to_string()),
                _ => {}
            },
            Expr::Verdict { code, chain } => f.verdict = Some((*code, chain.clone())),
            _ => {}
        }
    }
    f
}

/// Decodes a rule of the agent's; `None` for anything that is not exactly
/// one of its encodings (such a rule in its chains is deleted).
pub fn decode(exprs: &[Expr], names: &Names, family: Family) -> Option<AgentRule> {
    let f = collect(exprs, family);
    let owner = || f.comment.as_deref().and_then(PodRef::from_comment);
    let candidates: Vec<AgentRule> = match (&f.dnat, &f.snat, &f.verdict) {
        _ if f.target.as_deref() == Some("MASQUERADE") => vec![AgentRule::Masquerade],
        _ if f.target.as_deref() == Some("MARK") => vec![AgentRule::Mark(LocalPod {
            pod_ip: f.saddr?,
            owner: owner()?,
        })],
        (Some((pod_ip, pod_port)), None, None) => vec![AgentRule::Dnat(Mapping {
            key: NatKey {
                public_ip: f.daddr?,
                public_port: f.dport?,
                proto: f.proto?,
            },
            pod_ip: *pod_ip,
            pod_port: *pod_port,
            owner: owner()?,
        })],
        (None, Some(public_ip), None) => vec![AgentRule::Snat(SnatRule {
            pod_ip: f.saddr?,
            proto: f.proto?,
            public_ip: *public_ip,
            owner: owner()?,
        })],
        (None, None, Some((code, None))) if *code == libc::NF_ACCEPT => {
            vec![AgentRule::Forward(ForwardRule {
                pod_ip: f.daddr?,
                proto: f.proto?,
                pod_port: f.dport?,
                owner: owner()?,
            })]
        }
        (None, None, Some((code, None))) if *code == sys::NFT_RETURN => {
            (0..internal_returns(family).len())
                .map(AgentRule::Return)
                .collect()
        }
        (None, None, Some((code, Some(chain)))) if *code == sys::NFT_JUMP => {
            vec![
                AgentRule::Jump(chain.clone()),
                AgentRule::LocalJump(chain.clone()),
            ]
        }
        _ => return None,
    };
    candidates
        .into_iter()
        .find(|r| exprs_of(r, names, family) == exprs)
}

#[cfg(test)]
mod tests;
