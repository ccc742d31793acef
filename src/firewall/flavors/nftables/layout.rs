//! The nftables flavor's fixed layout: the sets' and maps' key types and
//! the base chains with their rules, as nft would create them.

use super::*;
pub use crate::firewall::Features;

// nft datatype ids (nftables' enum datatypes) and the concatenation encoding
// (each field shifts the type by 6 bits), as nft writes NFTA_SET_KEY_TYPE.
pub(super) const TYPE_IPADDR: u32 = 7;
pub(super) const TYPE_IP6ADDR: u32 = 8;
pub(super) const TYPE_INET_PROTOCOL: u32 = 12;
pub(super) const TYPE_INET_SERVICE: u32 = 13;
pub(super) const fn concat(types: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < types.len() {
        v = (v << 6) | types[i];
        i += 1;
    }
    v
}

/// Shape of one of the agent's sets: what the kernel must report back.
pub(super) struct SetShape {
    pub(super) name: &'static str,
    pub(super) key_type: u32,
    pub(super) key_len: u32,
    pub(super) data: Option<(u32, u32)>,
    /// An interval set of a concatenation (pipapo, Linux 5.6): the length of
    /// each field, as nft describes it (NFTA_SET_DESC_CONCAT).
    pub(super) intervals: Option<&'static [u32]>,
    /// A counter on every element (NFTA_SET_EXPR: `counter;` in nft).
    pub(super) counter: bool,
}

impl SetShape {
    /// NFTA_SET_FLAGS as nft sets them for this shape.
    pub(super) fn flags(&self) -> u32 {
        let map = if self.data.is_some() {
            sys::NFT_SET_MAP
        } else {
            0
        };
        let intervals = if self.intervals.is_some() {
            sys::NFT_SET_INTERVAL | sys::NFT_SET_CONCAT
        } else {
            0
        };
        map | intervals
    }
}

/// Whether the object `name` is in a layout with `features`.
fn in_layout(name: &str, features: Features) -> bool {
    let source = [
        names::NFT_RESTRICTED_SET,
        names::NFT_SOURCES_SET,
        names::NFT_SOURCE_PRE_CHAIN,
        names::NFT_SOURCE_OUT_CHAIN,
    ]
    .contains(&name);
    let traffic = [
        names::NFT_TRAFFIC_SET,
        names::NFT_TRAFFIC_CHAIN,
        names::NFT_TRAFFIC_OUT_CHAIN,
        names::NFT_TRAFFIC_IN_CHAIN,
    ]
    .contains(&name);
    (features.sources || !source) && (features.traffic || !traffic)
}

/// The sets of a family's table: the same three (four with
/// `-localaccess`), keyed by that family's addresses (4 or 16 bytes; the
/// other fields padded to 4).
/// `features`: with the source allow-lists' and the counters' sets.
pub(super) fn sets_of(f: Family, local: bool, features: Features) -> Vec<SetShape> {
    let (addr, len) = match f {
        Family::Ipv4 => (TYPE_IPADDR, 4),
        Family::Ipv6 => (TYPE_IP6ADDR, 16),
    };
    let mut sets = vec![
        SetShape {
            name: names::NFT_DNAT_MAP,
            key_type: concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            key_len: len + 8,
            data: Some((concat(&[addr, TYPE_INET_SERVICE]), len + 4)),
            intervals: None,
            counter: false,
        },
        SetShape {
            name: names::NFT_SNAT_MAP,
            key_type: concat(&[addr, TYPE_INET_PROTOCOL]),
            key_len: len + 4,
            data: Some((addr, len)),
            intervals: None,
            counter: false,
        },
        SetShape {
            name: names::NFT_FORWARD_SET,
            key_type: concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            key_len: len + 8,
            data: None,
            intervals: None,
            counter: false,
        },
    ];
    if local {
        sets.push(SetShape {
            name: names::NFT_LOCAL_SET,
            key_type: addr,
            key_len: len,
            data: None,
            intervals: None,
            counter: false,
        });
    }
    if features.traffic {
        sets.push(SetShape {
            name: names::NFT_TRAFFIC_SET,
            key_type: concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            key_len: len + 8,
            data: None,
            intervals: None,
            counter: true,
        });
    }
    if !features.sources {
        return sets;
    }
    sets.push(SetShape {
        name: names::NFT_RESTRICTED_SET,
        key_type: concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        key_len: len + 8,
        data: None,
        intervals: None,
        counter: false,
    });
    sets.push(SetShape {
        name: names::NFT_SOURCES_SET,
        key_type: concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, addr]),
        key_len: len + 8 + len,
        data: None,
        intervals: Some(match f {
            Family::Ipv4 => &[4, 1, 2, 4],
            Family::Ipv6 => &[16, 1, 2, 16],
        }),
        counter: false,
    });
    sets
}

#[derive(Clone, Copy)]
pub(super) struct ChainShape {
    pub(super) name: &'static str,
    pub(super) hook: HookClass,
    pub(super) priority: i32,
    pub(super) nat: bool,
}

/// The base chains (the nat output one and the source filter's output one
/// too with `-localaccess`), with the allow-lists' and the counters' as
/// `features` says.
pub(super) fn chains_of(local: bool, features: Features) -> Vec<ChainShape> {
    let all: &[ChainShape] = if local { &CHAINS_LOCAL } else { &CHAINS };
    all.iter()
        .filter(|c| in_layout(c.name, features))
        .copied()
        .collect()
}

/// A base chain of type filter.
const fn filter(name: &'static str, hook: HookClass, priority: i32) -> ChainShape {
    ChainShape {
        name,
        hook,
        priority,
        nat: false,
    }
}

const TRAFFIC: ChainShape = filter(
    names::NFT_TRAFFIC_CHAIN,
    HookClass::Forward,
    names::NFT_TRAFFIC_PRIORITY,
);

/// The node's own connections to a published address (local access): its
/// packets out, and the replies in.
const TRAFFIC_OUT: ChainShape = filter(
    names::NFT_TRAFFIC_OUT_CHAIN,
    HookClass::Out,
    names::NFT_TRAFFIC_PRIORITY,
);

const TRAFFIC_IN: ChainShape = filter(
    names::NFT_TRAFFIC_IN_CHAIN,
    HookClass::In,
    names::NFT_TRAFFIC_PRIORITY,
);

const SOURCE_PRE: ChainShape = filter(
    names::NFT_SOURCE_PRE_CHAIN,
    HookClass::PreRouting,
    names::NFT_SOURCE_PRIORITY,
);

const SOURCE_OUT: ChainShape = filter(
    names::NFT_SOURCE_OUT_CHAIN,
    HookClass::Out,
    names::NFT_SOURCE_PRIORITY,
);

const CHAINS: [ChainShape; 5] = [
    NAT_CHAINS[0],
    NAT_CHAINS[1],
    NAT_CHAINS[2],
    SOURCE_PRE,
    TRAFFIC,
];

const CHAINS_LOCAL: [ChainShape; 9] = [
    NAT_CHAINS[0],
    NAT_CHAINS[1],
    NAT_CHAINS[2],
    NAT_CHAINS[3],
    SOURCE_PRE,
    SOURCE_OUT,
    TRAFFIC,
    TRAFFIC_OUT,
    TRAFFIC_IN,
];

const NAT_CHAINS: [ChainShape; 4] = [
    ChainShape {
        name: names::NFT_PRE_CHAIN,
        hook: HookClass::PreRouting,
        priority: names::NFT_PRE_PRIORITY,
        nat: true,
    },
    ChainShape {
        name: names::NFT_POST_CHAIN,
        hook: HookClass::PostRouting,
        priority: names::NFT_POST_PRIORITY,
        nat: true,
    },
    ChainShape {
        name: names::NFT_FORWARD_CHAIN,
        hook: HookClass::Forward,
        priority: names::NFT_FORWARD_PRIORITY,
        nat: false,
    },
    ChainShape {
        name: names::NFT_OUTPUT_CHAIN,
        hook: HookClass::Out,
        priority: names::NFT_OUTPUT_PRIORITY,
        nat: true,
    },
];

/// The fixed rules of each chain, in order. A concatenation's address goes
/// to register 1 (4 or 16 bytes), the next fields to the 32-bit registers
/// after it, as nft allocates them.
pub(super) fn chain_rules(chain: &str, f: Family, local: bool) -> Vec<Exprs> {
    let h = encode::header(f);
    let (next, after) = match f {
        Family::Ipv4 => (REG32_01, REG32_02),
        Family::Ipv6 => (sys::NFT_REG32_04, sys::NFT_REG32_05),
    };
    let dnat = || {
        let mut e = Exprs::new();
        e.payload(REG_1, BASE_NETWORK, h.daddr, h.addr_len)
            .meta_l4proto(next)
            .payload(after, BASE_TRANSPORT, TH_DPORT, 2)
            .lookup(names::NFT_DNAT_MAP, REG_1, Some(REG_1))
            .nat(f, true, REG_1, Some(next));
        e
    };
    match chain {
        names::NFT_TRAFFIC_CHAIN | names::NFT_TRAFFIC_OUT_CHAIN | names::NFT_TRAFFIC_IN_CHAIN => {
            // Every packet of a connection whose original destination is a
            // published key, both directions: its element's counter counts
            // it (no verdict). One rule per protocol: the `meta l4proto`
            // match is what lets nft read `ct original proto-dst` back as a
            // port (without it `nft -f` refuses the listing).
            let dst = match f {
                Family::Ipv4 => sys::NFT_CT_DST_IP,
                Family::Ipv6 => sys::NFT_CT_DST_IP6,
            };
            [Proto::Tcp, Proto::Udp]
                .into_iter()
                .map(|p| {
                    let mut e = Exprs::new();
                    e.meta_l4proto(REG_1)
                        .cmp_eq(REG_1, &[p.number()])
                        .ct_load(dst, true, REG_1)
                        .ct_load(sys::NFT_CT_PROTOCOL, false, next)
                        .ct_load(sys::NFT_CT_PROTO_DST, true, after)
                        .lookup(names::NFT_TRAFFIC_SET, REG_1, None);
                    e
                })
                .collect()
        }
        names::NFT_SOURCE_PRE_CHAIN | names::NFT_SOURCE_OUT_CHAIN => {
            // A restricted key from a source outside its ranges: dropped,
            // every packet (an established connection from a range that was
            // removed stops too).
            let saddr_reg = match f {
                Family::Ipv4 => sys::NFT_REG32_03,
                Family::Ipv6 => sys::NFT_REG32_06,
            };
            let mut e = Exprs::new();
            e.payload(REG_1, BASE_NETWORK, h.daddr, h.addr_len)
                .meta_l4proto(next)
                .payload(after, BASE_TRANSPORT, TH_DPORT, 2)
                .lookup(names::NFT_RESTRICTED_SET, REG_1, None)
                .payload(REG_1, BASE_NETWORK, h.daddr, h.addr_len)
                .meta_l4proto(next)
                .byteorder_hton(next, 1, 2)
                .payload(after, BASE_TRANSPORT, TH_DPORT, 2)
                .payload(saddr_reg, BASE_NETWORK, h.saddr, h.addr_len)
                .lookup_not(names::NFT_SOURCES_SET, REG_1)
                .verdict(libc::NF_DROP, None);
            vec![e]
        }
        names::NFT_PRE_CHAIN if local => {
            // A pod of this node to a published address:port: marked for
            // the hairpin masquerade in postrouting (before the DNAT changes
            // the destination). The map is looked up as a set (no data): a
            // NodePort or another agent's DNAT to the node is not marked.
            let mut mark = Exprs::new();
            mark.payload(REG_1, BASE_NETWORK, h.saddr, h.addr_len)
                .lookup(names::NFT_LOCAL_SET, REG_1, None)
                .payload(REG_1, BASE_NETWORK, h.daddr, h.addr_len)
                .meta_l4proto(next)
                .payload(after, BASE_TRANSPORT, TH_DPORT, 2)
                .lookup(names::NFT_DNAT_MAP, REG_1, None)
                .mark_or(names::HAIRPIN_MARK);
            vec![mark, dnat()]
        }
        names::NFT_PRE_CHAIN => vec![dnat()],
        names::NFT_OUTPUT_CHAIN => {
            // The node's own connections to its own addresses only.
            let mut e = Exprs::new();
            e.fib_daddr_type(u32::from(libc::RTN_LOCAL));
            e.append(dnat());
            vec![e]
        }
        names::NFT_POST_CHAIN => {
            let mut rules: Vec<Exprs> = Vec::new();
            if local {
                let mut masq = Exprs::new();
                masq.mark_has(names::HAIRPIN_MARK).masquerade();
                rules.push(masq);
            }
            rules.extend(internal_networks(f).into_iter().map(|(net, len)| {
                let mut e = Exprs::new();
                e.ip_prefix(h.daddr, net, len).ret();
                e
            }));
            let mut e = Exprs::new();
            e.payload(REG_1, BASE_NETWORK, h.saddr, h.addr_len)
                .meta_l4proto(next)
                .lookup(names::NFT_SNAT_MAP, REG_1, Some(REG_1))
                .nat(f, false, REG_1, None);
            rules.push(e);
            rules
        }
        _ => {
            let mut e = Exprs::new();
            e.ct_state_new()
                .payload(REG_1, BASE_NETWORK, h.daddr, h.addr_len)
                .meta_l4proto(next)
                .payload(after, BASE_TRANSPORT, TH_DPORT, 2)
                .lookup(names::NFT_FORWARD_SET, REG_1, None)
                .accept();
            vec![e]
        }
    }
}

/// The sets, chains and rules of a table, as dumped.
pub(super) struct TableDump {
    pub(super) sets: Vec<Vec<u8>>,
    pub(super) chains: Vec<Vec<u8>>,
    pub(super) rules: Vec<Vec<u8>>,
}

impl TableDump {
    /// Whether the table holds exactly the agent's sets, base chains and
    /// rules for `family` (with `local`: the output chain and local set).
    /// `features`: with which of the allow-lists' and the counters' sets
    /// and chains (an earlier version's layout, or an older kernel's).
    pub(super) fn is_layout(&self, family: Family, local: bool, features: Features) -> bool {
        let shapes = sets_of(family, local, features);
        let chain_shapes = &chains_of(local, features)[..];
        let mut ok = self.sets.len() == shapes.len();
        for shape in &shapes {
            let found = self
                .sets
                .iter()
                .find(|s| attr_str(s, sys::NFTA_SET_NAME).as_deref() == Some(shape.name));
            ok &= found.is_some_and(|s| {
                let flags = attr_be32(s, sys::NFTA_SET_FLAGS).unwrap_or(0);
                let kinds = sys::NFT_SET_MAP | sys::NFT_SET_INTERVAL | sys::NFT_SET_CONCAT;
                attr_be32(s, sys::NFTA_SET_KEY_TYPE) == Some(shape.key_type)
                    && attr_be32(s, sys::NFTA_SET_KEY_LEN) == Some(shape.key_len)
                    && flags & kinds == shape.flags()
                    && set_counter(s) == shape.counter
                    && shape.data.is_none_or(|(t, l)| {
                        attr_be32(s, sys::NFTA_SET_DATA_TYPE) == Some(t)
                            && attr_be32(s, sys::NFTA_SET_DATA_LEN) == Some(l)
                    })
            });
        }
        ok &= self.chains.len() == chain_shapes.len();
        for shape in chain_shapes {
            let found = self
                .chains
                .iter()
                .find(|c| attr_str(c, sys::NFTA_CHAIN_NAME).as_deref() == Some(shape.name));
            ok &= found.is_some_and(|c| {
                let hook = find_attr(c, sys::NFTA_CHAIN_HOOK).unwrap_or(&[]);
                attr_be32(hook, sys::NFTA_HOOK_HOOKNUM) == Some(shape.hook as u32)
                    && attr_be32(hook, sys::NFTA_HOOK_PRIORITY) == Some(shape.priority as u32)
                    && attr_str(c, sys::NFTA_CHAIN_TYPE).as_deref()
                        == Some(if shape.nat { "nat" } else { "filter" })
                    && attr_be32(c, sys::NFTA_CHAIN_POLICY) == Some(libc::NF_ACCEPT as u32)
            });
        }
        for shape in chain_shapes {
            let want: Vec<Vec<String>> = chain_rules(shape.name, family, local)
                .iter()
                .map(|e| encode::expr_facts(e.attrs().as_bytes()))
                .collect();
            let got: Vec<Vec<String>> = self
                .rules
                .iter()
                .filter(|r| attr_str(r, sys::NFTA_RULE_CHAIN).as_deref() == Some(shape.name))
                .map(|r| {
                    encode::expr_facts(find_attr(r, sys::NFTA_RULE_EXPRESSIONS).unwrap_or(&[]))
                })
                .collect();
            ok &= want == got;
        }
        ok && self.rules.len()
            == chain_shapes
                .iter()
                .map(|c| chain_rules(c.name, family, local).len())
                .sum::<usize>()
    }
}

/// Whether a dumped set carries a counter for each element (NFTA_SET_EXPR).
fn set_counter(set: &[u8]) -> bool {
    find_attr(set, sys::NFTA_SET_EXPR)
        .and_then(|e| attr_str(e, sys::NFTA_EXPR_NAME))
        .as_deref()
        == Some("counter")
}
