//! Public address detection against the real kernel. Every test builds its
//! own network namespace with veth links and documentation-range "public"
//! addresses; nothing touches the host's interfaces. (veth, not dummy: this
//! machine's kernel has no dummy driver, and a veth pair with both ends up
//! looks like a NIC: carrier and operational state UP.)

#[path = "support/netns.rs"]
mod netns;

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netns::Netns;
use podnat_controller::model::{DualStack, Families};
use podnat_controller::net::address::{
    detect_once, spawn_watcher, AddressFilter, Choice, FilterRule, SkipReason,
};
use tokio::sync::watch;

/// The issue asks for a change to be published within a second; the
/// watcher's own delay is a 20 ms debounce, so this only catches a watcher
/// that missed the event, not a slow one.
const PUBLISH_WITHIN: Duration = Duration::from_secs(1);

/// Shell function `link NAME [INDEX]`: a veth pair NAME / NAMEp, both ends
/// up, NAME at interface index INDEX when given (the peer at INDEX+1).
const LINK_FN: &str = r#"link() {
    if [ -n "$2" ]; then
        ip link add "$1" index "$2" type veth peer name "$1p" index "$(($2 + 1))"
    else
        ip link add "$1" type veth peer name "$1p"
    fi
    ip link set "$1p" up && ip link set "$1" up
}
"#;

fn sh(ns: &Netns, script: &str) -> String {
    ns.sh(&format!("set -e\n{LINK_FN}{script}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The chosen addresses, at most one per family (`&[]` for none).
fn stack(addrs: &[&str]) -> DualStack {
    addrs.iter().map(|a| ip(a)).collect()
}

/// Runs `fut` on a current-thread runtime on a thread inside `ns`, so the
/// rtnetlink sockets it opens (and every task it spawns) live in `ns`.
fn block_on_in<T: Send>(ns: &Netns, fut: impl Future<Output = T> + Send) -> T {
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build tokio runtime")
            .block_on(fut)
    })
}

fn detect(ns: &Netns, filter: &AddressFilter) -> Choice {
    block_on_in(ns, async {
        detect_once(filter).await.expect("detect_once")
    })
}

fn reason_for(choice: &Choice, addr: &str) -> SkipReason {
    choice
        .skipped
        .iter()
        .find(|(a, _)| *a == ip(addr))
        .map(|(_, why)| why.clone())
        .unwrap_or_else(|| panic!("{addr} not in skipped list of {choice}"))
}

/// Waits until the watcher publishes `want` as its choice (`&[]`: none).
async fn published(rx: &mut watch::Receiver<Choice>, want: &[&str]) {
    published_within(rx, want, PUBLISH_WITHIN).await;
}

async fn published_within(rx: &mut watch::Receiver<Choice>, want: &[&str], within: Duration) {
    let want = stack(want);
    let waited = tokio::time::timeout(within, rx.wait_for(|c| c.chosen == want))
        .await
        .map(|seen| seen.map(|_| ()));
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("watcher stopped while waiting for {want}: {e}"),
        Err(_) => panic!(
            "watcher did not publish {want} within {within:?}; it has {}",
            *rx.borrow()
        ),
    }
}

/// One namespace with a private, a lab and a public address on three links.
fn three_links(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    sh(
        &ns,
        "link d0 && link d1 && link d2
         ip addr add 10.1.0.2/24 dev d0
         ip addr add 192.168.5.2/24 dev d1
         ip addr add 203.0.113.7/24 dev d2",
    );
    ns
}

#[test]
fn public_address_is_chosen_over_private_ones() {
    let ns = three_links("adpub");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["203.0.113.7"]), "{c}");
    for (addr, filtered_net) in [
        ("127.0.0.1", "127.0.0.0/8"),
        ("10.1.0.2", "10.0.0.0/8"),
        ("192.168.5.2", "192.168.0.0/16"),
    ] {
        assert_eq!(
            reason_for(&c, addr),
            SkipReason::Filtered {
                net: net(filtered_net),
                rule: FilterRule::Default
            }
        );
    }
}

#[test]
fn excluded_default_network_is_allowed_again() {
    let ns = three_links("adexcl");
    ns.sh("ip addr del 203.0.113.7/24 dev d2");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&[]), "{c}");

    let c = detect(&ns, &AddressFilter::new(&[], &[net("192.168.0.0/16")]));
    assert_eq!(c.chosen, stack(&["192.168.5.2"]), "{c}");
    assert!(matches!(
        reason_for(&c, "10.1.0.2"),
        SkipReason::Filtered { .. }
    ));
}

#[test]
fn included_network_is_filtered_and_reported() {
    let ns = three_links("adincl");
    let c = detect(&ns, &AddressFilter::new(&[net("203.0.113.0/24")], &[]));
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert_eq!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::Filtered {
            net: net("203.0.113.0/24"),
            rule: FilterRule::Included
        }
    );
    assert!(c
        .to_string()
        .contains("203.0.113.7: in 203.0.113.0/24, listed in -inclfilternet"));

    // With the lab network allowed again, the filtered public address makes
    // way for it.
    let c = detect(
        &ns,
        &AddressFilter::new(&[net("203.0.113.0/24")], &[net("192.168.0.0/16")]),
    );
    assert_eq!(c.chosen, stack(&["192.168.5.2"]), "{c}");
}

#[test]
fn lower_ifindex_wins() {
    let ns = Netns::new("adidx");
    // Created first, numerically lower address, but the higher index.
    sh(
        &ns,
        "link pb 60 && ip addr add 198.51.100.1/24 dev pb
         link pa 40 && ip addr add 203.0.113.7/24 dev pa",
    );
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["203.0.113.7"]), "{c}");
    assert_eq!(
        reason_for(&c, "198.51.100.1"),
        SkipReason::NotFirst {
            chosen: ip("203.0.113.7")
        }
    );

    ns.sh("ip link set pa down");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["198.51.100.1"]), "{c}");
    assert!(matches!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::LinkDown { index: 40, .. }
    ));
}

#[test]
fn secondary_is_not_chosen_over_primary() {
    let ns = Netns::new("adsec");
    // .7 comes second in the same subnet, so the kernel makes it secondary.
    sh(
        &ns,
        "link d0
         ip addr add 203.0.113.9/24 dev d0
         ip addr add 203.0.113.7/24 dev d0",
    );
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["203.0.113.9"]), "{c}");
    assert_eq!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::Secondary { link: "d0".into() }
    );

    // Not even when the primary is filtered.
    let c = detect(&ns, &AddressFilter::new(&[net("203.0.113.9/32")], &[]));
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert!(matches!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::Secondary { .. }
    ));
}

#[test]
fn link_without_carrier_is_ignored() {
    let ns = Netns::new("adcar");
    // v0 is up but its peer is down: no carrier.
    ns.sh("ip link add v0 type veth peer name v1
         ip addr add 203.0.113.7/24 dev v0
         ip link set v0 up");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert!(matches!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::LinkDown { .. }
    ));

    ns.sh("ip link set v1 up");
    // The kernel sets the operational state UP asynchronously (linkwatch
    // runs deferred): wait for it, then the address is chosen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ns.sh("ip -o link show v0").contains("state UP") {
        assert!(std::time::Instant::now() < deadline, "v0 never came up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["203.0.113.7"]), "{c}");
}

#[test]
fn operational_state_unknown_counts_as_up() {
    // Loopback, like dummy and tun links, reports UNKNOWN while it works.
    let ns = Netns::new("adunk");
    let c = detect(&ns, &AddressFilter::new(&[], &[net("127.0.0.0/8")]));
    assert_eq!(c.chosen, stack(&["127.0.0.1"]), "{c}");
}

#[test]
fn watcher_follows_address_and_link_changes() {
    let ns = Netns::new("adwatch");
    sh(&ns, "link d0 && ip addr add 10.1.0.2/24 dev d0 && link d1");
    block_on_in(&ns, async {
        let (mut rx, task) = spawn_watcher(AddressFilter::default())
            .await
            .expect("spawn_watcher");
        assert_eq!(rx.borrow_and_update().chosen, stack(&[]));

        ns.sh("ip addr add 203.0.113.7/24 dev d1");
        published(&mut rx, &["203.0.113.7"]).await;

        ns.sh("ip addr del 203.0.113.7/24 dev d1");
        published(&mut rx, &[]).await;

        ns.sh("ip addr add 203.0.113.7/24 dev d1");
        published(&mut rx, &["203.0.113.7"]).await;

        ns.sh("ip link set d1 down");
        published(&mut rx, &[]).await;
        assert!(matches!(
            reason_for(&rx.borrow(), "203.0.113.7"),
            SkipReason::LinkDown { .. }
        ));

        ns.sh("ip link set d1 up");
        published(&mut rx, &["203.0.113.7"]).await;

        // The watcher stops by itself once nobody listens.
        drop(rx);
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watcher task ended after its receiver was dropped");
        ended
            .expect("watcher task panicked")
            .expect("watcher task result");
    });
}

#[test]
fn watcher_starts_with_the_current_address() {
    let ns = three_links("adinit");
    block_on_in(&ns, async {
        let (rx, _task) = spawn_watcher(AddressFilter::default())
            .await
            .expect("spawn_watcher");
        assert_eq!(rx.borrow().chosen, stack(&["203.0.113.7"]));
    });
}

#[test]
fn watcher_follows_a_promoted_secondary() {
    let ns = Netns::new("adprom");
    // With promote_secondaries the kernel turns .7 into the primary when .9
    // goes, instead of deleting it along with .9.
    sh(
        &ns,
        "link d0
         sysctl -qw net.ipv4.conf.d0.promote_secondaries=1
         ip addr add 203.0.113.9/24 dev d0
         ip addr add 203.0.113.7/24 dev d0",
    );
    block_on_in(&ns, async {
        let (mut rx, _task) = spawn_watcher(AddressFilter::default())
            .await
            .expect("spawn_watcher");
        assert_eq!(rx.borrow_and_update().chosen, stack(&["203.0.113.9"]));
        ns.sh("ip addr del 203.0.113.9/24 dev d0");
        published(&mut rx, &["203.0.113.7"]).await;
    });
}

// IPv6. Only 2001:db8::/32 (documentation space, which the default filter
// does not list, so it stands in for a global address) and fd00::/8.

fn dual() -> AddressFilter {
    AddressFilter::default().with_families(Families::DUAL)
}

fn v6_only() -> AddressFilter {
    AddressFilter::default().with_families(Families {
        ipv4: false,
        ipv6: true,
    })
}

/// A namespace whose links skip duplicate address detection unless a test
/// turns it on for one link (`accept_dad=0` is the namespace's default for
/// new links), so link-local and added addresses are usable at once.
fn v6_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0");
    ns
}

/// Polls `done` for up to ten seconds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The IPv6 addresses `ip -6 addr show SELECTOR` lists in `ns`.
fn v6_addrs(ns: &Netns, selector: &str) -> Vec<IpAddr> {
    ns.sh(&format!("ip -6 -o addr show {selector}"))
        .lines()
        .map(|l| {
            let a = l.split_whitespace().nth(3).expect("address column");
            a.split('/').next().unwrap().parse().expect("IPv6 address")
        })
        .collect()
}

/// Even with detection off, the kernel clears the tentative flag from a
/// work queue: waits until no address is tentative any more.
fn settled(ns: &Netns) {
    wait_until("no tentative address", || {
        v6_addrs(ns, "tentative").is_empty()
    });
}

/// d0 with a unique local, a global and a deprecated global address, and
/// its automatic link-local one.
fn v6_link(tag: &str) -> Netns {
    let ns = v6_netns(tag);
    sh(
        &ns,
        "link d0
         ip addr add fd00::1/64 dev d0 nodad
         ip addr add 2001:db8::7/64 dev d0 nodad
         ip addr add 2001:db8::d/64 dev d0 nodad preferred_lft 0",
    );
    settled(&ns);
    ns
}

#[test]
fn ipv6_global_address_is_chosen_and_the_rest_explained() {
    let ns = v6_link("ad6pub");
    let link_local = v6_addrs(&ns, "dev d0 scope link");
    assert_eq!(link_local.len(), 1, "{link_local:?}");
    assert!(
        v6_addrs(&ns, "dev d0 deprecated").contains(&ip("2001:db8::d")),
        "preferred_lft 0 did not make 2001:db8::d deprecated"
    );

    let c = detect(&ns, &dual());
    assert_eq!(c.chosen, stack(&["2001:db8::7"]), "{c}");
    for (addr, filtered_net) in [
        ("::1".to_string(), "::1/128"),
        (link_local[0].to_string(), "fe80::/10"),
        ("fd00::1".to_string(), "fc00::/7"),
        ("127.0.0.1".to_string(), "127.0.0.0/8"),
    ] {
        assert_eq!(
            reason_for(&c, &addr),
            SkipReason::Filtered {
                net: net(filtered_net),
                rule: FilterRule::Default
            },
            "{addr}"
        );
    }
    assert_eq!(
        reason_for(&c, "2001:db8::d"),
        SkipReason::NotValid {
            link: "d0".into(),
            flag: "deprecated"
        }
    );
    // Every IPv6 address in the namespace was considered (the peer's
    // link-local one included).
    for a in v6_addrs(&ns, "") {
        assert!(
            c.chosen.iter().any(|x| x == a) || c.skipped.iter().any(|(x, _)| *x == a),
            "{a} missing from {c}"
        );
    }

    // IPv6 alone: the same choice, and no IPv4 address considered.
    let c6 = detect(&ns, &v6_only());
    assert_eq!(c6.chosen, stack(&["2001:db8::7"]), "{c6}");
    assert!(c6.skipped.iter().all(|(a, _)| a.is_ipv6()), "{c6}");
    assert_eq!(c6.skipped.len(), c.skipped.len() - 1, "{c6} / {c}");

    // IPv4 alone (the default): the IPv6 addresses are not even skipped.
    let c4 = detect(&ns, &AddressFilter::default());
    assert_eq!(c4.chosen, stack(&[]), "{c4}");
    assert_eq!(
        c4.skipped,
        vec![(
            ip("127.0.0.1"),
            SkipReason::Filtered {
                net: net("127.0.0.0/8"),
                rule: FilterRule::Default
            }
        )]
    );
}

#[test]
fn ipv6_filter_networks_include_and_exclude() {
    let ns = v6_link("ad6filt");
    let incl = [net("2001:db8::/64")];
    let c = detect(
        &ns,
        &AddressFilter::new(&incl, &[]).with_families(Families::DUAL),
    );
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert_eq!(
        reason_for(&c, "2001:db8::7"),
        SkipReason::Filtered {
            net: net("2001:db8::/64"),
            rule: FilterRule::Included
        }
    );
    assert!(c
        .to_string()
        .contains("2001:db8::7: in 2001:db8::/64, listed in -inclfilternet"));

    // With unique local addresses allowed again, fd00::1 makes up for it.
    let c = detect(
        &ns,
        &AddressFilter::new(&incl, &[net("fd00::/8")]).with_families(Families::DUAL),
    );
    assert_eq!(c.chosen, stack(&["fd00::1"]), "{c}");
    // The deprecated address stays invalid whatever the filter says.
    assert!(matches!(
        reason_for(&c, "2001:db8::d"),
        SkipReason::NotValid { .. }
    ));
}

#[test]
fn ipv6_temporary_address_is_never_chosen() {
    // `ip addr add ... temporary` cannot make one: iproute2 warns "temporary
    // option is not mutable from userspace" and the kernel drops the flag.
    // The kernel's own privacy extensions make one next to an address
    // flagged mngtmpaddr.
    let ns = v6_netns("ad6tmp");
    sh(
        &ns,
        "link d0
         sysctl -qw net.ipv6.conf.d0.use_tempaddr=2
         ip addr add 2001:db8:1::9/64 dev d0 mngtmpaddr nodad",
    );
    settled(&ns);
    let temporary = v6_addrs(&ns, "dev d0 temporary");
    assert_eq!(temporary.len(), 1, "{temporary:?}");
    let temporary = temporary[0].to_string();
    assert!(net("2001:db8:1::/64").contains(&ip(&temporary)));

    let c = detect(&ns, &dual());
    assert_eq!(c.chosen, stack(&["2001:db8:1::9"]), "{c}");
    assert_eq!(
        reason_for(&c, &temporary),
        SkipReason::Temporary { link: "d0".into() }
    );

    // Not even when the stable address is filtered.
    let c = detect(
        &ns,
        &AddressFilter::new(&[net("2001:db8:1::9/128")], &[]).with_families(Families::DUAL),
    );
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert_eq!(
        reason_for(&c, &temporary),
        SkipReason::Temporary { link: "d0".into() }
    );
}

#[test]
fn ipv6_tentative_address_is_skipped() {
    let ns = v6_netns("ad6tent");
    sh(&ns, "link d0");
    settled(&ns);
    // A hundred probes a second apart: tentative for a hundred seconds,
    // long after this test is done.
    sh(
        &ns,
        "sysctl -qw net.ipv6.conf.d0.accept_dad=1 net.ipv6.conf.d0.dad_transmits=100
         ip addr add 2001:db8::5/64 dev d0",
    );
    assert!(v6_addrs(&ns, "dev d0 tentative").contains(&ip("2001:db8::5")));
    let c = detect(&ns, &dual());
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert_eq!(
        reason_for(&c, "2001:db8::5"),
        SkipReason::NotValid {
            link: "d0".into(),
            flag: "tentative"
        }
    );
}

#[test]
fn ipv6_address_that_failed_dad_is_skipped() {
    // The peer end lives in a namespace of its own that already holds the
    // address, so it answers d1's probe.
    let ns = v6_netns("ad6dad");
    let peer = Netns::new("ad6dadp");
    sh(
        &ns,
        &format!("ip link add d1 type veth peer name d1p netns {}", peer.name),
    );
    peer.sh("ip addr add 2001:db8::99/64 dev d1p nodad && ip link set d1p up");
    sh(&ns, "ip link set d1 up");
    settled(&ns);
    sh(
        &ns,
        "sysctl -qw net.ipv6.conf.d1.accept_dad=1 net.ipv6.conf.d1.router_solicitation_delay=0
         ip addr add 2001:db8::99/64 dev d1",
    );
    wait_until("2001:db8::99 to fail detection", || {
        v6_addrs(&ns, "dev d1 dadfailed").contains(&ip("2001:db8::99"))
    });
    // The kernel keeps it tentative as well; the reason names the failure.
    assert!(v6_addrs(&ns, "dev d1 tentative").contains(&ip("2001:db8::99")));
    let c = detect(&ns, &dual());
    assert_eq!(c.chosen, stack(&[]), "{c}");
    assert_eq!(
        reason_for(&c, "2001:db8::99"),
        SkipReason::NotValid {
            link: "d1".into(),
            flag: "duplicate address detection failed"
        }
    );
}

#[test]
fn watcher_follows_ipv6_changes_per_family() {
    let ns = v6_netns("ad6watch");
    sh(
        &ns,
        "link d0 && link d1
         ip addr add 203.0.113.7/24 dev d0
         ip addr add 2001:db8::7/64 dev d0 nodad",
    );
    settled(&ns);
    block_on_in(&ns, async {
        let (mut rx, task) = spawn_watcher(dual()).await.expect("spawn_watcher");
        assert_eq!(
            rx.borrow_and_update().chosen,
            stack(&["203.0.113.7", "2001:db8::7"])
        );

        // The IPv6 address goes; the IPv4 one stays.
        ns.sh("ip addr del 2001:db8::7/64 dev d0");
        published(&mut rx, &["203.0.113.7"]).await;

        ns.sh("ip addr add 2001:db8::8/64 dev d1 nodad");
        published(&mut rx, &["203.0.113.7", "2001:db8::8"]).await;

        // Back on d0 (the lower index), after duplicate address detection
        // of about 200 ms: the address is tentative at first, and the
        // kernel's event for the end of detection re-targets the choice.
        ns.sh(
            "sysctl -qw net.ipv6.conf.d0.accept_dad=1 net.ipv6.conf.d0.router_solicitation_delay=0 net.ipv6.neigh.d0.retrans_time_ms=200
             ip addr add 2001:db8::7/64 dev d0",
        );
        published_within(
            &mut rx,
            &["203.0.113.7", "2001:db8::7"],
            PUBLISH_WITHIN + Duration::from_secs(2),
        )
        .await;

        // The IPv4 address goes; the IPv6 one stays.
        ns.sh("ip addr del 203.0.113.7/24 dev d0");
        published(&mut rx, &["2001:db8::7"]).await;

        // d0 down takes its IPv6 addresses along; d1's is next.
        ns.sh("ip link set d0 down");
        published(&mut rx, &["2001:db8::8"]).await;

        drop(rx);
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watcher task ended after its receiver was dropped");
        ended
            .expect("watcher task panicked")
            .expect("watcher task result");
    });
}
