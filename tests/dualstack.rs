//! Dual-stack against the real kernel, in namespaces each test creates: one
//! rule set with IPv4 and IPv6 mappings goes in as one batch in either
//! flavor; `ip6tables-nft-save` / `-C` and `nft list table ip6` are the
//! oracles of the IPv6 part; real TCP/UDP over IPv6 through DNAT and SNAT
//! while the same pod keeps answering on IPv4; cleanup removes both.

mod support;

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::{backend_with, view, ApplyReport, Backend};
use podnat_controller::model::{Families, Family, Proto, RuleSet};
use support::netns::{Netns, Sandbox};
use support::rules::{names, publish};
use support::save::{
    agent_chain_decls, agent_ip6tables_save, chain_decls, netlink_debug, write_with,
};
use support::traffic::{check_mail_traffic_of, V4, V6};

use support::netns::{
    POD_A_IP as POD_A4, POD_A_IP6 as POD_A6, PUBLIC_IP as PUBLIC4, PUBLIC_IP6 as PUBLIC6,
};

fn sandbox(tag: &str) -> Sandbox {
    Sandbox::new(tag).with_ipv6()
}

/// Pod A publishes 25/tcp → 2525 and 5353/udp → 5300 on both families.
fn dual_rules() -> RuleSet {
    let mut r = RuleSet::default();
    for (public, pod) in [(PUBLIC4, POD_A4), (PUBLIC6, POD_A6)] {
        publish(&mut r, "mail:mx-0", public, 25, Proto::Tcp, pod, 2525);
        publish(&mut r, "mail:mx-0", public, 5353, Proto::Udp, pod, 5300);
    }
    r
}

fn backend(flavor: Flavor) -> Box<dyn Backend> {
    backend_with(flavor, names(), JumpPositions::default(), Families::DUAL)
}

fn apply(ns: &Netns, flavor: Flavor, rules: &RuleSet) -> ApplyReport {
    let rules = rules.clone();
    ns.run(move || backend(flavor).apply(&rules))
        .unwrap_or_else(|e| panic!("apply in {}: {e}", ns.name))
}

/// The same pod through the NAT on both families, each with its own
/// rules in the same tables: TCP and UDP in (the client's own address, the
/// UDP reply from the public address), the pod's own connection out through
/// the public address, internal destinations (fc00::/7, 10/8) un-NATed.
fn check_v6_traffic(sb: &Sandbox) {
    check_mail_traffic_of(sb, &V6);
    check_mail_traffic_of(sb, &V4);
}

#[test]
fn iptables_flavor_dual_stack_in_one_batch_with_ip6tables_as_oracle() {
    let sb = sandbox("d6i");
    let rules = dual_rules();
    let report = apply(&sb.node, Flavor::Iptables, &rules);
    assert!(report.messages > 0);
    // ip6tables-nft-save prints the IPv6 view; iptables-nft-save the IPv4 one.
    let v6 = rules.of_family(Family::Ipv6);
    assert_eq!(
        agent_ip6tables_save(&sb.node),
        view::iptables_save(&v6, &names(), Family::Ipv6)
    );
    assert_eq!(
        support::save::agent_iptables_save(&sb.node),
        view::iptables_save(&rules.of_family(Family::Ipv4), &names(), Family::Ipv4)
    );
    // ip6tables-nft -C finds every rule of the view as its own.
    let text = view::iptables_save(&v6, &names(), Family::Ipv6);
    let mut table = "nat";
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        }
        if let Some(spec) = line.strip_prefix("-A ") {
            let out = sb
                .node
                .try_sh(&format!("ip6tables-nft -t {table} -C {spec}"));
            assert!(out.status.success(), "ip6tables-nft -C {spec}: {out:?}");
        }
    }
    // The same rules written by ip6tables-nft itself, line by line, give the
    // same expressions, -save output and base chains.
    let twin = Netns::new("d6twin");
    write_with(&twin, "ip6tables-nft", &text);
    for t in ["nat", "filter"] {
        let ours = netlink_debug(&sb.node, "ip6", t);
        assert!(ours.contains("[ match name comment rev 0 ]"), "{ours}");
        assert!(
            ours.contains("[ target name SNAT rev 1 ]") || t == "filter",
            "{ours}"
        );
        assert_eq!(ours, netlink_debug(&twin, "ip6", t), "table ip6 {t}");
    }
    assert_eq!(agent_ip6tables_save(&sb.node), agent_ip6tables_save(&twin));
    assert_eq!(
        agent_chain_decls(&sb.node, "ip6"),
        chain_decls(&twin, "ip6")
    );

    // Unchanged: nothing is sent.
    assert_eq!(apply(&sb.node, Flavor::Iptables, &rules).messages, 0);
    check_v6_traffic(&sb);

    // Cleanup removes both families' chains and jumps.
    assert!(!sb
        .node
        .run(|| backend(Flavor::Iptables).cleanup().unwrap())
        .is_empty());
    assert!(!agent_ip6tables_save(&sb.node).contains("PODNAT"));
    assert!(!support::save::agent_iptables_save(&sb.node).contains("PODNAT"));
}

#[test]
fn nftables_flavor_dual_stack_in_one_batch_with_nft_as_oracle() {
    let sb = sandbox("d6n");
    let rules = dual_rules();
    let report = apply(&sb.node, Flavor::Nftables, &rules);
    assert!(report.rebuilt && report.messages > 0);
    let v6 = rules.of_family(Family::Ipv6);
    assert_eq!(
        view::canonical_nft(&sb.node.sh("nft list table ip6 podnat")),
        view::canonical_nft(&view::nft(&v6, &names(), Family::Ipv6))
    );
    assert_eq!(
        view::canonical_nft(&sb.node.sh("nft list table ip podnat")),
        view::canonical_nft(&view::nft(
            &rules.of_family(Family::Ipv4),
            &names(),
            Family::Ipv4
        ))
    );
    assert_eq!(apply(&sb.node, Flavor::Nftables, &rules).messages, 0);
    check_v6_traffic(&sb);

    // A change of one family's element touches that family only.
    let mut moved = rules.clone();
    moved
        .dnat
        .retain(|m| !(m.key.public_ip.is_ipv6() && m.key.proto == Proto::Udp));
    let r = apply(&sb.node, Flavor::Nftables, &moved);
    // The DNAT element and its counted key.
    assert!(!r.rebuilt && r.messages == 2, "{r:?}");

    assert!(!sb
        .node
        .run(|| backend(Flavor::Nftables).cleanup().unwrap())
        .is_empty());
    let left = sb.node.sh("nft list tables");
    assert!(!left.contains("podnat"), "{left}");
}

#[test]
fn ipv4_only_creates_no_ipv6_object() {
    let ns = Netns::new("d6only4");
    let rules = dual_rules().of_family(Family::Ipv4);
    for flavor in [Flavor::Iptables, Flavor::Nftables] {
        let r = rules.clone();
        ns.run(move || {
            podnat_controller::firewall::backend_with(
                flavor,
                names(),
                JumpPositions::default(),
                Families::default(),
            )
            .apply(&r)
        })
        .unwrap();
    }
    let ip6 = ns.sh("nft list tables ip6");
    assert!(ip6.trim().is_empty(), "no ip6 table may exist: {ip6}");
}
