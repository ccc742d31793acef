//! Payloads of the xt-compat expressions (`match`, `target`) in the agent's
//! iptables rules: the kernel uapi structs `xt_comment_info`,
//! `xt_conntrack_mtinfo3`, `nf_nat_range2` and
//! `nf_nat_ipv4_multi_range_compat`, written and read byte by byte.
//!
//! Hand-written because no maintained crate encodes xt payloads (rustables
//! has no xt-compat support) and these four fixed-ABI structs are small. The
//! unit tests compare every byte with what iptables-nft 1.8.9 sends
//! (`testdata/iptables-nft-1.8.9-newrule.txt`, captured with strace by
//! `testdata/capture-newrule.sh`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// NFTA_MATCH_* / NFTA_TARGET_* (linux/netfilter/nf_tables_compat.h); the
/// two expressions number their attributes alike.
pub const NFTA_XT_NAME: u16 = 1;
pub const NFTA_XT_REV: u16 = 2;
pub const NFTA_XT_INFO: u16 = 3;

/// Revisions iptables-nft 1.8.9 uses for these extensions.
pub const COMMENT_REV: u32 = 0;
pub const CONNTRACK_REV: u32 = 3;
pub const DNAT_REV: u32 = 2;
pub const SNAT_REV: u32 = 0;

/// XT_ALIGN: payload sizes are rounded up to 8 bytes; the kernel checks
/// NFTA_*_INFO against exactly that length.
const fn xt_align(n: usize) -> usize {
    (n + 7) & !7
}

/// `XT_MAX_COMMENT_LEN`: the comment with its NUL.
pub const XT_MAX_COMMENT_LEN: usize = 256;
pub const COMMENT_INFO_LEN: usize = xt_align(XT_MAX_COMMENT_LEN);

/// `struct xt_comment_info { char comment[256]; }`. Longer comments are cut
/// at a character boundary (iptables refuses them; the agent's are shorter).
pub fn comment_info(comment: &str) -> Vec<u8> {
    let mut cut = comment.len().min(XT_MAX_COMMENT_LEN - 1);
    while !comment.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut info = vec![0u8; COMMENT_INFO_LEN];
    info[..cut].copy_from_slice(&comment.as_bytes()[..cut]);
    info
}

pub fn parse_comment_info(info: &[u8]) -> Option<String> {
    if info.len() != COMMENT_INFO_LEN {
        return None;
    }
    let end = info.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&info[..end]).ok().map(str::to_string)
}

/// sizeof(struct xt_conntrack_mtinfo3): eight 16-byte addresses, two u32,
/// thirteen u16, padded to 4 → 164; XT_ALIGN → 168.
pub const CONNTRACK_INFO_LEN: usize = xt_align(164);
const CT_MATCH_FLAGS: usize = 8 * 16 + 2 * 4 + 5 * 2; // after l4proto and 4 ports
const CT_STATE_MASK: usize = CT_MATCH_FLAGS + 2 * 2; // after invert_flags
/// XT_CONNTRACK_STATE (match_flags bit 0).
const XT_CONNTRACK_STATE: u16 = 1;
/// XT_CONNTRACK_STATE_BIT(IP_CT_NEW) = 1 << (IP_CT_NEW + 1), IP_CT_NEW = 2.
const STATE_BIT_NEW: u16 = 1 << 3;

/// `-m conntrack --ctstate NEW`: only match_flags and state_mask are set
/// (host byte order, like every field of the struct but the ports).
pub fn conntrack_state_new() -> Vec<u8> {
    let mut info = vec![0u8; CONNTRACK_INFO_LEN];
    info[CT_MATCH_FLAGS..CT_MATCH_FLAGS + 2].copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
    info[CT_STATE_MASK..CT_STATE_MASK + 2].copy_from_slice(&STATE_BIT_NEW.to_ne_bytes());
    info
}

/// XT_CONNTRACK_STATE_DNAT = 1 << (IP_CT_NUMBER + 2), IP_CT_NUMBER = 5.
const STATE_BIT_DNAT: u16 = 1 << 7;
/// XT_CONNTRACK_PROTO | XT_CONNTRACK_ORIGDST | XT_CONNTRACK_ORIGDST_PORT.
const CT_ORIG_FLAGS: u16 = (1 << 1) | (1 << 3) | (1 << 9);
const CT_ORIGDST_ADDR: usize = 2 * 16;
const CT_ORIGDST_MASK: usize = 3 * 16;
const CT_L4PROTO: usize = 8 * 16 + 2 * 4;
const CT_ORIGDST_PORT: usize = CT_L4PROTO + 2 * 2; // after l4proto, origsrc_port
const CT_ORIGDST_PORT_HIGH: usize = CT_STATE_MASK + 3 * 2; // after status, origsrc_high

/// `-m conntrack --ctstate DNAT` (mangle's jumps to the counting chains).
pub fn conntrack_state_dnat() -> Vec<u8> {
    let mut info = vec![0u8; CONNTRACK_INFO_LEN];
    info[CT_MATCH_FLAGS..CT_MATCH_FLAGS + 2].copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
    info[CT_STATE_MASK..CT_STATE_MASK + 2].copy_from_slice(&STATE_BIT_DNAT.to_ne_bytes());
    info
}

/// `-m conntrack --ctproto P --ctorigdst A --ctorigdstport lo[:hi]`: the
/// original destination of a connection (a mapping's key, a range's ports;
/// one port is lo = hi). The ports in host byte order, as iptables writes
/// them; an IPv4 address in the first 4 bytes of its 16. The address bare,
/// as iptables-nft-save prints it: every mask byte set (iptables sets only
/// 4 for `A/32`; the kernel compares 4 for IPv4 either way), so that a
/// save restores, and `-C` finds, the very rule.
pub fn conntrack_orig_dst(ip: IpAddr, proto: u8, lo: u16, hi: u16) -> Vec<u8> {
    let mut info = vec![0u8; CONNTRACK_INFO_LEN];
    write_orig_dst(&mut info, ip, proto, lo, hi);
    info
}

fn write_orig_dst(info: &mut [u8], ip: IpAddr, proto: u8, lo: u16, hi: u16) {
    let bytes = ip_bytes(&ip);
    info[CT_ORIGDST_ADDR..CT_ORIGDST_ADDR + bytes.len()].copy_from_slice(&bytes);
    info[CT_ORIGDST_MASK..CT_ORIGDST_MASK + 16].fill(0xff);
    info[CT_L4PROTO..CT_L4PROTO + 2].copy_from_slice(&u16::from(proto).to_ne_bytes());
    info[CT_ORIGDST_PORT..CT_ORIGDST_PORT + 2].copy_from_slice(&lo.to_ne_bytes());
    info[CT_ORIGDST_PORT_HIGH..CT_ORIGDST_PORT_HIGH + 2].copy_from_slice(&hi.to_ne_bytes());
    info[CT_MATCH_FLAGS..CT_MATCH_FLAGS + 2].copy_from_slice(&CT_ORIG_FLAGS.to_ne_bytes());
}

/// The original destination of a `conntrack_orig_dst` payload: (address,
/// protocol number, first port, last port), only if the payload is exactly
/// the agent's encoding of them (no inversion, no other field, the mask it
/// writes) — compared on the stack, without allocating.
pub fn parse_conntrack_orig_dst(info: &[u8], ipv6: bool) -> Option<(IpAddr, u8, u16, u16)> {
    if info.len() != CONNTRACK_INFO_LEN {
        return None;
    }
    let u16_at = |at: usize| u16::from_ne_bytes([info[at], info[at + 1]]);
    let ip = addr_at(info, CT_ORIGDST_ADDR, ipv6)?;
    let proto = u8::try_from(u16_at(CT_L4PROTO)).ok()?;
    let (lo, hi) = (u16_at(CT_ORIGDST_PORT), u16_at(CT_ORIGDST_PORT_HIGH));
    let mut mine = [0u8; CONNTRACK_INFO_LEN];
    write_orig_dst(&mut mine, ip, proto, lo, hi);
    (info == mine).then_some((ip, proto, lo, hi))
}

/// NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED (linux/netfilter/nf_nat.h).
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
/// NF_NAT_RANGE_PROTO_OFFSET: the port is min + (dport - base_proto).
const NF_NAT_RANGE_PROTO_OFFSET: u32 = 1 << 5;

/// sizeof(struct nf_nat_range2) = 4 + 16 + 16 + 2 + 2 + 2 = 42 → 48.
pub const DNAT_INFO_LEN: usize = xt_align(42);
const R2_MIN_ADDR: usize = 4;
const R2_MAX_ADDR: usize = 20;
const R2_MIN_PROTO: usize = 36;
const R2_MAX_PROTO: usize = 38;
const R2_BASE_PROTO: usize = 40;

/// `-j DNAT --to-destination ip:port` (target revision 2): one address and
/// one port, as min = max; with a `span` (a port range published with one
/// offset), `ip:port-(port+span)/base`: the ports min..max and
/// NF_NAT_RANGE_PROTO_OFFSET with base_proto = the first public port, so
/// public port `base + i` goes to `port + i`.
/// An IPv4 address sits in the first 4 of the 16 bytes of `nf_inet_addr`,
/// an IPv6 one fills them (ip6tables-nft, revision 2 as for IPv4).
pub fn dnat_range2(ip: IpAddr, port: u16, span: u16, base: u16) -> Vec<u8> {
    let mut info = vec![0u8; DNAT_INFO_LEN];
    let mut flags = NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED;
    if span > 0 {
        flags |= NF_NAT_RANGE_PROTO_OFFSET;
        info[R2_BASE_PROTO..R2_BASE_PROTO + 2].copy_from_slice(&base.to_be_bytes());
    }
    info[..4].copy_from_slice(&flags.to_ne_bytes());
    let bytes = ip_bytes(&ip);
    for at in [R2_MIN_ADDR, R2_MAX_ADDR] {
        info[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    let max = port.saturating_add(span);
    info[R2_MIN_PROTO..R2_MIN_PROTO + 2].copy_from_slice(&port.to_be_bytes());
    info[R2_MAX_PROTO..R2_MAX_PROTO + 2].copy_from_slice(&max.to_be_bytes());
    info
}

/// The address and ports of a `dnat_range2` payload: (address, min port,
/// max port); whether it is exactly the agent's encoding (flags, base) is
/// checked by re-encoding.
/// `ipv6`: read the address as the 16 bytes ip6tables-nft writes.
pub fn parse_dnat_range2(info: &[u8], ipv6: bool) -> Option<(IpAddr, u16, u16)> {
    if info.len() != DNAT_INFO_LEN {
        return None;
    }
    let ip = addr_at(info, R2_MIN_ADDR, ipv6)?;
    let port = |at: usize| u16::from_be_bytes([info[at], info[at + 1]]);
    Some((ip, port(R2_MIN_PROTO), port(R2_MAX_PROTO)))
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn addr_at(info: &[u8], at: usize, ipv6: bool) -> Option<IpAddr> {
    Some(if ipv6 {
        let b: [u8; 16] = info.get(at..at + 16)?.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        let b: [u8; 4] = info.get(at..at + 4)?.try_into().ok()?;
        IpAddr::V4(Ipv4Addr::from(b))
    })
}

/// `-m addrtype --dst-type LOCAL`: match revision 1, `struct
/// xt_addrtype_info_v1` { u16 source; u16 dest; u32 flags } with dest =
/// XT_ADDRTYPE_LOCAL (1 << RTN_LOCAL), host byte order; 8 bytes.
pub const ADDRTYPE_REV: u32 = 1;

pub fn addrtype_dst_local() -> Vec<u8> {
    let mut info = vec![0u8; 8];
    let local = 1u16 << libc::RTN_LOCAL;
    info[2..4].copy_from_slice(&local.to_ne_bytes());
    info
}

/// `-j MARK --set-xmark bits/bits` (`--or-mark bits` sends the same):
/// target revision 2, `struct xt_mark_tginfo2` { u32 mark; u32 mask }.
pub const MARK_REV: u32 = 2;

pub fn mark_or(bits: u32) -> Vec<u8> {
    let mut info = bits.to_ne_bytes().to_vec();
    info.extend_from_slice(&bits.to_ne_bytes());
    info
}

/// `-j MASQUERADE`: target revision 0; IPv4 `nf_nat_ipv4_multi_range_compat`
/// with rangesize 1 and nothing else (24 bytes), IPv6 `nf_nat_range` all
/// zero (40 bytes), as iptables-nft / ip6tables-nft 1.8.9 send them.
pub const MASQUERADE_REV: u32 = 0;

pub fn masquerade_info(family: crate::model::Family) -> Vec<u8> {
    match family {
        crate::model::Family::Ipv4 => {
            let mut info = vec![0u8; SNAT_INFO_LEN];
            info[..4].copy_from_slice(&1u32.to_ne_bytes());
            info
        }
        crate::model::Family::Ipv6 => vec![0u8; SNAT6_INFO_LEN],
    }
}

/// ip6tables-nft's `-j SNAT --to-source ip` is target revision 1 with
/// `struct nf_nat_range` (flags, min/max address, min/max port: 40 bytes,
/// no base_proto), not IPv4's revision-0 multi-range struct.
pub const SNAT6_REV: u32 = 1;
pub const SNAT6_INFO_LEN: usize = xt_align(40);
const R1_MIN_ADDR: usize = 4;
const R1_MAX_ADDR: usize = 20;

pub fn snat_range(ip: Ipv6Addr) -> Vec<u8> {
    let mut info = vec![0u8; SNAT6_INFO_LEN];
    info[..4].copy_from_slice(&NF_NAT_RANGE_MAP_IPS.to_ne_bytes());
    for at in [R1_MIN_ADDR, R1_MAX_ADDR] {
        info[at..at + 16].copy_from_slice(&ip.octets());
    }
    info
}

pub fn parse_snat_range(info: &[u8]) -> Option<IpAddr> {
    if info.len() != SNAT6_INFO_LEN {
        return None;
    }
    addr_at(info, R1_MIN_ADDR, true)
}

/// sizeof(struct nf_nat_ipv4_multi_range_compat) = 4 + (4 + 4 + 4 + 2 + 2) = 20 → 24.
pub const SNAT_INFO_LEN: usize = xt_align(20);
const MR_FLAGS: usize = 4;
const MR_MIN_IP: usize = 8;
const MR_MAX_IP: usize = 12;

/// `-j SNAT --to-source ip` (target revision 0): rangesize 1, MAP_IPS,
/// min_ip = max_ip, no ports.
pub fn snat_compat(ip: Ipv4Addr) -> Vec<u8> {
    let mut info = vec![0u8; SNAT_INFO_LEN];
    info[..4].copy_from_slice(&1u32.to_ne_bytes());
    info[MR_FLAGS..MR_FLAGS + 4].copy_from_slice(&NF_NAT_RANGE_MAP_IPS.to_ne_bytes());
    for at in [MR_MIN_IP, MR_MAX_IP] {
        info[at..at + 4].copy_from_slice(&ip.octets());
    }
    info
}

pub fn parse_snat_compat(info: &[u8]) -> Option<Ipv4Addr> {
    if info.len() != SNAT_INFO_LEN {
        return None;
    }
    let ip: [u8; 4] = info[MR_MIN_IP..MR_MIN_IP + 4].try_into().ok()?;
    Some(Ipv4Addr::from(ip))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::firewall::wire::netlink::{find_attr, parse_attrs, sys};

    /// NEWRULE payloads iptables-nft 1.8.9 sent (name, flags, attribute bytes).
    pub(crate) fn observed() -> Vec<(String, u16, Vec<u8>)> {
        include_str!("testdata/iptables-nft-1.8.9-newrule.txt")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next().unwrap().to_string();
                let flags = it.next().unwrap().trim_start_matches("flags=0x");
                let flags = u16::from_str_radix(flags, 16).unwrap();
                let hex = it.next().unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                (name, flags, bytes)
            })
            .collect()
    }

    /// The INFO of the `n`-th xt expression called `expr` ("match"/"target")
    /// named `xt_name` in an observed rule.
    fn observed_info(rule: &str, expr: &str, xt_name: &str) -> Vec<u8> {
        let (_, _, attrs) = observed().into_iter().find(|(n, _, _)| n == rule).unwrap();
        let exprs = find_attr(&attrs, sys::NFTA_RULE_EXPRESSIONS).unwrap();
        for (_, e) in parse_attrs(exprs) {
            let name = crate::firewall::wire::netlink::attr_str(e, sys::NFTA_EXPR_NAME).unwrap();
            let data = find_attr(e, sys::NFTA_EXPR_DATA).unwrap();
            if name == expr
                && crate::firewall::wire::netlink::attr_str(data, NFTA_XT_NAME).as_deref()
                    == Some(xt_name)
            {
                return find_attr(data, NFTA_XT_INFO).unwrap().to_vec();
            }
        }
        panic!("no {expr} {xt_name} in {rule}");
    }

    #[test]
    fn comment_matches_iptables_nft() {
        let got = comment_info("mail:mx-0");
        assert_eq!(got, observed_info("dnat_tcp", "match", "comment"));
        assert_eq!(got.len(), 256);
        assert_eq!(parse_comment_info(&got).as_deref(), Some("mail:mx-0"));
        assert_eq!(
            comment_info("podnat[jump_to_chain]"),
            observed_info("jump_pre", "match", "comment")
        );
        // Over-long comments keep their NUL.
        let long = comment_info(&"x".repeat(300));
        assert_eq!(long[254], b'x');
        assert_eq!(long[255], 0);
    }

    #[test]
    fn conntrack_new_matches_iptables_nft() {
        let got = conntrack_state_new();
        assert_eq!(got.len(), 168);
        assert_eq!(got, observed_info("fwd_tcp", "match", "conntrack"));
        assert_eq!(got, observed_info("fwd_udp", "match", "conntrack"));
    }

    #[test]
    fn counting_matches_iptables_nft() {
        assert_eq!(
            conntrack_state_dnat(),
            observed_info("count_jump", "match", "conntrack")
        );
        let ip = Ipv4Addr::new(203, 0, 113, 7).into();
        let one = conntrack_orig_dst(ip, 6, 25, 25);
        assert_eq!(one, observed_info("count_tcp", "match", "conntrack"));
        let range = conntrack_orig_dst(ip, 17, 10000, 10099);
        assert_eq!(range, observed_info("count_range", "match", "conntrack"));
        assert_eq!(
            parse_conntrack_orig_dst(&range, false),
            Some((ip, 17, 10000, 10099))
        );
        assert_eq!(
            parse_conntrack_orig_dst(&conntrack_state_dnat(), false),
            None
        );
    }

    #[test]
    fn dnat_matches_iptables_nft() {
        let got = dnat_range2(Ipv4Addr::new(10, 1, 0, 5).into(), 25, 0, 25);
        assert_eq!(got.len(), 48);
        assert_eq!(got, observed_info("dnat_tcp", "target", "DNAT"));
        assert_eq!(
            dnat_range2(Ipv4Addr::new(10, 1, 1, 5).into(), 53, 0, 5353),
            observed_info("dnat_udp", "target", "DNAT")
        );
        assert_eq!(
            parse_dnat_range2(&got, false),
            Some((Ipv4Addr::new(10, 1, 0, 5).into(), 25, 25))
        );
        // `--to-destination 10.1.2.5:20000-20099/10000`.
        let range = dnat_range2(Ipv4Addr::new(10, 1, 2, 5).into(), 20000, 99, 10000);
        assert_eq!(range, observed_info("dnat_range", "target", "DNAT"));
        assert_eq!(
            parse_dnat_range2(&range, false),
            Some((Ipv4Addr::new(10, 1, 2, 5).into(), 20000, 20099))
        );
    }

    #[test]
    fn snat_matches_iptables_nft() {
        let got = snat_compat(Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(got.len(), 24);
        assert_eq!(got, observed_info("snat_tcp", "target", "SNAT"));
        assert_eq!(
            snat_compat(Ipv4Addr::new(198, 51, 100, 9)),
            observed_info("snat_udp", "target", "SNAT")
        );
        assert_eq!(parse_snat_compat(&got), Some(Ipv4Addr::new(203, 0, 113, 7)));
    }
}
