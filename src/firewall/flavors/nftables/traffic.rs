//! Per-mapping traffic, read when asked (a scrape, `/entries/list`): one
//! element dump of `mapping_traffic` per family, each element's key and the
//! counter the kernel keeps on it. Read-only, on a socket of its own (the
//! firewall thread's is busy with changes).

use super::elements::nat_key_at;
use crate::firewall::names::{self, Names};
use crate::firewall::wire::netlink::{
    attr_be64, attr_str_is, find_attr, parse_attrs, sys, NetlinkError, NfSocket, Scope,
};
use crate::model::{Families, NatKey};

/// Packets and bytes of the connections through one published key, both
/// directions, as the forward hook saw them since the key's element was
/// made (it is made anew when the key changes hands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traffic {
    pub key: NatKey,
    pub packets: u64,
    pub bytes: u64,
}

/// Dumps of the set read before settling for one that came short.
const MAX_DUMPS: usize = 3;

/// The counters of every published key in `families`, sorted by key;
/// `None` when no table of the agent's counts traffic (none yet, or the
/// layout of a kernel before 5.7). `expected`: how many keys the applied
/// table publishes. An element dump is no snapshot: a rehash of the set
/// between its parts can skip elements (see `read_state`), so a dump that
/// came short of `expected` is read again, up to `MAX_DUMPS` times.
pub fn read_traffic(
    names: &Names,
    families: Families,
    expected: usize,
) -> Result<Option<Vec<Traffic>>, NetlinkError> {
    let mut sock = NfSocket::open()?;
    let mut out = dump_once(&mut sock, names, families)?;
    for _ in 1..MAX_DUMPS {
        match &out {
            Some(list) if list.len() < expected => out = dump_once(&mut sock, names, families)?,
            _ => break,
        }
    }
    Ok(out)
}

fn dump_once(
    sock: &mut NfSocket,
    names: &Names,
    families: Families,
) -> Result<Option<Vec<Traffic>>, NetlinkError> {
    let mut out: Option<Vec<Traffic>> = None;
    for family in families.iter() {
        let scope = Scope::object(family.nfproto(), names.table(), names::NFT_TRAFFIC_SET);
        // No such table or set: nothing of this family is counted.
        let Some(msgs) = sock.dump_scoped_if_present(sys::NFT_MSG_GETSETELEM, &scope)? else {
            continue;
        };
        let list = out.get_or_insert_with(Vec::new);
        for msg in &msgs {
            let Some(elements) = find_attr(msg, sys::NFTA_SET_ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for (_, el) in parse_attrs(elements) {
                let key = find_attr(el, sys::NFTA_SET_ELEM_KEY)
                    .and_then(|k| find_attr(k, sys::NFTA_DATA_VALUE))
                    .and_then(|k| nat_key_at(family, k));
                if let (Some(key), Some((packets, bytes))) = (key, element_counter(el)) {
                    list.push(Traffic {
                        key,
                        packets,
                        bytes,
                    });
                }
            }
        }
    }
    if let Some(list) = &mut out {
        // An element dump is no snapshot (a rehash between its parts can
        // repeat an element): one row per key.
        list.sort_unstable_by_key(|t| t.key);
        list.dedup_by_key(|t| t.key);
    }
    Ok(out)
}

/// An element's counter: NFTA_SET_ELEM_EXPR when it has one expression,
/// NFTA_SET_ELEM_EXPRESSIONS when several.
fn element_counter(el: &[u8]) -> Option<(u64, u64)> {
    if let Some(e) = find_attr(el, sys::NFTA_SET_ELEM_EXPR) {
        return counter_values(e);
    }
    let list = find_attr(el, sys::NFTA_SET_ELEM_EXPRESSIONS)?;
    parse_attrs(list).find_map(|(_, e)| counter_values(e))
}

/// The packets and bytes of a `counter` expression (`None` for another
/// expression): an element's, or a rule's (the iptables flavor's counting
/// rules).
pub(crate) fn counter_values(expr: &[u8]) -> Option<(u64, u64)> {
    if !attr_str_is(expr, sys::NFTA_EXPR_NAME, "counter") {
        return None;
    }
    let d = find_attr(expr, sys::NFTA_EXPR_DATA)?;
    Some((
        attr_be64(d, sys::NFTA_COUNTER_PACKETS)?,
        attr_be64(d, sys::NFTA_COUNTER_BYTES)?,
    ))
}
