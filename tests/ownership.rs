//! Leaving the node as found (issue 24): what the agent makes carries its
//! mark, a bare `podnat-controller cleanup` (no flags) removes exactly that
//! in both flavors and families — base chains and tables it made included —
//! and `nft -a list ruleset` is then what it was before the agent ever ran,
//! handles included; objects with the agent's names but not its mark stay
//! and are refused; an earlier version's unmarked objects are adopted.

mod support;

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::{backend_with_options, view, Backend, FirewallError, Names};
use podnat_controller::model::{Families, Family, LocalPod, PodRef, Proto, RuleSet};
use support::agent_view::agent_cli;
use support::crowd::{crowd, crowd_dual, ruleset, without_counters};
use support::netns::{Netns, POD_A_IP};
use support::rules::{mail, publish};
use support::save::MARK;

const FLAVORS: [Flavor; 2] = [Flavor::Iptables, Flavor::Nftables];

fn backend(flavor: Flavor, families: Families) -> Box<dyn Backend> {
    let names = Names::new("podnat");
    backend_with_options(flavor, names, JumpPositions::default(), families, true)
}

fn apply(ns: &Netns, flavor: Flavor, families: Families, rules: &RuleSet) {
    let rules = rules.clone();
    ns.run(move || backend(flavor, families).apply(&rules).expect("apply"));
}

/// `podnat-controller cleanup` with no flags; what it printed.
fn bare_cleanup(ns: &Netns) -> String {
    agent_cli(ns, &["cleanup"])
}

/// The ruleset is `before` again, handles included (counters aside:
/// nothing here sends traffic, but foreign counters are not ours to judge).
fn assert_as_before(ns: &Netns, before: &str, what: &str) {
    assert_eq!(
        without_counters(&ruleset(ns)),
        without_counters(before),
        "{what}"
    );
}

/// `mail()` plus an IPv6 mapping, with the pod a hairpin source in both
/// families (local access's MARK rules / set elements).
fn dual_mail() -> RuleSet {
    let mut r = mail();
    publish(
        &mut r,
        "mail:mx-0",
        "2001:db8::7",
        25,
        Proto::Tcp,
        "fd00::a",
        2525,
    );
    for pod in [POD_A_IP, "fd00::a"] {
        r.local.push(LocalPod {
            pod_ip: pod.parse().unwrap(),
            owner: PodRef::new("mail", "mx-0"),
        });
    }
    r.normalize();
    r
}

#[test]
fn bare_cleanup_leaves_the_crowded_node_as_it_was_in_both_flavors() {
    for flavor in FLAVORS {
        // IPv4 beside foreign IPv6 objects named like the agent's.
        let ns = Netns::new("own-crowd");
        crowd(&ns);
        let before = ruleset(&ns);
        apply(&ns, flavor, Families::default(), &mail());
        let listing = ns.sh("nft list ruleset");
        assert!(
            listing.contains(MARK.trim()),
            "{flavor:?}: no mark\n{listing}"
        );
        let said = bare_cleanup(&ns);
        assert_as_before(
            &ns,
            &before,
            &format!("{flavor:?}: cleanup printed\n{said}"),
        );
        match flavor {
            // nat OUTPUT was not there: the agent made it, cleanup removes it.
            Flavor::Iptables => {
                assert!(
                    said.contains("ip iptables: chains nat PODNAT_PRE"),
                    "{said}"
                );
                assert!(
                    said.contains("ip iptables: base chains nat OUTPUT"),
                    "{said}"
                );
            }
            _ => assert_eq!(said, "removed ip nftables: table podnat\n"),
        }
        assert!(
            !said.contains("ip6"),
            "foreign ip6 objects are not ours: {said}"
        );

        // Dual-stack on a dual-stack crowd.
        let ns = Netns::new("own-dual");
        crowd_dual(&ns);
        let before = ruleset(&ns);
        apply(&ns, flavor, Families::DUAL, &dual_mail());
        let said = bare_cleanup(&ns);
        assert!(said.contains("ip6 "), "{flavor:?}: {said}");
        assert_as_before(
            &ns,
            &before,
            &format!("{flavor:?} dual: cleanup printed\n{said}"),
        );
        assert_eq!(bare_cleanup(&ns), "nothing of the agent's was found\n");
    }
}

#[test]
fn on_a_bare_node_the_tables_and_base_chains_the_agent_made_go_too() {
    let ns = Netns::new("own-bare");
    ns.sh("nft add table inet other && nft add chain inet other c");
    let before = ruleset(&ns);
    apply(&ns, Flavor::Iptables, Families::DUAL, &dual_mail());
    let tables = ns.sh("nft list tables");
    assert!(
        tables.contains("ip6 nat") && tables.contains("ip filter"),
        "{tables}"
    );
    let said = bare_cleanup(&ns);
    assert!(said.contains("ip iptables: tables nat, filter"), "{said}");
    assert!(said.contains("ip6 iptables: tables nat, filter"), "{said}");
    assert_eq!(ruleset(&ns), before, "cleanup printed\n{said}");
}

#[test]
fn objects_named_like_the_agents_without_its_mark_are_refused_and_kept() {
    for flavor in FLAVORS {
        let ns = Netns::new("own-foreign");
        crowd(&ns);
        let before = ruleset(&ns);
        let err = ns
            .run(|| backend(flavor, Families::DUAL).apply(&dual_mail()))
            .expect_err("a foreign object with the agent's name");
        let FirewallError::NotOurs(why) = &err else {
            panic!("{flavor:?}: {err}");
        };
        let named = match flavor {
            Flavor::Iptables => "chain PODNAT_PRE in table ip6 nat",
            _ => "table ip6 podnat",
        };
        assert!(why.contains(named), "{why}");
        assert!(why.contains("-resourceprefix"), "{why}");
        // One batch for both families: nothing was sent, IPv4 included.
        assert_eq!(ruleset(&ns), before, "{flavor:?}");
    }
}

/// What today's main wrote before marks: the rule view, fed to
/// iptables-nft-restore / nft without the mark (tables and base chains as
/// iptables-nft makes them).
fn write_unmarked(ns: &Netns, flavor: Flavor, rules: &RuleSet) {
    let names = Names::new("podnat");
    let text = match flavor {
        Flavor::Iptables => view::iptables_save_with(rules, &names, Family::Ipv4, true),
        _ => view::nft_with(rules, &names, Family::Ipv4, true)
            .lines()
            .filter(|l| !l.contains("comment \"podnat-controller"))
            .map(|l| format!("{l}\n"))
            .collect(),
    };
    let tool = match flavor {
        Flavor::Iptables => "iptables-nft-restore --noflush",
        _ => "nft -f -",
    };
    ns.sh(&format!("{tool} <<'EOF'\n{text}EOF"));
    assert!(!ns.sh("nft list ruleset").contains(MARK.trim()));
}

#[test]
fn an_earlier_versions_unmarked_objects_are_adopted_then_cleaned_up() {
    for flavor in FLAVORS {
        for apply_first in [true, false] {
            let ns = Netns::new("own-upgrade");
            crowd(&ns);
            let before = ruleset(&ns);
            write_unmarked(&ns, flavor, &mail());
            let back = ns.run(move || backend(flavor, Families::default()).read().unwrap());
            assert_eq!(back, mail(), "{flavor:?}: read as the agent's own");
            if apply_first {
                let text = match flavor {
                    Flavor::Iptables => support::save::agent_iptables_save(&ns),
                    _ => ns.sh("nft list table ip podnat"),
                };
                let r =
                    ns.run(move || backend(flavor, Families::default()).apply(&mail()).unwrap());
                assert!(r.rebuilt, "{flavor:?}: not adopted: {r:?}");
                assert!(
                    r.added_dnat.is_empty() && r.removed_dnat.is_empty(),
                    "{r:?}"
                );
                let adopted = ns.sh("nft list ruleset");
                assert!(adopted.contains(MARK.trim()), "{adopted}");
                if flavor == Flavor::Iptables {
                    assert_eq!(support::save::agent_iptables_save(&ns), text);
                } else {
                    let marked = ns.sh("nft list table ip podnat");
                    assert_eq!(
                        marked
                            .lines()
                            .filter(|l| !l.contains("comment \"podnat-controller"))
                            .collect::<Vec<_>>(),
                        text.lines().collect::<Vec<_>>()
                    );
                }
                let again =
                    ns.run(move || backend(flavor, Families::default()).apply(&mail()).unwrap());
                assert_eq!(again.messages, 0, "{flavor:?}: {again:?}");
            }
            let said = bare_cleanup(&ns);
            assert_as_before(
                &ns,
                &before,
                &format!("{flavor:?} (apply first: {apply_first}): cleanup printed\n{said}"),
            );
        }
    }
}
