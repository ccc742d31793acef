//! Living beside other firewalls: finds foreign base chains at the forward
//! hook whose policy is drop. In nf_tables every base chain at a hook sees
//! the packet and an accept ends only its own chain, so such a chain (Docker's
//! `iptables -P FORWARD DROP`, a host firewall) drops what the agent accepts
//! elsewhere. The agent reports them by name and never touches them.

use super::monitor::{forwarding_family, Blocker};
use crate::firewall::wire::netlink::{
    attr_be32, attr_str, find_attr, sys, Attrs, NetlinkError, NfSocket,
};

/// The base chain where the agent's own forward accept lives, which is not
/// a blocker whatever its policy (the iptables flavor's accept sits in
/// iptables-nft's FORWARD, ahead of its policy).
#[derive(Clone, Copy, Debug)]
pub struct OwnForward<'a> {
    pub family: u8,
    pub table: &'a str,
    pub chain: &'a str,
}

/// Every foreign base chain at the forward hook with policy drop, in the
/// families that see the agent's traffic; sorted.
pub fn forward_blockers(
    sock: &mut NfSocket,
    own: &[OwnForward<'_>],
) -> Result<Vec<Blocker>, NetlinkError> {
    let chains = sock.dump_families(sys::NFT_MSG_GETCHAIN, libc::AF_UNSPEC as u8, &Attrs::new())?;
    let served = || own.iter().map(|o| o.family);
    let mut out: Vec<Blocker> = chains
        .iter()
        .filter(|(family, _)| forwarding_family(*family, served()))
        .filter_map(|(family, c)| blocker(*family, c))
        .filter(|b| {
            !own.iter()
                .any(|o| b.family == o.family && b.table == o.table && b.chain == o.chain)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// What to tell the user about `b`, for the flavor named `flavor`.
pub fn advice(flavor: &str, b: &Blocker) -> String {
    let fix = if flavor == "nftables" {
        "accept the published ports there (for Docker: in DOCKER-USER), or run the agent with -firewallflavor=iptables, whose accept lives in iptables-nft's FORWARD"
    } else {
        "accept the published ports there, or change its policy"
    };
    format!(
        "{b} drops forwarded packets by policy, so published ports time out although the agent accepts them (an accept in one base chain does not stop a drop in another); {fix}. The agent never changes that chain"
    )
}

fn blocker(family: u8, chain: &[u8]) -> Option<Blocker> {
    let hook = find_attr(chain, sys::NFTA_CHAIN_HOOK)?;
    if attr_be32(hook, sys::NFTA_HOOK_HOOKNUM)? != libc::NF_INET_FORWARD as u32 {
        return None;
    }
    if attr_be32(chain, sys::NFTA_CHAIN_POLICY)? != libc::NF_DROP as u32 {
        return None;
    }
    Some(Blocker {
        family,
        table: attr_str(chain, sys::NFTA_CHAIN_TABLE)?,
        chain: attr_str(chain, sys::NFTA_CHAIN_NAME)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(table: &str, name: &str, hook: u32, policy: u32) -> Vec<u8> {
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, table)
            .str(sys::NFTA_CHAIN_NAME, name)
            .nest(sys::NFTA_CHAIN_HOOK, |h| {
                h.be32(sys::NFTA_HOOK_HOOKNUM, hook)
                    .be32(sys::NFTA_HOOK_PRIORITY, 0);
            })
            .be32(sys::NFTA_CHAIN_POLICY, policy);
        a.into_bytes()
    }

    #[test]
    fn only_dropping_forward_base_chains_of_ip_and_inet_block() {
        let fwd = libc::NF_INET_FORWARD as u32;
        let drop = libc::NF_DROP as u32;
        let ip = libc::NFPROTO_IPV4 as u8;
        assert_eq!(
            blocker(ip, &chain("filter", "FORWARD", fwd, drop)),
            Some(Blocker {
                family: ip,
                table: "filter".into(),
                chain: "FORWARD".into()
            })
        );
        let inet = libc::NFPROTO_INET as u8;
        assert!(blocker(inet, &chain("firewalld", "filter_FORWARD", fwd, drop)).is_some());
        assert!(blocker(ip, &chain("filter", "FORWARD", fwd, libc::NF_ACCEPT as u32)).is_none());
        assert!(blocker(
            ip,
            &chain("filter", "INPUT", libc::NF_INET_LOCAL_IN as u32, drop)
        )
        .is_none());
        // ip6 counts only while the agent serves IPv6.
        let ip6 = libc::NFPROTO_IPV6 as u8;
        assert!(!forwarding_family(ip6, [ip].into_iter()));
        assert!(forwarding_family(ip6, [ip, ip6].into_iter()));
        assert!(forwarding_family(inet, [ip6].into_iter()));
        // A regular chain has no hook.
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, "filter")
            .str(sys::NFTA_CHAIN_NAME, "DOCKER");
        assert!(blocker(ip, a.as_bytes()).is_none());
    }
}
