//! Reading a rule: the expressions of a dumped rule, reduced to `Expr`, and
//! back to the `AgentRule` whose encoding they are exactly.

use std::net::IpAddr;

use ipnet::IpNet;

use super::super::xt;
use super::{exprs_of, AgentRule, Counted, Expr};
use crate::firewall::names::internal_returns;
use crate::firewall::wire::encode::{self, BASE_NETWORK, BASE_TRANSPORT, TH_DPORT};
use crate::firewall::wire::netlink::{attr_be32, attr_str, find_attr, parse_attrs, sys};
use crate::firewall::Names;
use crate::model::{Family, ForwardRule, LocalPod, Mapping, NatKey, PodRef, Proto, SnatRule};

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
        "range" => Expr::Range {
            sreg: u(encode::NFTA_RANGE_SREG),
            op: u(encode::NFTA_RANGE_OP),
            from: data_value(d, encode::NFTA_RANGE_FROM_DATA),
            to: data_value(d, encode::NFTA_RANGE_TO_DATA),
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
    /// `-s net/len` of any length (a host is also `saddr`).
    source: Option<IpNet>,
    daddr: Option<IpAddr>,
    dport: Option<u16>,
    /// The last port of `--dport N:M` (`dport` is N).
    dport_end: Option<u16>,
    comment: Option<String>,
    dnat: Option<(IpAddr, u16, u16)>,
    snat: Option<IpAddr>,
    /// `-m conntrack --ctorigdst …` of a counting rule: (address, protocol
    /// number, first port, last port).
    counted: Option<(IpAddr, u8, u16, u16)>,
    /// The name of an xt target other than DNAT/SNAT (MARK, MASQUERADE).
    target: Option<String>,
    verdict: Option<(i32, Option<String>)>,
}

impl Fields {
    /// The ports after the first of `--dport N:M` (0 for one port).
    fn span(&self) -> Option<u16> {
        match self.dport_end {
            None => Some(0),
            Some(end) => end.checked_sub(self.dport?),
        }
    }
}

fn collect(exprs: &[Expr], family: Family) -> Fields {
    let mut f = Fields::default();
    let h = encode::header(family);
    let mut last_load: Option<&Expr> = None;
    // The mask of a bitwise between a load and its cmp (a prefix that is
    // not byte-aligned).
    let mut mask: Option<&[u8]> = None;
    for e in exprs {
        match e {
            Expr::Meta { .. } | Expr::Payload { .. } => {
                last_load = Some(e);
                mask = None;
            }
            Expr::Bitwise { mask: m, .. } => mask = Some(m),
            Expr::Cmp { data, .. } => {
                if let Some(Expr::Payload {
                    base, offset, len, ..
                }) = last_load
                {
                    if *base == BASE_NETWORK && *offset == h.saddr && *len <= h.addr_len {
                        f.source = source_net(data, mask, family);
                    }
                }
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
                mask = None;
            }
            Expr::Range { from, to, .. } => {
                if let Some(Expr::Payload {
                    base,
                    offset,
                    len: 2,
                    ..
                }) = last_load
                {
                    if *base == BASE_TRANSPORT && *offset == TH_DPORT {
                        let port = |d: &[u8]| <[u8; 2]>::try_from(d).ok().map(u16::from_be_bytes);
                        f.dport = port(from);
                        f.dport_end = port(to);
                    }
                }
                last_load = None;
                mask = None;
            }
            Expr::Xt {
                kind, name, info, ..
            } => match (kind.as_str(), name.as_str()) {
                ("match", "comment") => f.comment = xt::parse_comment_info(info),
                ("match", "conntrack") => {
                    f.counted = xt::parse_conntrack_orig_dst(info, family == Family::Ipv6)
                }
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

/// The network a source match compares with: the cmp's bytes (a prefix's
/// only, when byte-aligned) and the length from the mask, if any.
fn source_net(data: &[u8], mask: Option<&[u8]>, family: Family) -> Option<IpNet> {
    let width = encode::header(family).addr_len as usize;
    if data.is_empty() || data.len() > width {
        return None;
    }
    let mut bytes = data.to_vec();
    bytes.resize(width, 0);
    let len = match mask {
        Some(m) => m.iter().map(|b| b.count_ones()).sum::<u32>(),
        None => 8 * data.len() as u32,
    };
    // Host bits set: a rule that matches nothing, not one the agent writes.
    IpNet::new(encode::ip_at(&bytes, 0, family)?, u8::try_from(len).ok()?)
        .ok()
        .filter(|n| n.trunc() == *n)
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
        // The pod ports run as far as the public ones, within 65535 (the
        // encoding saturates; `Mapping::ports` must not overflow).
        (Some((pod_ip, pod_port, max)), None, None)
            if pod_port.checked_add(f.span()?) == Some(*max) =>
        {
            vec![AgentRule::Dnat(
                Mapping {
                    key: NatKey {
                        public_ip: f.daddr?,
                        public_port: f.dport?,
                        proto: f.proto?,
                    },
                    pod_ip: *pod_ip,
                    pod_port: *pod_port,
                    owner: owner()?,
                    span: f.span()?,
                },
                f.source,
            )]
        }
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
                span: f.span()?,
            })]
        }
        (None, None, Some((code, None))) if *code == sys::NFT_RETURN => match f.counted {
            Some((public_ip, proto, lo, hi)) => vec![AgentRule::Count(Counted {
                key: NatKey {
                    public_ip,
                    public_port: lo,
                    proto: Proto::from_number(proto)?,
                },
                span: hi.checked_sub(lo)?,
                owner: owner()?,
            })],
            None => (0..internal_returns(family).len())
                .map(AgentRule::Return)
                .collect(),
        },
        (None, None, Some((code, Some(chain)))) if *code == sys::NFT_JUMP => {
            vec![
                AgentRule::Jump(chain.clone()),
                AgentRule::LocalJump(chain.clone()),
                AgentRule::DnatJump(chain.clone()),
            ]
        }
        _ => return None,
    };
    candidates
        .into_iter()
        .find(|r| exprs_of(r, names, family) == exprs)
}
