//! A crowded node (issue 12): both flavors beside what kube-proxy, Docker,
//! Cilium, firewalld and an IPv6 stack leave in nf_tables, in namespaces
//! each test creates. `nft -a list ruleset` (handles included) is the oracle
//! that foreign objects are left byte-identical; the nf_tables monitor is
//! checked against real foreign commits.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::engine::monitor::{watch_ruleset, Blocker};
use podnat_controller::firewall::{backend_with_jumps, Backend, Changes, Names};
use podnat_controller::model::{Proto, RuleSet};
use support::crowd::{crowd, foreign_part, ruleset};
use support::netns::{Netns, Sandbox, POD_A_IP, PUBLIC_IP};
use support::rules::{mail, publish};

const FLAVORS: [Flavor; 2] = [Flavor::Nftables, Flavor::Iptables];

fn backend(flavor: Flavor) -> Box<dyn Backend> {
    backend_with_jumps(flavor, Names::new("podnat"), JumpPositions::default())
}

/// The agent's own objects removed from a listing.
fn foreign(listing: &str) -> String {
    foreign_part(listing, "podnat", "PODNAT_")
}

/// A shell command from the calling thread (and so in its namespace).
fn run(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn foreign_part_drops_only_the_agents_objects() {
    let listing = "table ip nat { # handle 1\n\tchain PREROUTING { # handle 1\n\t\tcounter jump PODNAT_PRE # handle 5\n\t\tcounter jump KUBE # handle 6\n\t}\n\tchain PODNAT_PRE { # handle 2\n\t\tcounter # handle 7\n\t}\n}\ntable ip podnat { # handle 2\n\tchain x {\n\t}\n}\ntable ip PODNAT_PRE { # handle 3\n\tchain PODNAT_PRE { # handle 1\n\t}\n}\n";
    assert_eq!(
        foreign(listing),
        "table ip nat { # handle 1\n\tchain PREROUTING { # handle 1\n\t\tcounter jump KUBE # handle 6\n\t}\n}\ntable ip PODNAT_PRE { # handle 3\n\tchain PODNAT_PRE { # handle 1\n\t}\n}\n"
    );
}

#[test]
fn a_crowded_node_is_left_byte_identical_and_a_reapply_sends_nothing() {
    for flavor in FLAVORS {
        let ns = Netns::new("crowd");
        crowd(&ns);
        let before = ruleset(&ns);
        let first = ns.run(|| backend(flavor).apply(&mail()).unwrap());
        assert!(first.messages > 0, "{flavor:?}: {first:?}");
        let applied = ruleset(&ns);
        assert_eq!(
            foreign(&applied),
            foreign(&before),
            "{flavor:?}: foreign objects as they were"
        );

        // A fresh agent (no cache) reads back only what it owns: nothing to do.
        let again = ns.run(|| backend(flavor).apply(&mail()).unwrap());
        assert_eq!(again.messages, 0, "{flavor:?}: {again:?}");
        assert_eq!(ruleset(&ns), applied, "{flavor:?}: every handle unchanged");

        // The smallest repro: a foreign table with a chain.
        ns.sh("nft add table ip foo && nft add chain ip foo bar");
        let crowded = ruleset(&ns);
        let third = ns.run(|| backend(flavor).apply(&mail()).unwrap());
        assert_eq!(third.messages, 0, "{flavor:?}: {third:?}");
        let dry = ns.run(|| backend(flavor).dry_run(&mail(), false).unwrap());
        assert_eq!(dry, "", "{flavor:?}: the dry run has nothing to do");
        assert_eq!(ruleset(&ns), crowded);

        assert!(!ns.run(|| backend(flavor).cleanup().unwrap()).is_empty());
        assert_eq!(
            foreign(&ruleset(&ns)),
            foreign(&crowded),
            "{flavor:?}: cleanup leaves every foreign object, handles included"
        );
        let ours_elsewhere = ns.sh("nft list table ip6 podnat; ip6tables-nft-save -t nat");
        assert!(
            ours_elsewhere.contains("chain prerouting") && ours_elsewhere.contains(":PODNAT_PRE"),
            "same names in another family are not ours: {ours_elsewhere}"
        );
    }
}

#[test]
fn the_monitor_wakes_only_for_foreign_changes_to_what_the_agent_owns() {
    for flavor in FLAVORS {
        let ns = Netns::new("monitor");
        crowd(&ns);
        let touch_ours = match flavor {
            Flavor::Nftables => "nft flush set ip podnat forward_allowed",
            Flavor::Iptables => "iptables-nft -t nat -F PODNAT_PRE",
        };
        ns.run(move || {
            let rings = Arc::new(AtomicU64::new(0));
            let r = Arc::clone(&rings);
            let mut be = backend(flavor);
            let watch = watch_ruleset(be.interest(), move || {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            let tracker = watch.tracker();
            be.attach_tracker(watch.tracker());
            let quiet = || std::thread::sleep(Duration::from_millis(400));

            assert!(be.apply(&mail()).unwrap().messages > 0);
            quiet();
            assert_eq!(rings.load(Ordering::SeqCst), 0, "{flavor:?}: own commit");
            assert!(tracker.stats().commits_ignored_own >= 1);

            // kube-proxy, Docker and a new table: commits elsewhere.
            let seen = tracker.stats().commits_seen;
            run("nft add element ip kube-proxy cluster-ips '{ 10.96.0.11 }'");
            run("iptables-nft -t nat -A KUBE-SERVICES -d 10.96.0.12/32 -j RETURN");
            run("iptables-nft -t filter -A DOCKER -j RETURN");
            run("nft add table ip foo && nft add chain ip foo bar");
            quiet();
            assert_eq!(
                rings.load(Ordering::SeqCst),
                0,
                "{flavor:?}: foreign commits elsewhere"
            );
            assert!(tracker.stats().commits_seen >= seen + 4, "they were heard");

            // A change after them needs no re-read.
            let mut more = mail();
            publish(
                &mut more,
                "mail:mx-0",
                PUBLIC_IP,
                993,
                Proto::Tcp,
                POD_A_IP,
                993,
            );
            // Nor does the change alone (the agent's way): no generation
            // query, the batch carries the generation the tracker read last.
            let add = be
                .apply_changes(Changes::between(&mail(), &more))
                .unwrap()
                .expect("the change fits the cached state");
            assert!(add.messages > 0 && add.cache_hit, "{flavor:?}: {add:?}");
            assert_eq!(be.read().unwrap(), more, "{flavor:?}");
            quiet();
            assert_eq!(rings.load(Ordering::SeqCst), 0);

            // Someone touches ours: one ring, the next apply reads and repairs.
            run(touch_ours);
            let start = Instant::now();
            while rings.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!(
                "{flavor:?}: foreign change to ours heard after {:?}",
                start.elapsed()
            );
            assert_eq!(rings.load(Ordering::SeqCst), 1, "{flavor:?}");
            let why = tracker.take_reasons();
            assert!(why.ours && !why.forward_hook, "{why:?}");
            let repair = be.apply(&more).unwrap();
            assert!(
                repair.messages > 0 && !repair.cache_hit,
                "{flavor:?}: {repair:?}"
            );
            let settled = be.apply(&more).unwrap();
            assert_eq!(settled.messages, 0);
            quiet();
            assert_eq!(
                rings.load(Ordering::SeqCst),
                1,
                "the repair is our own commit"
            );
            watch.stop();
        });
    }
}

fn blocker(family: u8, table: &str, chain: &str) -> Blocker {
    Blocker {
        family,
        table: table.into(),
        chain: chain.into(),
    }
}

#[test]
fn a_foreign_forward_drop_is_reported_and_the_iptables_flavor_passes_it() {
    let sb = Sandbox::new("fwdrop");
    // Docker's policy; the established-traffic accept kube-proxy's
    // KUBE-FORWARD (or a CNI plugin) puts beside it.
    sb.node.sh("iptables-nft -P FORWARD DROP && \
         iptables-nft -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    let ip = libc::NFPROTO_IPV4 as u8;
    let tcp_in = |sb: &Sandbox| {
        let listener = sb
            .pod_a
            .run(|| std::net::TcpListener::bind("0.0.0.0:2525").unwrap());
        let ok = sb
            .client
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &format!("{PUBLIC_IP}:25").parse().unwrap(),
                    Duration::from_secs(2),
                )
            })
            .is_ok();
        drop(listener);
        ok
    };

    // iptables flavor: its accept is a rule of that very FORWARD chain.
    let blockers = sb.node.run(|| {
        let mut be = backend(Flavor::Iptables);
        be.apply(&mail()).unwrap();
        be.forward_blockers().unwrap()
    });
    assert_eq!(blockers, vec![]);
    assert!(
        tcp_in(&sb),
        "the iptables flavor passes Docker's FORWARD DROP"
    );
    assert!(!sb
        .node
        .run(|| backend(Flavor::Iptables).cleanup().unwrap())
        .is_empty());

    // nftables flavor: its accept ends only its own chain; reported by name.
    let blockers = sb.node.run(|| {
        let mut be = backend(Flavor::Nftables);
        be.apply(&mail()).unwrap();
        be.forward_blockers().unwrap()
    });
    assert_eq!(blockers, vec![blocker(ip, "filter", "FORWARD")]);
    assert!(
        !tcp_in(&sb),
        "the drop in the other base chain wins, as reported"
    );

    // A host firewall's inet table with policy drop blocks both flavors.
    sb.node.sh(
        "nft add table inet host && \
         nft add chain inet host host_forward '{ type filter hook forward priority 10; policy drop; }'",
    );
    let inet = libc::NFPROTO_INET as u8;
    let found = sb
        .node
        .run(|| backend(Flavor::Nftables).forward_blockers().unwrap());
    assert_eq!(
        found,
        vec![
            blocker(inet, "host", "host_forward"),
            blocker(ip, "filter", "FORWARD")
        ]
    );
    let found = sb
        .node
        .run(|| backend(Flavor::Iptables).forward_blockers().unwrap());
    assert_eq!(found, vec![blocker(inet, "host", "host_forward")]);
}

#[test]
fn foreign_rules_in_our_chains_go_and_foreign_jumps_to_them_stay() {
    // nftables flavor: a rule someone added to our chain is not ours.
    let ns = Netns::new("intruder");
    crowd(&ns);
    ns.run(|| backend(Flavor::Nftables).apply(&mail()).unwrap());
    let ours = ns.sh("nft list table ip podnat");
    ns.sh("nft insert rule ip podnat prerouting counter accept");
    let r = ns.run(|| backend(Flavor::Nftables).apply(&mail()).unwrap());
    assert!(r.rebuilt, "{r:?}");
    assert_eq!(ns.sh("nft list table ip podnat"), ours);

    // iptables flavor: a foreign rule inside PODNAT_PRE goes; a foreign
    // chain's jump to PODNAT_PRE stays (it is that chain's owner's).
    let ns = Netns::new("intruder");
    crowd(&ns);
    ns.run(|| backend(Flavor::Iptables).apply(&mail()).unwrap());
    let ours = ns.sh("iptables-nft-save -t nat | grep '^-A PODNAT_PRE'");
    ns.sh("iptables-nft -t nat -N CILIUM_PRE_nat && \
         iptables-nft -t nat -A CILIUM_PRE_nat -j PODNAT_PRE && \
         iptables-nft -t nat -I PODNAT_PRE 1 -j ACCEPT");
    let r = ns.run(|| backend(Flavor::Iptables).apply(&mail()).unwrap());
    assert!(r.messages > 0, "{r:?}");
    let save = ns.sh("iptables-nft-save -t nat");
    assert_eq!(
        ns.sh("iptables-nft-save -t nat | grep '^-A PODNAT_PRE'"),
        ours
    );
    assert!(save.contains("-A CILIUM_PRE_nat -j PODNAT_PRE"), "{save}");
}

#[test]
fn a_change_alone_is_refused_whole_when_another_commit_came_first() {
    for flavor in FLAVORS {
        let ns = Netns::new("delta");
        crowd(&ns);
        ns.run(move || {
            let listing = || {
                let out = Command::new("nft").args(["-a", "list", "ruleset"]).output();
                String::from_utf8(out.unwrap().stdout).unwrap()
            };
            // No tracker: the cached state holds only at its own generation.
            let mut be = backend(flavor);
            be.apply(&mail()).unwrap();
            let mut more = mail();
            publish(
                &mut more,
                "mail:mx-0",
                PUBLIC_IP,
                993,
                Proto::Tcp,
                POD_A_IP,
                993,
            );
            let grow = Changes::between(&mail(), &more);
            let before = listing();
            // kube-proxy commits elsewhere: the kernel refuses the batch
            // built on the old generation, nothing changes, the caller is
            // told to send the whole table.
            run("nft add element ip kube-proxy cluster-ips '{ 10.96.0.13 }'");
            let moved = listing();
            assert_ne!(before, moved);
            assert!(
                be.apply_changes(grow.clone()).unwrap().is_none(),
                "{flavor:?}"
            );
            assert_eq!(listing(), moved, "{flavor:?}: nothing sent");
            let whole = be.apply(&more).unwrap();
            assert!(whole.messages > 0, "{flavor:?}");
            // Changes that do not fit what the kernel holds (a delete of a
            // rule that is not there) are not sent either.
            let stale = Changes::between(&more, &mail());
            let mut wrong = stale.clone();
            wrong.del.dnat[0].pod_port += 1;
            let after = listing();
            assert!(be.apply_changes(wrong).unwrap().is_none(), "{flavor:?}");
            assert_eq!(listing(), after);
            // And on top of the last commit they apply, in one batch.
            let back = be.apply_changes(stale).unwrap().expect("fits");
            assert!(back.messages > 0 && back.cache_hit);
            assert_eq!(be.read().unwrap(), mail(), "{flavor:?}");
            // An add of what is there already is refused whole too (the
            // iptables flavor sees it in its state, the nftables flavor
            // leaves it to the kernel's NLM_F_EXCL): nothing changes, and
            // the whole table, read afresh, finds nothing to do.
            let again = Changes {
                add: RuleSet {
                    dnat: mail().dnat,
                    ..RuleSet::default()
                },
                del: RuleSet::default(),
            };
            let settled = listing();
            assert!(be.apply_changes(again).unwrap().is_none(), "{flavor:?}");
            assert_eq!(listing(), settled, "{flavor:?}");
            assert_eq!(be.apply(&mail()).unwrap().messages, 0, "{flavor:?}");
        });
    }
}
