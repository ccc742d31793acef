use super::*;
use crate::firewall::wire::netlink::Attrs;

fn iptables_interest() -> Interest {
    Interest {
        tables: vec![TableInterest {
            family: libc::NFPROTO_IPV4 as u8,
            table: "nat".into(),
            whole: false,
            chains: vec!["PODNAT_PRE".into()],
            parents: vec!["PREROUTING".into()],
        }],
    }
}

fn rule(table: &str, chain: &str) -> Vec<u8> {
    let mut a = Attrs::new();
    a.str(sys::NFTA_RULE_TABLE, table)
        .str(sys::NFTA_RULE_CHAIN, chain);
    a.into_bytes()
}

fn chain(table: &str, name: &str, hook: Option<u32>) -> Vec<u8> {
    chain_with_policy(table, name, hook, libc::NF_ACCEPT as u32)
}

fn chain_with_policy(table: &str, name: &str, hook: Option<u32>, policy: u32) -> Vec<u8> {
    let mut a = Attrs::new();
    a.str(sys::NFTA_CHAIN_TABLE, table)
        .str(sys::NFTA_CHAIN_NAME, name);
    if let Some(h) = hook {
        a.nest(sys::NFTA_CHAIN_HOOK, |n| {
            n.be32(sys::NFTA_HOOK_HOOKNUM, h)
                .be32(sys::NFTA_HOOK_PRIORITY, 0);
        });
        a.be32(sys::NFTA_CHAIN_POLICY, policy);
    }
    a.into_bytes()
}

const IP: u8 = libc::NFPROTO_IPV4 as u8;
const IP6: u8 = libc::NFPROTO_IPV6 as u8;

#[test]
fn only_our_chains_and_the_rules_of_our_parents_concern_us() {
    let i = iptables_interest();
    let c = |t: u32, fam: u8, a: &[u8]| i.classify(t as u16, fam, a, &[]).ours;
    assert!(c(sys::NFT_MSG_NEWRULE, IP, &rule("nat", "PODNAT_PRE")));
    assert!(c(sys::NFT_MSG_DELRULE, IP, &rule("nat", "PREROUTING")));
    assert!(!c(sys::NFT_MSG_NEWRULE, IP, &rule("nat", "KUBE-SERVICES")));
    assert!(!c(sys::NFT_MSG_NEWRULE, IP6, &rule("nat", "PODNAT_PRE")));
    assert!(!c(
        sys::NFT_MSG_NEWRULE,
        IP,
        &rule("PODNAT_PRE", "PODNAT_PRE")
    ));
    // A parent's update (policy) moves no jump; its deletion does.
    assert!(!c(
        sys::NFT_MSG_NEWCHAIN,
        IP,
        &chain("nat", "PREROUTING", Some(0))
    ));
    assert!(c(
        sys::NFT_MSG_DELCHAIN,
        IP,
        &chain("nat", "PREROUTING", None)
    ));
    assert!(c(
        sys::NFT_MSG_NEWCHAIN,
        IP,
        &chain("nat", "PODNAT_PRE", None)
    ));
    let mut t = Attrs::new();
    t.str(sys::NFTA_TABLE_NAME, "nat");
    assert!(c(sys::NFT_MSG_DELTABLE, IP, t.as_bytes()));
    let mut t = Attrs::new();
    t.str(sys::NFTA_TABLE_NAME, "kube-proxy");
    assert!(!c(sys::NFT_MSG_DELTABLE, IP, t.as_bytes()));
}

#[test]
fn a_whole_table_interest_takes_every_object_of_it() {
    let i = Interest {
        tables: vec![TableInterest {
            family: IP,
            table: "podnat".into(),
            whole: true,
            chains: vec![],
            parents: vec![],
        }],
    };
    let mut e = Attrs::new();
    e.str(sys::NFTA_SET_ELEM_LIST_TABLE, "podnat")
        .str(sys::NFTA_SET_ELEM_LIST_SET, "dnat_to_pod");
    assert!(
        i.classify(sys::NFT_MSG_DELSETELEM as u16, IP, e.as_bytes(), &[])
            .ours
    );
    let mut e = Attrs::new();
    e.str(sys::NFTA_SET_ELEM_LIST_TABLE, "kube-proxy")
        .str(sys::NFTA_SET_ELEM_LIST_SET, "service-ips");
    assert_eq!(
        i.classify(sys::NFT_MSG_NEWSETELEM as u16, IP, e.as_bytes(), &[]),
        Reasons::default()
    );
}

#[test]
fn forward_hook_chains_and_known_blockers_ask_for_a_recheck() {
    let i = iptables_interest();
    let at = Some(libc::NF_INET_FORWARD as u32);
    let drop = chain_with_policy("filter", "FORWARD", at, libc::NF_DROP as u32);
    let new = |a: &[u8], b: &[Blocker]| {
        i.classify(sys::NFT_MSG_NEWCHAIN as u16, IP, a, b)
            .forward_hook
    };
    assert!(new(&drop, &[]), "a new drop policy");
    // kube-proxy's forward chain (accept), re-added on every sync.
    let accept = chain("kube-proxy", "filter-forward", at);
    assert!(!new(&accept, &[]));
    assert!(!new(&chain("filter", "FORWARD", at), &[]));
    let pre = chain("fw", "pre", Some(0));
    assert!(
        !i.classify(sys::NFT_MSG_NEWCHAIN as u16, IP, &pre, &[])
            .forward_hook
    );
    // A deleted chain's notification carries no hook: known blockers
    // are recognized by name.
    let b = [Blocker {
        family: IP,
        table: "filter".into(),
        chain: "FORWARD".into(),
    }];
    assert!(!new(&drop, &b), "still the same blocker");
    assert!(
        new(&chain("filter", "FORWARD", at), &b),
        "policy back to accept"
    );
    let del = chain("filter", "FORWARD", None);
    assert!(
        i.classify(sys::NFT_MSG_DELCHAIN as u16, IP, &del, &b)
            .forward_hook
    );
    assert!(
        !i.classify(sys::NFT_MSG_DELCHAIN as u16, IP, &del, &[])
            .forward_hook
    );
    assert_eq!(b[0].to_string(), "table ip filter chain FORWARD");
}

#[test]
fn generations_skip_zero() {
    assert_eq!(next_generation(7), 8);
    assert_eq!(next_generation(u32::MAX), 1);
}
