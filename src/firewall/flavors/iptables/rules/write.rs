//! Writing a rule: an `AgentRule` as the expressions iptables-nft 1.8.9
//! writes for it, their netlink form, and the NEWRULE attributes.

use std::net::IpAddr;

use super::super::xt;
use super::{AgentRule, Expr};
use crate::firewall::names::{internal_returns, HAIRPIN_MARK};
use crate::firewall::wire::encode::{
    self, octets, Exprs, BASE_NETWORK, BASE_TRANSPORT, REG_1, TH_DPORT,
};
use crate::firewall::wire::netlink::{sys, Attrs};
use crate::firewall::{comment_for, Names};
use crate::model::{Family, Proto};

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

/// `-s`/`-d net/len` (never /0, which iptables writes as no match at all;
/// the annotation makes a /0 an open mapping): byte-aligned prefixes load only their bytes; others load
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

/// `--dport N`, or `--dport N:N+span` (a native range expression in
/// iptables-nft 1.8.9).
fn dport(e: &mut Vec<Expr>, port: u16, span: u16) {
    e.push(load(BASE_TRANSPORT, TH_DPORT, 2));
    if span == 0 {
        e.push(cmp_eq(&port.to_be_bytes()));
    } else {
        e.push(Expr::Range {
            sreg: REG_1,
            op: encode::NFT_RANGE_EQ,
            from: port.to_be_bytes().to_vec(),
            to: port.saturating_add(span).to_be_bytes().to_vec(),
        });
    }
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
        AgentRule::Dnat(m, source) => {
            proto(&mut e, m.key.proto);
            if let Some(net) = source {
                prefix(&mut e, Side::Src, net.addr(), net.prefix_len());
            }
            host(&mut e, Side::Dst, m.key.public_ip);
            dport(&mut e, m.key.public_port, m.span);
            comment(&mut e, &comment_for(&m.owner));
            e.push(Expr::Counter);
            let info = xt::dnat_range2(m.pod_ip, m.pod_port, m.span, m.key.public_port);
            e.push(xt("target", "DNAT", xt::DNAT_REV, info));
        }
        AgentRule::Forward(f) => {
            // The Go version's order: `-m conntrack --ctstate NEW` before
            // `-m tcp --dport N` (its `getRule`).
            proto(&mut e, f.proto);
            host(&mut e, Side::Dst, f.pod_ip);
            let ct = xt::conntrack_state_new();
            e.push(xt("match", "conntrack", xt::CONNTRACK_REV, ct));
            dport(&mut e, f.pod_port, f.span);
            comment(&mut e, &comment_for(&f.owner));
            e.push(Expr::Counter);
            e.push(verdict(libc::NF_ACCEPT));
        }
        AgentRule::Count(c) => {
            let hi = c.key.public_port.saturating_add(c.span);
            let ct = xt::conntrack_orig_dst(
                c.key.public_ip,
                c.key.proto.number(),
                c.key.public_port,
                hi,
            );
            e.push(xt("match", "conntrack", xt::CONNTRACK_REV, ct));
            comment(&mut e, &comment_for(&c.owner));
            e.push(Expr::Counter);
            e.push(verdict(sys::NFT_RETURN));
        }
        AgentRule::Jump(chain) | AgentRule::LocalJump(chain) | AgentRule::DnatJump(chain) => {
            if matches!(rule, AgentRule::LocalJump(_)) {
                let info = xt::addrtype_dst_local();
                e.push(xt("match", "addrtype", xt::ADDRTYPE_REV, info));
            }
            if matches!(rule, AgentRule::DnatJump(_)) {
                let info = xt::conntrack_state_dnat();
                e.push(xt("match", "conntrack", xt::CONNTRACK_REV, info));
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
        AgentRule::Dnat(m, _) => m.key.proto.number().into(),
        AgentRule::Forward(f) => f.proto.number().into(),
        AgentRule::Return(_) | AgentRule::Jump(_) | AgentRule::LocalJump(_) => 0,
        AgentRule::DnatJump(_) | AgentRule::Count(_) => 0,
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
            Expr::Range { sreg, op, from, to } => e.range(*sreg, *op, from, to),
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
