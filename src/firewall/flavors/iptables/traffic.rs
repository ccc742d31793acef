//! Per-mapping traffic in the iptables flavor (`-iptablescounters`): one
//! rule dump of `<PREFIX>_COUNT` (ip and ip6 mangle) when asked, each
//! counting rule decoded to its mapping's key and read for the packets and
//! bytes its counter holds. Read-only, on a socket of its own.

use super::place::MANGLE;
use super::rules::{decode, parse_exprs, AgentRule};
use crate::firewall::flavors::nftables::Traffic;
use crate::firewall::names::Names;
use crate::firewall::wire::netlink::{
    attr_be64, attr_str, find_attr, parse_attrs, sys, NetlinkError, NfSocket, Scope,
};
use crate::model::Families;

/// Every counted mapping's packets and bytes (both directions, since its
/// rule was made), sorted by key, a range's part under its first key;
/// `None` when no family has the counting chain.
pub fn read_traffic(
    names: &Names,
    families: Families,
) -> Result<Option<Vec<Traffic>>, NetlinkError> {
    let mut sock = NfSocket::open()?;
    let mut out: Option<Vec<Traffic>> = None;
    for family in families.iter() {
        let scope = Scope::object(family.nfproto(), MANGLE, &names.count);
        let msgs = match sock.dump_scoped(sys::NFT_MSG_GETRULE, &scope) {
            Ok(m) => m,
            // No table or chain: nothing of this family is counted.
            Err(NetlinkError::Refused {
                errno: nix::errno::Errno::ENOENT,
                ..
            }) => continue,
            Err(e) => return Err(e),
        };
        let list = out.get_or_insert_with(Vec::new);
        for msg in &msgs {
            let exprs = find_attr(msg, sys::NFTA_RULE_EXPRESSIONS).unwrap_or(&[]);
            let Some(AgentRule::Count(c)) = decode(&parse_exprs(exprs), names, family) else {
                continue;
            };
            if let Some((packets, bytes)) = rule_counter(exprs) {
                list.push(Traffic {
                    key: c.key,
                    packets,
                    bytes,
                });
            }
        }
    }
    if let Some(list) = &mut out {
        list.sort_unstable_by_key(|t| t.key);
    }
    Ok(out)
}

/// The packets and bytes of a rule's `counter` expression.
fn rule_counter(exprs: &[u8]) -> Option<(u64, u64)> {
    parse_attrs(exprs).find_map(|(_, e)| {
        if attr_str(e, sys::NFTA_EXPR_NAME).as_deref() != Some("counter") {
            return None;
        }
        let d = find_attr(e, sys::NFTA_EXPR_DATA)?;
        Some((
            attr_be64(d, sys::NFTA_COUNTER_PACKETS)?,
            attr_be64(d, sys::NFTA_COUNTER_BYTES)?,
        ))
    })
}
