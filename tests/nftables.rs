//! The nftables flavor against the real kernel, inside namespaces each test
//! creates: real TCP/UDP through the NAT, `nft` as the oracle of what the
//! kernel holds, churn, concurrency, atomicity and size.

mod support;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::wire::netlink::{
    sys, Attrs, NetlinkError, NfSocket, NftBatch, NftMsg,
};
use podnat_controller::firewall::{view, Backend, Changes, FirewallError};
use podnat_controller::model::{Family, Proto, RuleSet};
use proptest::prelude::*;
use support::netns::{Netns, Sandbox, POD_A_IP, POD_B_IP, PUBLIC_IP};
use support::rules::{bulk, names, publish};

/// An apply as the agent's firewall thread makes it: the batch, then the
/// conntrack flush of moved UDP mappings.
fn apply(ns: &Netns, rules: &RuleSet) -> podnat_controller::firewall::ApplyReport {
    let rules = rules.clone();
    ns.run(move || {
        let mut report = NftablesBackend::new(names()).apply(&rules)?;
        podnat_controller::firewall::flush_stale_connections(&mut report);
        Ok::<_, podnat_controller::firewall::FirewallError>(report)
    })
    .unwrap_or_else(|e| panic!("apply in {}: {e}", ns.name))
}

fn kernel_view(ns: &Netns) -> String {
    view::canonical_nft(&ns.sh("nft list table ip podnat"))
}

fn assert_kernel_holds(ns: &Netns, rules: &RuleSet) {
    assert_eq!(
        kernel_view(ns),
        view::canonical_nft(&view::nft(rules, &names(), Family::Ipv4))
    );
}

fn mail_rules() -> RuleSet {
    let mut r = RuleSet::default();
    publish(
        &mut r,
        "mail:mx-0",
        PUBLIC_IP,
        25,
        Proto::Tcp,
        POD_A_IP,
        2525,
    );
    publish(
        &mut r,
        "mail:mx-0",
        PUBLIC_IP,
        5353,
        Proto::Udp,
        POD_A_IP,
        5300,
    );
    r
}

#[test]
fn tcp_udp_snat_and_internal_traffic() {
    let sb = Sandbox::new("traf");
    apply(&sb.node, &mail_rules());

    support::traffic::check_mail_traffic(&sb);
}

#[test]
fn kernel_holds_exactly_the_view_and_reapply_sends_nothing() {
    let ns = Netns::new("oracle");
    let rules = mail_rules();
    let first = apply(&ns, &rules);
    assert!(first.messages > 0 && first.rebuilt);
    assert_kernel_holds(&ns, &rules);

    // The JSON listing holds every element with its owner comment.
    let json = ns.sh("nft -j list map ip podnat dnat_to_pod");
    assert!(json.contains("\"comment\": \"mail:mx-0\""), "{json}");

    // Same table again, in a fresh process-like backend (no cache): no batch.
    let again = apply(&ns, &rules);
    assert_eq!(again.messages, 0, "an unchanged table sends no batch");
    // And with a warm cache (same backend, generation unchanged).
    let r2 = rules.clone();
    let (a, b) = ns.run(move || {
        let mut be = NftablesBackend::new(names());
        let a = be.apply(&r2).unwrap();
        let b = be.apply(&r2).unwrap();
        (a, b)
    });
    assert_eq!(a.messages, 0);
    assert_eq!(b.messages, 0);
    assert!(
        b.cache_hit,
        "second apply diffed against the remembered table"
    );

    // Elements that are unchanged keep their place; a change touches only it.
    let mut changed = rules.clone();
    publish(
        &mut changed,
        "web:w-1",
        PUBLIC_IP,
        8080,
        Proto::Tcp,
        POD_B_IP,
        80,
    );
    let rep = apply(&ns, &changed);
    assert!(!rep.rebuilt);
    assert_eq!(rep.added_dnat.len(), 1);
    assert!(rep.removed_dnat.is_empty());
    assert_kernel_holds(&ns, &changed);

    // Read back decodes to the same rule set.
    let back = ns.run(|| NftablesBackend::new(names()).read().unwrap());
    assert_eq!(back, changed);
}

#[test]
fn drifted_layout_is_rebuilt() {
    let ns = Netns::new("drift");
    let rules = mail_rules();
    apply(&ns, &rules);
    ns.sh("nft flush chain ip podnat prerouting");
    let rep = apply(&ns, &rules);
    assert!(rep.rebuilt, "a flushed chain is noticed");
    assert_kernel_holds(&ns, &rules);
    ns.sh("nft delete element ip podnat forward_allowed '{ 10.1.0.5 . tcp . 2525 }'");
    let rep = apply(&ns, &rules);
    assert!(!rep.rebuilt);
    assert_kernel_holds(&ns, &rules);
}

fn foreign_setup(ns: &Netns) {
    ns.sh(
        "nft add table inet foreign && \
         nft add chain inet foreign input '{ type filter hook input priority 0; policy accept; }' && \
         nft add rule inet foreign input tcp dport 22 counter accept && \
         iptables-nft -t nat -A PREROUTING -p tcp --dport 8443 -j DNAT --to-destination 10.9.9.9:443",
    );
}

fn foreign_listing(ns: &Netns) -> String {
    ns.sh("nft list table inet foreign; iptables-nft-save | grep -v '^#'")
}

#[test]
fn foreign_tables_are_untouched_by_apply_and_cleanup() {
    let ns = Netns::new("foreign");
    foreign_setup(&ns);
    let before = foreign_listing(&ns);
    apply(&ns, &mail_rules());
    assert_eq!(foreign_listing(&ns), before);
    let removed = ns.run(|| NftablesBackend::new(names()).cleanup().unwrap());
    assert!(!removed.is_empty(), "{removed:?}");
    assert_eq!(foreign_listing(&ns), before);
    assert!(
        !ns.try_sh("nft list table ip podnat").status.success(),
        "cleanup removed the table"
    );
    let again = ns.run(|| NftablesBackend::new(names()).cleanup().unwrap());
    assert!(again.is_empty(), "nothing left to remove: {again:?}");
}

#[test]
fn a_refused_batch_changes_nothing_and_names_the_cause() {
    let ns = Netns::new("refuse");
    apply(&ns, &mail_rules());
    ns.sh("nft add table inet foreign");
    let before = ns.sh("nft list ruleset");
    let err = ns.run(|| {
        let mut sock = NfSocket::open().unwrap();
        let genid = sock.generation().unwrap();
        let mut batch = NftBatch::new();
        // A valid change first...
        let mut a = Attrs::new();
        a.str(sys::NFTA_TABLE_NAME, "another");
        batch.add(
            NftMsg::new(sys::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE as u32, a),
            "add table ip another",
        );
        // ...then a rule for a chain that does not exist.
        let mut r = Attrs::new();
        r.str(sys::NFTA_RULE_TABLE, "podnat")
            .str(sys::NFTA_RULE_CHAIN, "no-such-chain");
        batch.add(
            NftMsg::new(
                sys::NFT_MSG_NEWRULE,
                (libc::NLM_F_CREATE | libc::NLM_F_APPEND) as u32,
                r,
            ),
            "add rule to chain no-such-chain",
        );
        sock.send_batch(batch.finalize(Some(genid))).unwrap_err()
    });
    match &err {
        NetlinkError::Refused { what, errno } => {
            assert_eq!(what, "add rule to chain no-such-chain");
            assert_eq!(*errno, nix::errno::Errno::ENOENT);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("no-such-chain"));
    assert_eq!(
        ns.sh("nft list ruleset"),
        before,
        "all of the batch or none of it"
    );
}

#[test]
fn a_stale_generation_is_refused() {
    let ns = Netns::new("genid");
    let err = ns.run(|| {
        let mut sock = NfSocket::open().unwrap();
        let genid = sock.generation().unwrap();
        let mut other = NfSocket::open().unwrap();
        let mut b = NftBatch::new();
        let mut a = Attrs::new();
        a.str(sys::NFTA_TABLE_NAME, "someone-else");
        b.add(
            NftMsg::new(sys::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE as u32, a),
            "add table",
        );
        other.send_batch(b.finalize(None)).unwrap();
        let mut b = NftBatch::new();
        let mut a = Attrs::new();
        a.str(sys::NFTA_TABLE_NAME, "mine");
        b.add(
            NftMsg::new(sys::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE as u32, a),
            "add table",
        );
        sock.send_batch(b.finalize(Some(genid))).unwrap_err()
    });
    assert!(
        matches!(err, NetlinkError::GenerationChanged { .. }),
        "{err}"
    );
    assert!(!ns.try_sh("nft list table ip mine").status.success());
}

#[test]
fn concurrent_writer_never_breaks_an_apply() {
    let ns = Netns::new("race");
    ns.sh("nft add table inet foreign && nft add chain inet foreign c");
    let name = ns.name.clone();
    let writer = std::thread::spawn(move || {
        let script =
            "i=0; while [ $i -lt 400 ]; do nft add rule inet foreign c counter; i=$((i+1)); done";
        std::process::Command::new("ip")
            .args(["netns", "exec", &name, "sh", "-c", script])
            .status()
            .unwrap()
    });
    let (retries, last) = ns.run(|| {
        let mut be = NftablesBackend::new(names());
        let mut retries = 0;
        let mut last = RuleSet::default();
        for i in 0..60u16 {
            let mut r = RuleSet::default();
            for p in 0..(i % 7) {
                publish(
                    &mut r,
                    "ns:p",
                    PUBLIC_IP,
                    1000 + p + i,
                    Proto::Tcp,
                    POD_A_IP,
                    80,
                );
            }
            let rep = be.apply(&r).unwrap_or_else(|e| panic!("apply {i}: {e}"));
            retries += rep.retries;
            last = r;
        }
        (retries, last)
    });
    assert!(writer.join().unwrap().success());
    assert_kernel_holds(&ns, &last);
    assert_eq!(
        ns.sh("nft list chain inet foreign c")
            .matches("counter")
            .count(),
        400
    );
    eprintln!("generation retries while racing another writer: {retries}");
}

#[test]
fn udp_mapping_moves_to_another_pod_within_a_second() {
    let sb = Sandbox::new("udpmv");
    let mut to_a = RuleSet::default();
    publish(
        &mut to_a,
        "ns:a",
        PUBLIC_IP,
        4000,
        Proto::Udp,
        POD_A_IP,
        4000,
    );
    let mut to_b = RuleSet::default();
    publish(
        &mut to_b,
        "ns:b",
        PUBLIC_IP,
        4000,
        Proto::Udp,
        POD_B_IP,
        4000,
    );
    apply(&sb.node, &to_a);

    let a = sb.pod_a.run(|| UdpSocket::bind("0.0.0.0:4000").unwrap());
    let b = sb.pod_b.run(|| UdpSocket::bind("0.0.0.0:4000").unwrap());
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let client = sb.client.run(|| UdpSocket::bind("0.0.0.0:41000").unwrap());
    let target = format!("{PUBLIC_IP}:4000");
    let drain = |s: &UdpSocket| {
        let mut n = 0;
        let mut buf = [0u8; 64];
        while s.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    // Datagrams every 50 ms reach A (same source port: one conntrack entry).
    for _ in 0..6 {
        client.send_to(b"x", &target).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(drain(&a) > 0, "A receives before the move");
    let rep = apply(&sb.node, &to_b);
    assert!(
        rep.conntrack_flushed >= 1,
        "the stale UDP entry was deleted: {rep:?}"
    );
    drain(&a);
    let moved = Instant::now();
    let mut at_b = 0;
    let mut at_a_after = 0;
    while moved.elapsed() < Duration::from_secs(1) {
        client.send_to(b"x", &target).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        at_b += drain(&b);
        at_a_after += drain(&a);
    }
    assert!(
        at_b >= 10,
        "B receives within a second of the move ({at_b} datagrams)"
    );
    assert_eq!(at_a_after, 0, "nothing reaches A after the move");
}

#[test]
fn five_thousand_ports_in_one_batch() {
    let ns = Netns::new("big");
    let rules = bulk(5000);
    let rep = apply(&ns, &rules);
    assert_eq!(rules.len(), 15000);
    eprintln!(
        "5000 ports: {} messages, {} bytes in one batch",
        rep.messages, rep.bytes
    );
    let back = ns.run(|| NftablesBackend::new(names()).read().unwrap());
    assert_eq!(back, rules);
    assert_eq!(
        ns.sh("nft -j list map ip podnat dnat_to_pod")
            .matches("\"comment\"")
            .count(),
        5000
    );
    assert_eq!(apply(&ns, &rules).messages, 0);
}

#[test]
fn dry_run_without_cap_net_admin_assumes_an_empty_kernel() {
    // nfnetlink refuses every request without CAP_NET_ADMIN; the dry run says
    // so and prints the whole table as what it would create.
    let ns = Netns::new("nocap");
    let out = ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_podnat-controller"))
        .args([
            "-dryrun",
            "-firewallflavor=nftables",
            "-nodeid=node1",
            "--public-address",
            PUBLIC_IP,
        ])
        .arg("--pods-file")
        .arg(format!(
            "{}/tests/fixtures/mail-pods.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no CAP_NET_ADMIN"), "{stderr}");
    assert!(stdout.starts_with("table ip podnat {"), "{stdout}");
    let refused: FirewallError = NetlinkError::Refused {
        what: "add table ip podnat".into(),
        errno: nix::errno::Errno::EPERM,
    }
    .into();
    assert_eq!(
        refused.to_string(),
        "the kernel refused add table ip podnat: EPERM: Operation not permitted"
    );
}

/// Random owners/ports/pods for the churn property.
fn arb_rules() -> impl Strategy<Value = RuleSet> {
    proptest::collection::vec((0u16..6, 0u8..2, 0u8..3, 0u16..3), 0..6).prop_map(|entries| {
        let mut r = RuleSet::default();
        let mut seen = BTreeSet::new();
        for (port, proto, pod, dport) in entries {
            let proto = if proto == 0 { Proto::Tcp } else { Proto::Udp };
            if !seen.insert((port, proto)) {
                continue;
            }
            let pod_ip = format!("10.1.{pod}.5");
            publish(
                &mut r,
                &format!("ns:p{pod}"),
                PUBLIC_IP,
                7000 + port,
                proto,
                &pod_ip,
                80 + dport,
            );
        }
        r.forward.dedup_by(|a, b| {
            a.pod_ip == b.pod_ip && a.proto == b.proto && a.pod_port == b.pod_port
        });
        r
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn any_sequence_of_changes_converges_like_a_fresh_apply(steps in proptest::collection::vec(arb_rules(), 1..6)) {
        let churned = Netns::new("churn");
        let fresh = Netns::new("fresh");
        let steps2 = steps.clone();
        churned.run(move || {
            let mut be = NftablesBackend::new(names());
            for s in &steps2 {
                be.apply(s).unwrap();
            }
        });
        let last = steps.last().unwrap().clone();
        apply(&fresh, &last);
        prop_assert_eq!(kernel_view(&churned), kernel_view(&fresh));
        prop_assert_eq!(kernel_view(&churned), view::canonical_nft(&view::nft(&last, &names(), Family::Ipv4)));
    }
}

/// A set's element dump is no snapshot: the kernel resumes each part by
/// skipping what it sent before, and a rehash of the set's hash table in
/// between (a deferred worker grows it after a bulk insert, shrinks it after
/// deletes) skips elements without flagging the dump. After installs and
/// changes, a read-back must still see every element — a missing one made
/// the next whole apply add it again and fail (EEXIST). IPv6, whose bigger
/// elements take more dump parts. Built as a release binary this sequence
/// lost elements within a few dozen rounds before the reads had to agree; a
/// debug build is mostly too slow to read inside the rehash (the agreement
/// itself is unit-tested in the flavor's `elements`).
#[test]
fn a_read_back_right_after_changes_sees_every_element() {
    let ns = Netns::new("rehash");
    ns.run(|| {
        let v6 = |n: u16| {
            let mut r = RuleSet::default();
            for i in 0..n {
                publish(
                    &mut r,
                    &format!("bulk:p-{i}"),
                    "2001:db8::7",
                    10000 + i,
                    Proto::Tcp,
                    &format!("fd00:2::{:x}", i + 1),
                    80,
                );
            }
            r.normalize();
            r
        };
        let (base, plus) = (v6(1000), v6(1001));
        let families = podnat_controller::model::Families {
            ipv4: false,
            ipv6: true,
        };
        let mut be = NftablesBackend::for_families(names(), families);
        let read = |be: &mut NftablesBackend, want: &RuleSet, what: &str| {
            be.forget();
            let got = be.read().unwrap();
            assert_eq!(
                (got.dnat.len(), got.snat.len(), got.forward.len()),
                (want.dnat.len(), want.snat.len(), want.forward.len()),
                "{what}"
            );
            assert_eq!(&got, want, "{what}");
        };
        for round in 0..40 {
            be.cleanup().unwrap();
            be.apply(&base).unwrap();
            read(&mut be, &base, &format!("round {round}: installed"));
            be.apply_changes(Changes::between(&base, &plus))
                .unwrap()
                .expect("on top of the last commit");
            be.apply_changes(Changes::between(&plus, &base))
                .unwrap()
                .expect("on top of the last commit");
            read(
                &mut be,
                &base,
                &format!("round {round}: one added, one deleted"),
            );
            be.apply(&plus).unwrap();
            be.apply(&base).unwrap();
        }
    });
}
