//! Public address detection against the real kernel. Every test builds its
//! own network namespace with veth links and documentation-range "public"
//! addresses; nothing touches the host's interfaces. (veth, not dummy: this
//! machine's kernel has no dummy driver, and a veth pair with both ends up
//! looks like a NIC: carrier and operational state UP.)

#[path = "support/netns.rs"]
mod netns;

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use netns::Netns;
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

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
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

async fn published(rx: &mut watch::Receiver<Choice>, want: Option<&str>) {
    let want = want.map(ip);
    let waited = tokio::time::timeout(PUBLISH_WITHIN, rx.wait_for(|c| c.chosen == want))
        .await
        .map(|seen| seen.map(|_| ()));
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("watcher stopped while waiting for {want:?}: {e}"),
        Err(_) => panic!(
            "watcher did not publish {want:?} within {PUBLISH_WITHIN:?}; it has {}",
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
    assert_eq!(c.chosen, Some(ip("203.0.113.7")), "{c}");
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
    assert_eq!(c.chosen, None, "{c}");

    let c = detect(&ns, &AddressFilter::new(&[], &[net("192.168.0.0/16")]));
    assert_eq!(c.chosen, Some(ip("192.168.5.2")), "{c}");
    assert!(matches!(
        reason_for(&c, "10.1.0.2"),
        SkipReason::Filtered { .. }
    ));
}

#[test]
fn included_network_is_filtered_and_reported() {
    let ns = three_links("adincl");
    let c = detect(&ns, &AddressFilter::new(&[net("203.0.113.0/24")], &[]));
    assert_eq!(c.chosen, None, "{c}");
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
    assert_eq!(c.chosen, Some(ip("192.168.5.2")), "{c}");
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
    assert_eq!(c.chosen, Some(ip("203.0.113.7")), "{c}");
    assert_eq!(
        reason_for(&c, "198.51.100.1"),
        SkipReason::NotFirst {
            chosen: ip("203.0.113.7")
        }
    );

    ns.sh("ip link set pa down");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("198.51.100.1")), "{c}");
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
    assert_eq!(c.chosen, Some(ip("203.0.113.9")), "{c}");
    assert_eq!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::Secondary { link: "d0".into() }
    );

    // Not even when the primary is filtered.
    let c = detect(&ns, &AddressFilter::new(&[net("203.0.113.9/32")], &[]));
    assert_eq!(c.chosen, None, "{c}");
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
    assert_eq!(c.chosen, None, "{c}");
    assert!(matches!(
        reason_for(&c, "203.0.113.7"),
        SkipReason::LinkDown { .. }
    ));

    ns.sh("ip link set v1 up");
    let c = detect(&ns, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.7")), "{c}");
}

#[test]
fn operational_state_unknown_counts_as_up() {
    // Loopback, like dummy and tun links, reports UNKNOWN while it works.
    let ns = Netns::new("adunk");
    let c = detect(&ns, &AddressFilter::new(&[], &[net("127.0.0.0/8")]));
    assert_eq!(c.chosen, Some(ip("127.0.0.1")), "{c}");
}

#[test]
fn watcher_follows_address_and_link_changes() {
    let ns = Netns::new("adwatch");
    sh(&ns, "link d0 && ip addr add 10.1.0.2/24 dev d0 && link d1");
    block_on_in(&ns, async {
        let (mut rx, task) = spawn_watcher(AddressFilter::default())
            .await
            .expect("spawn_watcher");
        assert_eq!(rx.borrow_and_update().chosen, None);

        ns.sh("ip addr add 203.0.113.7/24 dev d1");
        published(&mut rx, Some("203.0.113.7")).await;

        ns.sh("ip addr del 203.0.113.7/24 dev d1");
        published(&mut rx, None).await;

        ns.sh("ip addr add 203.0.113.7/24 dev d1");
        published(&mut rx, Some("203.0.113.7")).await;

        ns.sh("ip link set d1 down");
        published(&mut rx, None).await;
        assert!(matches!(
            reason_for(&rx.borrow(), "203.0.113.7"),
            SkipReason::LinkDown { .. }
        ));

        ns.sh("ip link set d1 up");
        published(&mut rx, Some("203.0.113.7")).await;

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
        assert_eq!(rx.borrow().chosen, Some(ip("203.0.113.7")));
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
        assert_eq!(rx.borrow_and_update().chosen, Some(ip("203.0.113.9")));
        ns.sh("ip addr del 203.0.113.9/24 dev d0");
        published(&mut rx, Some("203.0.113.7")).await;
    });
}
