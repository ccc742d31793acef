//! The nftables flavor's fixed layout: the sets' and maps' key types and
//! the base chains with their rules, as nft would create them.

use super::*;

// nft datatype ids (nftables' enum datatypes) and the concatenation encoding
// (each field shifts the type by 6 bits), as nft writes NFTA_SET_KEY_TYPE.
pub(super) const TYPE_IPADDR: u32 = 7;
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
}

pub(super) const SETS: [SetShape; 3] = [
    SetShape {
        name: names::NFT_DNAT_MAP,
        key_type: concat(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        key_len: 12,
        data: Some((concat(&[TYPE_IPADDR, TYPE_INET_SERVICE]), 8)),
    },
    SetShape {
        name: names::NFT_SNAT_MAP,
        key_type: concat(&[TYPE_IPADDR, TYPE_INET_PROTOCOL]),
        key_len: 8,
        data: Some((TYPE_IPADDR, 4)),
    },
    SetShape {
        name: names::NFT_FORWARD_SET,
        key_type: concat(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        key_len: 12,
        data: None,
    },
];

pub(super) struct ChainShape {
    pub(super) name: &'static str,
    pub(super) hook: HookClass,
    pub(super) priority: i32,
    pub(super) nat: bool,
}

pub(super) const CHAINS: [ChainShape; 3] = [
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
];

/// The fixed rules of each chain, in order.
pub(super) fn chain_rules(chain: &str) -> Vec<Exprs> {
    match chain {
        names::NFT_PRE_CHAIN => {
            let mut e = Exprs::new();
            e.payload(REG_1, BASE_NETWORK, IP_DADDR, 4)
                .meta_l4proto(REG32_01)
                .payload(REG32_02, BASE_TRANSPORT, TH_DPORT, 2)
                .lookup(names::NFT_DNAT_MAP, REG_1, Some(REG_1))
                .nat(true, REG_1, Some(REG32_01));
            vec![e]
        }
        names::NFT_POST_CHAIN => {
            let mut rules: Vec<Exprs> = INTERNAL_NETWORKS
                .iter()
                .map(|(net, len)| {
                    let mut e = Exprs::new();
                    e.ip_prefix(IP_DADDR, *net, *len).ret();
                    e
                })
                .collect();
            let mut e = Exprs::new();
            e.payload(REG_1, BASE_NETWORK, IP_SADDR, 4)
                .meta_l4proto(REG32_01)
                .lookup(names::NFT_SNAT_MAP, REG_1, Some(REG_1))
                .nat(false, REG_1, None);
            rules.push(e);
            rules
        }
        _ => {
            let mut e = Exprs::new();
            e.ct_state_new()
                .payload(REG_1, BASE_NETWORK, IP_DADDR, 4)
                .meta_l4proto(REG32_01)
                .payload(REG32_02, BASE_TRANSPORT, TH_DPORT, 2)
                .lookup(names::NFT_FORWARD_SET, REG_1, None)
                .accept();
            vec![e]
        }
    }
}
