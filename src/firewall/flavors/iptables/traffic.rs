//! Per-mapping traffic in the iptables flavor (`-iptablescounters`): one
//! rule dump of `<PREFIX>_COUNT` (ip and ip6 mangle) when asked, each
//! counting rule read for its mapping's key (the conntrack match's original
//! destination) and the packets and bytes its counter holds. Read-only, on
//! a socket of its own.

use super::place::MANGLE;
use super::xt;
use crate::firewall::flavors::nftables::{counter_values, Traffic};
use crate::firewall::names::Names;
use crate::firewall::wire::netlink::{
    attr_str_is, find_attr, parse_attrs, sys, NetlinkError, NfSocket, Scope,
};
use crate::model::{Families, Family, NatKey, Proto};

/// Every counted mapping's packets and bytes (both directions, since its
/// rule was made), sorted by key, a range's part under its first key;
/// `None` when no family has the table (a chain missing from an existing
/// table dumps as empty).
pub fn read_traffic(
    names: &Names,
    families: Families,
) -> Result<Option<Vec<Traffic>>, NetlinkError> {
    let mut sock = NfSocket::open()?;
    let mut out: Option<Vec<Traffic>> = None;
    for family in families.iter() {
        let scope = Scope::object(family.nfproto(), MANGLE, &names.count);
        // No table: nothing of this family is counted.
        let Some(msgs) = sock.dump_scoped_if_present(sys::NFT_MSG_GETRULE, &scope)? else {
            continue;
        };
        let list = out.get_or_insert_with(Vec::new);
        for msg in &msgs {
            let exprs = find_attr(msg, sys::NFTA_RULE_EXPRESSIONS).unwrap_or(&[]);
            if let Some(t) = counted(exprs, family == Family::Ipv6) {
                list.push(t);
            }
        }
    }
    if let Some(list) = &mut out {
        list.sort_unstable_by_key(|t| t.key);
    }
    Ok(out)
}

/// A counting rule's key and counter, read straight from its expressions
/// (the conntrack match's original destination, taken only when its
/// payload is exactly the agent's; the counter's values): a scrape
/// allocates nothing per rule.
fn counted(exprs: &[u8], ipv6: bool) -> Option<Traffic> {
    let (mut dst, mut counter) = (None, None);
    for (_, e) in parse_attrs(exprs) {
        if attr_str_is(e, sys::NFTA_EXPR_NAME, "match") {
            let d = find_attr(e, sys::NFTA_EXPR_DATA).unwrap_or(&[]);
            if attr_str_is(d, xt::NFTA_XT_NAME, "conntrack") {
                dst = find_attr(d, xt::NFTA_XT_INFO)
                    .and_then(|info| xt::parse_conntrack_orig_dst(info, ipv6));
            }
        } else if let Some(c) = counter_values(e) {
            counter = Some(c);
        }
    }
    let ((public_ip, proto, port, _), (packets, bytes)) = (dst?, counter?);
    Some(Traffic {
        key: NatKey {
            public_ip,
            public_port: port,
            proto: Proto::from_number(proto)?,
        },
        packets,
        bytes,
    })
}
