//! nf_tables expression encoding shared by both flavors: the few native
//! expressions the agent's rules use, each as one `Attrs` list element.

use std::net::IpAddr;

use crate::model::Family;

use super::netlink::{sys, Attrs};

/// Registers: NFT_REG_1 (128 bit, shares storage with REG32_00) and the
/// 32-bit registers concatenations are loaded into.
pub const REG_VERDICT: u32 = sys::NFT_REG_VERDICT;
pub const REG_1: u32 = sys::NFT_REG_1;
pub const REG32_01: u32 = sys::NFT_REG32_01;
pub const REG32_02: u32 = sys::NFT_REG32_02;

pub const BASE_NETWORK: u32 = sys::NFT_PAYLOAD_NETWORK_HEADER;
pub const BASE_TRANSPORT: u32 = sys::NFT_PAYLOAD_TRANSPORT_HEADER;

/// The range expression's attributes (linux/netfilter/nf_tables.h; not in
/// rustables' sys) and its "equal" operation.
pub const NFTA_RANGE_SREG: u16 = 1;
pub const NFTA_RANGE_OP: u16 = 2;
pub const NFTA_RANGE_FROM_DATA: u16 = 3;
pub const NFTA_RANGE_TO_DATA: u16 = 4;
pub const NFT_RANGE_EQ: u32 = 0;

/// Offsets in the IPv4 header and in a TCP/UDP header.
pub const IP_SADDR: u32 = 12;
pub const IP_DADDR: u32 = 16;
pub const TH_DPORT: u32 = 2;
/// Offsets in the IPv6 header.
pub const IP6_SADDR: u32 = 8;
pub const IP6_DADDR: u32 = 24;

/// Where a family's network header keeps its addresses, and how long they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub saddr: u32,
    pub daddr: u32,
    pub addr_len: u32,
}

pub fn header(f: Family) -> Header {
    match f {
        Family::Ipv4 => Header {
            saddr: IP_SADDR,
            daddr: IP_DADDR,
            addr_len: 4,
        },
        Family::Ipv6 => Header {
            saddr: IP6_SADDR,
            daddr: IP6_DADDR,
            addr_len: 16,
        },
    }
}

/// An address's bytes in network order (4 or 16), without allocating.
#[derive(Clone, Copy)]
pub struct Octets {
    bytes: [u8; 16],
    len: usize,
}

impl std::ops::Deref for Octets {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

pub fn octets(ip: &IpAddr) -> Octets {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            Octets { bytes, len: 4 }
        }
        IpAddr::V6(a) => Octets {
            bytes: a.octets(),
            len: 16,
        },
    }
}

/// The address of `f` in `b` at `at`.
pub fn ip_at(b: &[u8], at: usize, f: Family) -> Option<IpAddr> {
    Some(match f {
        Family::Ipv4 => {
            let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
            IpAddr::from(o)
        }
        Family::Ipv6 => {
            let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
            IpAddr::from(o)
        }
    })
}

/// The mask of a `len`-bit prefix of an address of `bytes` bytes.
pub fn prefix_mask(len: u8, bytes: usize) -> Vec<u8> {
    let bits = bytes * 8;
    let m = u128::MAX
        .checked_shl((128 - u32::from(len)).min(128))
        .unwrap_or(0);
    m.to_be_bytes()[..bits / 8].to_vec()
}

/// A list of expressions for NFTA_RULE_EXPRESSIONS.
#[derive(Default)]
pub struct Exprs {
    list: Attrs,
}

impl Exprs {
    pub fn new() -> Exprs {
        Exprs::default()
    }

    fn push(&mut self, name: &'static str, data: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.list.nest(sys::NFTA_LIST_ELEM, |e| {
            e.str(sys::NFTA_EXPR_NAME, name);
            e.nest(sys::NFTA_EXPR_DATA, data);
        });
        self
    }

    /// Appends the expressions of `other` (one rule built in parts).
    pub fn append(&mut self, other: Exprs) -> &mut Self {
        self.list.extend_from(&other.list);
        self
    }

    /// Raw xt-compat or other expression data the caller encodes itself.
    pub fn raw(&mut self, name: &'static str, data: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.push(name, data)
    }

    pub fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) -> &mut Self {
        self.push("payload", |d| {
            d.be32(sys::NFTA_PAYLOAD_DREG, dreg)
                .be32(sys::NFTA_PAYLOAD_BASE, base)
                .be32(sys::NFTA_PAYLOAD_OFFSET, offset)
                .be32(sys::NFTA_PAYLOAD_LEN, len);
        })
    }

    pub fn meta_l4proto(&mut self, dreg: u32) -> &mut Self {
        self.push("meta", |d| {
            d.be32(sys::NFTA_META_KEY, sys::NFT_META_L4PROTO)
                .be32(sys::NFTA_META_DREG, dreg);
        })
    }

    /// `meta <key>` into `dreg` (e.g. NFT_META_MARK).
    pub fn meta_load(&mut self, key: u32, dreg: u32) -> &mut Self {
        self.push("meta", |d| {
            d.be32(sys::NFTA_META_KEY, key)
                .be32(sys::NFTA_META_DREG, dreg);
        })
    }

    /// `meta <key> set` from `sreg`.
    pub fn meta_set(&mut self, key: u32, sreg: u32) -> &mut Self {
        self.push("meta", |d| {
            d.be32(sys::NFTA_META_KEY, key)
                .be32(sys::NFTA_META_SREG, sreg);
        })
    }

    /// `fib daddr type` compared with `rtn_type` (RTN_LOCAL: the
    /// destination is an address of this host).
    pub fn fib_daddr_type(&mut self, rtn_type: u32) -> &mut Self {
        self.push("fib", |d| {
            d.be32(sys::NFTA_FIB_DREG, REG_1)
                .be32(sys::NFTA_FIB_RESULT, sys::NFT_FIB_RESULT_ADDRTYPE)
                .be32(sys::NFTA_FIB_FLAGS, sys::NFTA_FIB_F_DADDR);
        });
        self.cmp_eq(REG_1, &rtn_type.to_ne_bytes())
    }

    /// `meta mark set meta mark | bits` (host byte order, as the mark is).
    pub fn mark_or(&mut self, bits: u32) -> &mut Self {
        self.meta_load(sys::NFT_META_MARK, REG_1);
        self.bitwise(REG_1, &(!bits).to_ne_bytes(), &bits.to_ne_bytes());
        self.meta_set(sys::NFT_META_MARK, REG_1)
    }

    /// `meta mark & bits == bits`.
    pub fn mark_has(&mut self, bits: u32) -> &mut Self {
        self.meta_load(sys::NFT_META_MARK, REG_1);
        self.bitwise(REG_1, &bits.to_ne_bytes(), &[0; 4]);
        self.cmp_eq(REG_1, &bits.to_ne_bytes())
    }

    /// Masquerade to the address of the outgoing interface.
    pub fn masquerade(&mut self) -> &mut Self {
        self.push("masq", |_| {})
    }

    pub fn cmp(&mut self, sreg: u32, op: u32, value: &[u8]) -> &mut Self {
        self.push("cmp", |d| {
            d.be32(sys::NFTA_CMP_SREG, sreg)
                .be32(sys::NFTA_CMP_OP, op)
                .nest(sys::NFTA_CMP_DATA, |v| {
                    v.bytes(sys::NFTA_DATA_VALUE, value);
                });
        })
    }

    /// `range eq reg lo hi` (`--dport lo:hi` in iptables-nft): `op`
    /// NFT_RANGE_EQ (0) or NFT_RANGE_NEQ (1), bounds inclusive.
    pub fn range(&mut self, sreg: u32, op: u32, from: &[u8], to: &[u8]) -> &mut Self {
        self.push("range", |d| {
            d.be32(NFTA_RANGE_SREG, sreg)
                .be32(NFTA_RANGE_OP, op)
                .nest(NFTA_RANGE_FROM_DATA, |v| {
                    v.bytes(sys::NFTA_DATA_VALUE, from);
                })
                .nest(NFTA_RANGE_TO_DATA, |v| {
                    v.bytes(sys::NFTA_DATA_VALUE, to);
                });
        })
    }

    pub fn cmp_eq(&mut self, sreg: u32, value: &[u8]) -> &mut Self {
        self.cmp(sreg, sys::NFT_CMP_EQ, value)
    }

    pub fn bitwise(&mut self, reg: u32, mask: &[u8], xor: &[u8]) -> &mut Self {
        self.push("bitwise", |d| {
            d.be32(sys::NFTA_BITWISE_SREG, reg)
                .be32(sys::NFTA_BITWISE_DREG, reg)
                .be32(sys::NFTA_BITWISE_LEN, mask.len() as u32)
                .nest(sys::NFTA_BITWISE_MASK, |v| {
                    v.bytes(sys::NFTA_DATA_VALUE, mask);
                })
                .nest(sys::NFTA_BITWISE_XOR, |v| {
                    v.bytes(sys::NFTA_DATA_VALUE, xor);
                });
        })
    }

    /// `ct [original] <key>` into `dreg`, as nft encodes it (keys of both
    /// directions, like the protocol, without a direction).
    pub fn ct_load(&mut self, key: u32, original: bool, dreg: u32) -> &mut Self {
        self.push("ct", |d| {
            d.be32(sys::NFTA_CT_DREG, dreg).be32(sys::NFTA_CT_KEY, key);
            if original {
                d.bytes(sys::NFTA_CT_DIRECTION, &[0]);
            }
        })
    }

    /// `ct state new` as nft encodes it natively: load, mask, compare ≠ 0.
    pub fn ct_state_new(&mut self) -> &mut Self {
        self.push("ct", |d| {
            d.be32(sys::NFTA_CT_DREG, REG_1)
                .be32(sys::NFTA_CT_KEY, sys::NFT_CT_STATE);
        });
        // NF_CT_STATE_BIT(IP_CT_NEW) = 1 << (2 + 1), in host byte order.
        self.bitwise(REG_1, &8u32.to_ne_bytes(), &[0; 4]);
        self.cmp(REG_1, sys::NFT_CMP_NEQ, &[0; 4])
    }

    /// Loads the address at `offset` and matches `net/len`, as nft and
    /// iptables-nft do: byte-aligned prefixes load only their bytes; others
    /// load the whole address and mask it.
    pub fn ip_prefix(&mut self, offset: u32, net: IpAddr, len: u8) -> &mut Self {
        let octets = octets(&net);
        if len % 8 == 0 {
            let n = (len / 8) as usize;
            self.payload(REG_1, BASE_NETWORK, offset, n as u32);
            self.cmp_eq(REG_1, &octets[..n])
        } else {
            let mask = prefix_mask(len, octets.len());
            self.payload(REG_1, BASE_NETWORK, offset, octets.len() as u32);
            self.bitwise(REG_1, &mask, &vec![0; octets.len()]);
            self.cmp_eq(REG_1, &octets)
        }
    }

    pub fn lookup(&mut self, set: &str, sreg: u32, dreg: Option<u32>) -> &mut Self {
        self.push("lookup", |d| {
            d.str(sys::NFTA_LOOKUP_SET, set)
                .be32(sys::NFTA_LOOKUP_SREG, sreg);
            if let Some(r) = dreg {
                d.be32(sys::NFTA_LOOKUP_DREG, r);
            }
        })
    }

    /// Host to network order of `reg` (`len` bytes of `size`-byte values):
    /// what nft puts after `meta l4proto` in a key of an interval set — a
    /// one-byte value, so it changes nothing, but a table nft writes from the
    /// same text carries it.
    pub fn byteorder_hton(&mut self, reg: u32, len: u32, size: u32) -> &mut Self {
        self.push("byteorder", |d| {
            d.be32(sys::NFTA_BYTEORDER_SREG, reg)
                .be32(sys::NFTA_BYTEORDER_DREG, reg)
                .be32(sys::NFTA_BYTEORDER_OP, sys::NFT_BYTEORDER_HTON)
                .be32(sys::NFTA_BYTEORDER_LEN, len)
                .be32(sys::NFTA_BYTEORDER_SIZE, size);
        })
    }

    /// A lookup that matches when the key is not in the set.
    pub fn lookup_not(&mut self, set: &str, sreg: u32) -> &mut Self {
        self.push("lookup", |d| {
            d.str(sys::NFTA_LOOKUP_SET, set)
                .be32(sys::NFTA_LOOKUP_SREG, sreg)
                .be32(sys::NFTA_LOOKUP_FLAGS, sys::NFT_LOOKUP_F_INV);
        })
    }

    /// Native NAT from registers (the address and, for DNAT, the port).
    pub fn nat(
        &mut self,
        family: Family,
        dnat: bool,
        addr_reg: u32,
        proto_reg: Option<u32>,
    ) -> &mut Self {
        self.push("nat", |d| {
            d.be32(
                sys::NFTA_NAT_TYPE,
                if dnat {
                    sys::NFT_NAT_DNAT
                } else {
                    sys::NFT_NAT_SNAT
                },
            )
            .be32(sys::NFTA_NAT_FAMILY, u32::from(family.nfproto()))
            .be32(sys::NFTA_NAT_REG_ADDR_MIN, addr_reg);
            if let Some(r) = proto_reg {
                d.be32(sys::NFTA_NAT_REG_PROTO_MIN, r);
            }
        })
    }

    pub fn counter(&mut self) -> &mut Self {
        self.push("counter", |d| {
            d.be64(sys::NFTA_COUNTER_BYTES, 0)
                .be64(sys::NFTA_COUNTER_PACKETS, 0);
        })
    }

    /// A verdict: NF_ACCEPT, NFT_RETURN, or a jump to `chain`.
    pub fn verdict(&mut self, code: i32, chain: Option<&str>) -> &mut Self {
        self.push("immediate", |d| {
            d.be32(sys::NFTA_IMMEDIATE_DREG, REG_VERDICT)
                .nest(sys::NFTA_IMMEDIATE_DATA, |v| {
                    v.nest(sys::NFTA_DATA_VERDICT, |c| {
                        c.be32(sys::NFTA_VERDICT_CODE, code as u32);
                        if let Some(ch) = chain {
                            c.str(sys::NFTA_VERDICT_CHAIN, ch);
                        }
                    });
                });
        })
    }

    pub fn accept(&mut self) -> &mut Self {
        self.verdict(libc::NF_ACCEPT, None)
    }

    pub fn ret(&mut self) -> &mut Self {
        self.verdict(sys::NFT_RETURN, None)
    }

    pub fn attrs(&self) -> &Attrs {
        &self.list
    }
}

/// A register as the kernel keeps it (a 32-bit slot): NFT_REG_1..4 and
/// NFT_REG32_00..15 name the same slots, and a dump names a 128-bit
/// register's first slot as NFT_REG_n whichever way it was written.
fn reg_slot(reg: u32) -> u32 {
    if reg <= sys::NFT_REG_4 {
        reg * 4
    } else {
        reg.wrapping_sub(4)
    }
}

/// Of a rule's expressions (NFTA_RULE_EXPRESSIONS, as dumped or as written),
/// what decides its verdict, per expression: its name, and for a
/// lookup the set, whether it is inverted and the register it reads, for a
/// `ct` load the key, direction and register, for an immediate the verdict
/// (code and chain). A rule whose lookup lost its `!=`, whose `drop` became
/// `accept`, or whose counting looks at the reply direction has the same
/// names but not the same facts.
pub fn expr_facts(exprs: &[u8]) -> Vec<String> {
    use super::netlink::{attr_be32, attr_str, find_attr, parse_attrs};
    parse_attrs(exprs)
        .filter_map(|(_, e)| {
            let name = attr_str(e, sys::NFTA_EXPR_NAME)?;
            let d = find_attr(e, sys::NFTA_EXPR_DATA).unwrap_or(&[]);
            Some(match name.as_str() {
                "lookup" => format!(
                    "lookup {} {} {}",
                    attr_str(d, sys::NFTA_LOOKUP_SET).unwrap_or_default(),
                    attr_be32(d, sys::NFTA_LOOKUP_FLAGS).unwrap_or(0),
                    reg_slot(attr_be32(d, sys::NFTA_LOOKUP_SREG).unwrap_or(0))
                ),
                // No direction is the original one (0).
                "ct" => format!(
                    "ct {} {} {}",
                    attr_be32(d, sys::NFTA_CT_KEY).unwrap_or(u32::MAX),
                    reg_slot(attr_be32(d, sys::NFTA_CT_DREG).unwrap_or(0)),
                    find_attr(d, sys::NFTA_CT_DIRECTION)
                        .and_then(|v| v.first().copied())
                        .unwrap_or(0)
                ),
                "immediate" => {
                    let v = find_attr(d, sys::NFTA_IMMEDIATE_DATA)
                        .and_then(|x| find_attr(x, sys::NFTA_DATA_VERDICT));
                    match v {
                        Some(v) => format!(
                            "immediate {} {}",
                            attr_be32(v, sys::NFTA_VERDICT_CODE).unwrap_or(0) as i32,
                            attr_str(v, sys::NFTA_VERDICT_CHAIN).unwrap_or_default()
                        ),
                        None => name,
                    }
                }
                _ => name,
            })
        })
        .collect()
}

#[cfg(test)]
mod facts_tests {
    use super::*;

    fn facts(e: &Exprs) -> Vec<String> {
        expr_facts(e.attrs().as_bytes())
    }

    /// The counting rule looking at the reply direction, or at another
    /// key, has the same expression names but not the same facts; the same
    /// register written either way (NFT_REG_2 or NFT_REG32_04) is one.
    #[test]
    fn ct_loads_and_lookup_registers_are_facts() {
        // `dir`: the address's direction (0 original, 1 reply).
        let rule = |dir: u8, key: u32, reg: u32| {
            let mut e = Exprs::new();
            e.raw("ct", |d| {
                d.be32(sys::NFTA_CT_DREG, REG_1)
                    .be32(sys::NFTA_CT_KEY, sys::NFT_CT_DST_IP6)
                    .bytes(sys::NFTA_CT_DIRECTION, &[dir]);
            })
            .ct_load(key, false, reg)
            .lookup("mapping_traffic", REG_1, None);
            e
        };
        let ours = facts(&rule(0, sys::NFT_CT_PROTOCOL, sys::NFT_REG32_04));
        assert_eq!(ours, facts(&rule(0, sys::NFT_CT_PROTOCOL, sys::NFT_REG_2)));
        assert_ne!(
            ours,
            facts(&rule(1, sys::NFT_CT_PROTOCOL, sys::NFT_REG32_04))
        );
        assert_ne!(
            ours,
            facts(&rule(0, sys::NFT_CT_L3PROTOCOL, sys::NFT_REG32_04))
        );
        assert_ne!(
            ours,
            facts(&rule(0, sys::NFT_CT_PROTOCOL, sys::NFT_REG32_05))
        );
        // Written without a direction, a load is of the original one.
        let mut plain = Exprs::new();
        plain.ct_load(sys::NFT_CT_DST_IP6, true, REG_1);
        let mut bare = Exprs::new();
        bare.ct_load(sys::NFT_CT_DST_IP6, false, REG_1);
        assert_eq!(facts(&plain), facts(&bare));
    }
}
