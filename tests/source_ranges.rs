//! Source allow-lists (`sourceRanges`, issue 25) in both flavors, against
//! the real kernel on a crowded node, both families: only clients in a
//! restricted key's ranges reach its pod — not another client, not the node
//! itself (local access), not a pod of the node (hairpin); a key without
//! ranges stays open to all; `nft list` / `iptables-nft-save` equal the
//! view (and `iptables-nft -C` finds each rule); the read-back finds the
//! ranges; a change of ranges alone is a few messages and stops an open
//! connection from a range that went; cleanup leaves the crowd as it was.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::{
    backend_with_options, flush_stale_connections, view, ApplyReport, Backend, Changes,
};
use podnat_controller::model::{
    Families, Family, LocalPod, NatKey, PodRef, Proto, RuleSet, SourceRule,
};
use support::crowd::{crowd_dual, ruleset, without_counters};
use support::netns::{veth, Netns, Sandbox, POD_A_IP, POD_A_IP6, POD_B_IP, POD_B_IP6};
use support::rules::{names, publish};
use support::save::assert_kernel_holds_view;

const PUBLIC4: &str = "203.0.113.7";
const PUBLIC6: &str = "2001:db8::7";

fn backend_of(families: Families) -> Box<dyn Backend> {
    flavor_backend(Flavor::Nftables, families)
}

fn flavor_backend(flavor: Flavor, families: Families) -> Box<dyn Backend> {
    backend_with_options(flavor, names(), JumpPositions::default(), families, true)
}

fn allow(public: &str, port: u16, source: &str) -> SourceRule {
    SourceRule {
        key: NatKey {
            public_ip: public.parse().unwrap(),
            public_port: port,
            proto: Proto::Tcp,
        },
        span: 0,
        source: source.parse().unwrap(),
        owner: PodRef::new("mail", "mx-0"),
    }
}

/// Pod A publishes 25 (restricted to `ranges`) and 26 (open) on both
/// families; every pod of the node is a hairpin source.
fn rules(ranges: &[(&str, &str)]) -> RuleSet {
    let mut r = RuleSet::default();
    for (public, pod) in [(PUBLIC4, POD_A_IP), (PUBLIC6, POD_A_IP6)] {
        publish(&mut r, "mail:mx-0", public, 25, Proto::Tcp, pod, 2525);
        publish(&mut r, "mail:mx-0", public, 26, Proto::Tcp, pod, 2525);
    }
    for (public, source) in ranges {
        r.allow.push(allow(public, 25, source));
    }
    for (ip, name) in [
        (POD_A_IP, "mx-0"),
        (POD_A_IP6, "mx-0"),
        (POD_B_IP, "web-0"),
        (POD_B_IP6, "web-0"),
    ] {
        r.local.push(LocalPod {
            pod_ip: ip.parse().unwrap(),
            owner: PodRef::new("mail", name),
        });
    }
    r.normalize();
    r
}

/// An echo server on 2525 in `pod` (both families) that keeps each
/// connection open until the client closes it.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(pod: &Netns) -> Echo {
        let listener = pod.run(|| TcpListener::bind("[::]:2525").unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let mut b = [0u8; 64];
                            while let Ok(n) = c.read(&mut b) {
                                if n == 0 || c.write_all(&b[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Echo { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A connection from `from` to `public:port`, if it opens and echoes.
fn open(from: &Netns, public: &str, port: u16) -> Option<TcpStream> {
    let to = SocketAddr::new(public.parse::<IpAddr>().unwrap(), port);
    from.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
        echoes(&mut s).then_some(s)
    })
}

fn echoes(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && b == *b"x"
}

fn reaches(from: &Netns, public: &str, port: u16) -> bool {
    open(from, public, port).is_some()
}

/// `rules` with port 25 (its mappings and ranges) owned by `mail:<pod>`.
fn owned_by(rules: &RuleSet, pod: &str) -> RuleSet {
    let mut r = rules.clone();
    let owner = PodRef::new("mail", pod);
    for m in r.dnat.iter_mut().filter(|m| m.key.public_port == 25) {
        m.owner = owner.clone();
    }
    for a in &mut r.allow {
        a.owner = owner.clone();
    }
    r.normalize();
    r
}

/// `change` on the kernel state just read, as the agent applies a change:
/// one batch, then the conntrack entries of removed mappings and of
/// sources no longer admitted are flushed (what the firewall thread does).
fn apply_change(ns: &Netns, flavor: Flavor, change: Changes) -> ApplyReport {
    ns.run(move || {
        let mut b = flavor_backend(flavor, Families::DUAL);
        b.read()?;
        let mut report = b.apply_changes(change)?;
        if let Some(r) = &mut report {
            flush_stale_connections(r);
        }
        Ok::<_, podnat_controller::firewall::FirewallError>(report)
    })
    .unwrap()
    .expect("the change applies on the state just read")
}

/// A whole table, as the agent applies one, with the flush after it.
fn apply_table(ns: &Netns, flavor: Flavor, rules: &RuleSet) -> ApplyReport {
    let r = rules.clone();
    ns.run(move || {
        let mut report = flavor_backend(flavor, Families::DUAL).apply(&r)?;
        flush_stale_connections(&mut report);
        Ok::<_, podnat_controller::firewall::FirewallError>(report)
    })
    .unwrap()
}

#[test]
fn only_the_allowed_sources_reach_a_restricted_port() {
    allow_lists_in(Flavor::Nftables, "src");
}

/// The iptables flavor writes a restricted mapping as one DNAT rule per
/// range (`-s`), so a source outside them is never DNATed; a range removed
/// loses its connections by the conntrack flush.
#[test]
fn only_the_allowed_sources_reach_a_restricted_port_iptables() {
    allow_lists_in(Flavor::Iptables, "srci");
}

fn allow_lists_in(flavor: Flavor, tag: &str) {
    let sb = Sandbox::new(tag).with_ipv6();
    // Another client, outside every range: 198.51.100.10, 2001:db8:5::10.
    let other = Netns::new(&format!("{tag}o"));
    veth(
        &sb.node,
        "oth0",
        "198.51.100.1/24",
        &other,
        "eth0",
        "198.51.100.10/24",
    );
    sb.node.sh("ip -6 addr add 2001:db8:5::1/64 dev oth0 nodad");
    other.sh("ip -6 addr add 2001:db8:5::10/64 dev eth0 nodad && \
         ip route add default via 198.51.100.1 && ip -6 route add default via 2001:db8:5::1");
    other.settle_ipv6();
    crowd_dual(&sb.node);
    let crowd = without_counters(&ruleset(&sb.node));
    let _echo = Echo::start(&sb.pod_a);

    // The client (203.0.113.1, 2001:db8::1) is in the ranges; the node's
    // own address (…7) and the pods are not.
    let first = rules(&[(PUBLIC4, "203.0.113.0/30"), (PUBLIC6, "2001:db8::/126")]);
    apply_table(&sb.node, flavor, &first);
    assert_kernel_holds_view(&sb.node, flavor, &first);
    let read = sb
        .node
        .run(move || flavor_backend(flavor, Families::DUAL).read())
        .unwrap();
    assert_eq!(read, first, "the read-back finds the ranges");

    // The pod counts the SYNs of the other client that reach it.
    sb.pod_a.sh("nft add table inet seen && \
         nft add chain inet seen input '{ type filter hook input priority 0; }' && \
         nft add rule inet seen input ip saddr 198.51.100.10 tcp flags syn counter && \
         nft add rule inet seen input ip6 saddr 2001:db8:5::10 tcp flags syn counter");
    let syns_seen = || -> u64 {
        sb.pod_a
            .sh("nft list table inet seen")
            .lines()
            .filter_map(|l| l.split("packets ").nth(1))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    for public in [PUBLIC4, PUBLIC6] {
        assert!(reaches(&sb.client, public, 25), "client → {public}:25");
        assert!(
            !reaches(&other, public, 25),
            "other → {public}:25 must fail"
        );
        assert!(
            !reaches(&sb.node, public, 25),
            "node → {public}:25 must fail"
        );
        assert!(
            !reaches(&sb.pod_b, public, 25),
            "pod B → {public}:25 must fail"
        );
    }
    assert_eq!(syns_seen(), 0, "no SYN of the other client reached the pod");
    for public in [PUBLIC4, PUBLIC6] {
        // The open key: everyone.
        for from in [&sb.client, &other, &sb.node, &sb.pod_b] {
            assert!(reaches(from, public, 26), "{} → {public}:26", from.name);
        }
    }
    assert!(
        syns_seen() >= 2,
        "the pod's counter sees the other client's SYNs"
    );

    // A change of ranges alone: the client's go, the other's come. Its
    // open connection stops; the other gets in.
    let mut held: Vec<TcpStream> = [PUBLIC4, PUBLIC6]
        .iter()
        .map(|p| open(&sb.client, p, 25).expect("client connection"))
        .collect();
    let second = rules(&[(PUBLIC4, "198.51.100.0/24"), (PUBLIC6, "2001:db8:5::/64")]);
    let change = Changes::between(&first, &second);
    assert_eq!(change.add.allow.len() + change.del.allow.len(), 4);
    assert!(change.add.dnat.is_empty() && change.del.dnat.is_empty());
    let report = apply_change(&sb.node, flavor, change);
    // Per family, nftables: two element messages, the deleted ranges and
    // the added ones (the key stays restricted throughout, so its element
    // is untouched); iptables: the old range's DNAT rule out, the new one in.
    assert_eq!(report.messages, 4, "per family: one out, one in");
    assert_eq!(
        report.admission.len(),
        2,
        "port 25 narrowed in both families"
    );
    assert_kernel_holds_view(&sb.node, flavor, &second);
    for s in &mut held {
        let t = Instant::now();
        assert!(!echoes(s), "an open connection from a removed range stops");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    for public in [PUBLIC4, PUBLIC6] {
        assert!(
            !reaches(&sb.client, public, 25),
            "client → {public}:25 now fails"
        );
        assert!(reaches(&other, public, 25), "other → {public}:25 now");
    }

    // The last range goes: the key is open again.
    let open_again = rules(&[]);
    apply_table(&sb.node, flavor, &open_again);
    assert_kernel_holds_view(&sb.node, flavor, &open_again);
    assert!(reaches(&sb.client, PUBLIC4, 25) && reaches(&sb.node, PUBLIC6, 25));

    // An open key gains ranges through a change (its restricted element
    // comes with its first range): the other client is refused at once.
    // The other client's open connections, made while the key was open,
    // stop too.
    let mut held: Vec<TcpStream> = [PUBLIC4, PUBLIC6]
        .iter()
        .map(|p| open(&other, p, 25).expect("other's connection while open"))
        .collect();
    let change = Changes::between(&open_again, &first);
    assert_eq!(change.add.allow.len(), 2);
    apply_change(&sb.node, flavor, change);
    assert_kernel_holds_view(&sb.node, flavor, &first);
    for s in &mut held {
        assert!(
            !echoes(s),
            "an open connection from outside the new ranges stops"
        );
    }
    for public in [PUBLIC4, PUBLIC6] {
        assert!(reaches(&sb.client, public, 25), "client → {public}:25");
        assert!(
            !reaches(&other, public, 25),
            "other → {public}:25 must fail"
        );
    }

    // Another pod takes the key with the same ranges: the DNAT and the
    // ranges are deleted and added back in one batch (the same intervals
    // out and in); the key never opens.
    let swapped = owned_by(&first, "mx-1");
    apply_change(&sb.node, flavor, Changes::between(&first, &swapped));
    assert_kernel_holds_view(&sb.node, flavor, &swapped);
    for public in [PUBLIC4, PUBLIC6] {
        assert!(reaches(&sb.client, public, 25), "client → {public}:25");
        assert!(
            !reaches(&other, public, 25),
            "other → {public}:25 must fail"
        );
    }

    // Ranges replaced by wider ones: the key narrows on paper (a range
    // went), but the flush keeps every source still admitted — the
    // client's open connections go on.
    let mut held: Vec<TcpStream> = [PUBLIC4, PUBLIC6]
        .iter()
        .map(|p| open(&sb.client, p, 25).expect("client connection"))
        .collect();
    let wider = owned_by(
        &rules(&[(PUBLIC4, "203.0.113.0/29"), (PUBLIC6, "2001:db8::/125")]),
        "mx-1",
    );
    let report = apply_change(&sb.node, flavor, Changes::between(&swapped, &wider));
    assert_eq!(report.admission.len(), 2);
    assert_kernel_holds_view(&sb.node, flavor, &wider);
    for s in &mut held {
        assert!(
            echoes(s),
            "a connection from a range still admitted goes on"
        );
    }
    drop(held);
    // The wider ranges list the node's own address (…7): with local access
    // the node now reaches the pod through the key.
    for public in [PUBLIC4, PUBLIC6] {
        assert!(reaches(&sb.node, public, 25), "node → {public}:25 listed");
    }

    sb.node
        .run(move || flavor_backend(flavor, Families::DUAL).cleanup())
        .unwrap();
    assert_eq!(
        without_counters(&ruleset(&sb.node)),
        crowd,
        "cleanup leaves the crowd as it was (handles included)"
    );
}

/// The agent's table as the versions before made it (marked, without the
/// allow-lists' and the counters' sets and chains; then without the
/// counters'): read as the agent's own, then rebuilt once by the next apply
/// with the same elements (no mapping added or removed).
#[test]
fn a_table_of_an_earlier_layout_is_rebuilt_with_its_elements() {
    let before_allow_lists: &[&str] = &[
        "set source_",
        "chain source_",
        "set mapping_traffic",
        "chain traffic_",
    ];
    let before_counters: &[&str] = &["set mapping_traffic", "chain traffic_"];
    for (tag, dropped, ranges) in [
        ("src-up", before_allow_lists, &[][..]),
        (
            "src-up2",
            before_counters,
            &[(PUBLIC4, "203.0.113.0/30")][..],
        ),
    ] {
        let ns = Netns::new(tag);
        crowd_dual(&ns);
        let v4 = rules(ranges).of_family(Family::Ipv4);
        let text = view::nft_with(&v4, &names(), Family::Ipv4, true);
        // Drop the blocks of what the layout did not have yet (each ends
        // at a blank line or at the table's end).
        let body = text.trim_end().strip_suffix('}').unwrap();
        let old: Vec<&str> = body
            .split("\n\n")
            .filter(|b| !dropped.iter().any(|d| b.trim_start().starts_with(d)))
            .collect();
        let old = format!("{}\n}}\n", old.join("\n\n").trim_end());
        assert!(!old.contains("traffic"), "{old}");
        ns.sh(&format!("nft -f - <<'EOF'\n{old}EOF"));
        let expected = v4.clone();
        let back = ns.run(|| backend_of(Families::default()).read()).unwrap();
        assert_eq!(back, expected, "{tag}: read as the agent's own");
        let report = ns
            .run(move || backend_of(Families::default()).apply(&v4))
            .unwrap();
        assert!(report.rebuilt, "{tag}: {report:?}");
        assert!(report.added_dnat.is_empty() && report.removed_dnat.is_empty());
        assert_eq!(
            view::canonical_nft(&ns.sh("nft list table ip podnat")),
            view::canonical_nft(&text),
            "{tag}"
        );
        let again = expected.clone();
        let report = ns
            .run(move || backend_of(Families::default()).apply(&again))
            .unwrap();
        assert_eq!(report.messages, 0, "{tag}: rebuilt once");
    }
}

/// Someone turns the drop rule around (same expressions, the lookup no
/// longer inverted: only the allowed sources would be dropped): the next
/// apply sees the layout drifted and rebuilds it.
#[test]
fn a_tampered_source_rule_is_rebuilt() {
    let ns = Netns::new("src-tamper");
    crowd_dual(&ns);
    let v4 = rules(&[(PUBLIC4, "203.0.113.0/30")]).of_family(Family::Ipv4);
    let r = v4.clone();
    ns.run(move || backend_of(Families::default()).apply(&r))
        .unwrap();
    ns.sh(
        "nft flush chain ip podnat source_prerouting && \
         nft add rule ip podnat source_prerouting ip daddr . meta l4proto . th dport @source_restricted \
         ip daddr . meta l4proto . th dport . ip saddr @source_allowed drop",
    );
    let r = v4.clone();
    let report = ns
        .run(move || backend_of(Families::default()).apply(&r))
        .unwrap();
    assert!(report.rebuilt, "{report:?}");
    assert_eq!(
        view::canonical_nft(&ns.sh("nft list table ip podnat")),
        view::canonical_nft(&view::nft_with(&v4, &names(), Family::Ipv4, true))
    );
}

/// On a kernel before 5.6 (no concatenated interval sets, nor element
/// counters a lookup updates) the flavor's layout has no source or traffic
/// sets or chains: it is applied, read back as whole
/// (a second apply sends nothing), and rules with ranges are refused with
/// nothing applied.
#[test]
fn without_interval_concatenations_the_layout_has_no_source_objects() {
    use podnat_controller::firewall::flavors::nftables::{Features, NftablesBackend};
    let ns = Netns::new("src-old");
    crowd_dual(&ns);
    let old = || NftablesBackend::with_features(names(), Families::DUAL, true, Features::NONE);
    let open = rules(&[]);
    let r = open.clone();
    ns.run(move || old().apply(&r)).unwrap();
    let listing = ns.sh("nft list table ip podnat; nft list table ip6 podnat");
    assert!(
        !listing.contains("source_") && !listing.contains("traffic"),
        "{listing}"
    );
    let r = open.clone();
    let again = ns.run(move || old().apply(&r)).unwrap();
    assert_eq!(again.messages, 0, "{again:?}");
    // The backend's rule view is this layout's, as nft lists it.
    let view = old().view(&open);
    assert_eq!(
        view::canonical_nft(&listing),
        view::canonical_nft(&view.replace("# ipv4\n", "").replace("# ipv6\n", "")),
    );
    let ranged = rules(&[(PUBLIC4, "203.0.113.0/30")]);
    let err = ns.run(move || old().apply(&ranged)).unwrap_err();
    assert_eq!(err.metric_label(), "unsupported", "{err}");
    let err = err.to_string();
    assert!(err.contains("need Linux 5.6"), "{err}");
    let after = ns.sh("nft list table ip podnat; nft list table ip6 podnat");
    assert_eq!(after, listing, "nothing applied");
    ns.run(move || old().cleanup()).unwrap();
}

/// On Linux 5.6 (interval concatenations, no element counters a lookup
/// updates) the layout has the allow-lists and no counters: ranges are
/// enforced, nothing is counted, the view is that layout's, and a second
/// apply sends nothing.
#[test]
fn on_linux_5_6_the_allow_lists_stay_without_counters() {
    use podnat_controller::firewall::flavors::nftables::{Features, NftablesBackend};
    let ns = Netns::new("src-56");
    crowd_dual(&ns);
    let old =
        || NftablesBackend::with_features(names(), Families::DUAL, true, Features::SOURCES_ONLY);
    let ranged = rules(&[(PUBLIC4, "203.0.113.0/30"), (PUBLIC6, "2001:db8::/126")]);
    let r = ranged.clone();
    ns.run(move || old().apply(&r)).unwrap();
    let listing = ns.sh("nft list table ip podnat; nft list table ip6 podnat");
    assert!(
        listing.contains("source_allowed") && !listing.contains("traffic"),
        "{listing}"
    );
    let view = old().view(&ranged);
    assert_eq!(
        view::canonical_nft(&listing),
        view::canonical_nft(&view.replace("# ipv4\n", "").replace("# ipv6\n", "")),
    );
    let r = ranged.clone();
    let again = ns.run(move || old().apply(&r)).unwrap();
    assert_eq!(again.messages, 0, "{again:?}");
    let read = ns.run(move || old().read()).unwrap();
    assert_eq!(read, ranged);
    ns.run(move || old().cleanup()).unwrap();
}

/// A UDP flow from a range that is removed stops (both flavors, both
/// families): the nftables flavor drops its next datagrams, the iptables
/// flavor's conntrack flush makes them miss the DNAT; the same flow admitted
/// again reaches the pod again (its entries that went to the node are
/// flushed), as does a flow that was sending before the mapping existed.
#[test]
fn a_udp_flow_from_a_removed_range_stops() {
    for (flavor, tag) in [(Flavor::Nftables, "srcu"), (Flavor::Iptables, "srcui")] {
        let sb = Sandbox::new(tag).with_ipv6();
        crowd_dual(&sb.node);
        let udp = |ranges: &[(&str, &str)]| {
            let mut r = RuleSet::default();
            for (public, pod) in [(PUBLIC4, POD_A_IP), (PUBLIC6, POD_A_IP6)] {
                publish(&mut r, "mail:mx-0", public, 5353, Proto::Udp, pod, 5353);
            }
            for (public, source) in ranges {
                let mut a = allow(public, 5353, source);
                a.key.proto = Proto::Udp;
                r.allow.push(a);
            }
            r.normalize();
            r
        };
        // The client (203.0.113.1, 2001:db8::1) in, then out.
        let first = udp(&[(PUBLIC4, "203.0.113.0/30"), (PUBLIC6, "2001:db8::/126")]);
        let second = udp(&[(PUBLIC4, "198.51.100.0/24"), (PUBLIC6, "2001:db8:5::/64")]);
        let sink = sb
            .pod_a
            .run(|| std::net::UdpSocket::bind("[::]:5353").unwrap());
        sink.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let client = sb
            .client
            .run(|| std::net::UdpSocket::bind("[::]:4000").unwrap());
        // The peer sends before the mapping exists: its datagrams go to the
        // node, and conntrack remembers that (un-DNATed) until the new
        // mapping's flush.
        for public in [PUBLIC4, PUBLIC6] {
            let to = SocketAddr::new(public.parse().unwrap(), 5353);
            client.send_to(&[0], to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        apply_table(&sb.node, flavor, &first);
        let flows = |n: u8| -> usize {
            for public in [PUBLIC4, PUBLIC6] {
                let to = SocketAddr::new(public.parse().unwrap(), 5353);
                client.send_to(&[n], to).unwrap();
            }
            let mut got = 0;
            let mut b = [0u8; 8];
            while let Ok((len, _)) = sink.recv_from(&mut b) {
                got += usize::from(len == 1 && b[0] == n);
            }
            got
        };
        assert_eq!(flows(1), 2, "{flavor:?}: the flow runs in both families");
        apply_change(&sb.node, flavor, Changes::between(&first, &second));
        assert_eq!(
            flows(2),
            0,
            "{flavor:?}: the flow from the removed range stops"
        );
        apply_change(&sb.node, flavor, Changes::between(&second, &first));
        assert_eq!(flows(3), 2, "{flavor:?}: back in range, it runs again");
    }
}
