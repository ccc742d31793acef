use super::*;
use proptest::prelude::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn up(index: u32, name: &str) -> LinkFacts {
    LinkFacts {
        index,
        name: name.into(),
        admin_up: true,
        carrier: true,
        oper_state: State::Unknown,
    }
}

fn addr(index: u32, a: &str) -> AddrFacts {
    AddrFacts {
        index,
        address: ip(a),
        prefix_len: 24,
        flags: AddressFlags::Permanent,
    }
}

#[test]
fn default_filter_covers_the_non_public_ranges() {
    let f = AddressFilter::default();
    for a in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.5.2",
        "169.254.1.1",
        "100.64.0.1",
        "100.127.255.254",
    ] {
        assert_eq!(
            f.filtered_by(ip(a)).map(|(_, r)| r),
            Some(FilterRule::Default),
            "{a}"
        );
    }
    for a in [
        "203.0.113.7",
        "198.51.100.1",
        "172.32.0.1",
        "100.128.0.1",
        "8.8.8.8",
    ] {
        assert_eq!(f.filtered_by(ip(a)), None, "{a}");
    }
}

#[test]
fn exclusion_allows_a_default_network_or_part_of_it() {
    let f = AddressFilter::new(&[], &[net("192.168.0.0/16")]);
    assert_eq!(f.filtered_by(ip("192.168.5.2")), None);
    assert!(f.filtered_by(ip("10.1.0.2")).is_some());

    let f = AddressFilter::new(&[], &[net("192.168.5.0/24")]);
    assert_eq!(f.filtered_by(ip("192.168.5.2")), None);
    assert_eq!(
        f.filtered_by(ip("192.168.6.2")),
        Some((net("192.168.0.0/16"), FilterRule::Default))
    );
}

#[test]
fn inclusion_filters_more_and_beats_exclusion() {
    let f = AddressFilter::new(&[net("203.0.113.0/24")], &[]);
    assert_eq!(
        f.filtered_by(ip("203.0.113.7")),
        Some((net("203.0.113.0/24"), FilterRule::Included))
    );
    assert_eq!(f.filtered_by(ip("198.51.100.1")), None);

    let f = AddressFilter::new(&[net("192.168.5.0/24")], &[net("192.168.0.0/16")]);
    assert_eq!(
        f.filtered_by(ip("192.168.5.2")),
        Some((net("192.168.5.0/24"), FilterRule::Included))
    );
    assert_eq!(f.filtered_by(ip("192.168.6.2")), None);
}

#[test]
fn filter_networks_are_truncated_to_their_prefix() {
    let f = AddressFilter::new(&[net("203.0.113.77/24")], &[]);
    assert!(f.filtered_by(ip("203.0.113.1")).is_some());
}

#[test]
fn first_public_address_is_chosen_and_the_rest_explained() {
    let links = [up(1, "lo"), up(2, "d0"), up(3, "d1"), up(4, "d2")];
    let addrs = [
        addr(1, "127.0.0.1"),
        addr(2, "10.1.0.2"),
        addr(3, "192.168.5.2"),
        addr(4, "203.0.113.7"),
    ];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.7")));
    assert_eq!(
        c.skipped,
        vec![
            (
                ip("127.0.0.1"),
                SkipReason::Filtered {
                    net: net("127.0.0.0/8"),
                    rule: FilterRule::Default
                }
            ),
            (
                ip("10.1.0.2"),
                SkipReason::Filtered {
                    net: net("10.0.0.0/8"),
                    rule: FilterRule::Default
                }
            ),
            (
                ip("192.168.5.2"),
                SkipReason::Filtered {
                    net: net("192.168.0.0/16"),
                    rule: FilterRule::Default
                }
            ),
        ]
    );
}

#[test]
fn lower_ifindex_wins_whatever_the_input_order() {
    let links = [up(9, "b"), up(3, "a")];
    let addrs = [addr(9, "198.51.100.1"), addr(3, "203.0.113.7")];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.7")));
    assert_eq!(
        c.skipped,
        vec![(
            ip("198.51.100.1"),
            SkipReason::NotFirst {
                chosen: ip("203.0.113.7")
            }
        )]
    );
}

#[test]
fn dump_order_decides_within_a_link() {
    let links = [up(2, "d0")];
    let addrs = [addr(2, "203.0.113.9"), addr(2, "198.51.100.1")];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.9")));
}

#[test]
fn secondary_is_never_chosen_even_when_its_primary_is_filtered() {
    let links = [up(2, "d0")];
    let mut secondary = addr(2, "203.0.113.7");
    secondary.flags |= AddressFlags::Secondary;
    let addrs = [addr(2, "203.0.113.9"), secondary.clone()];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.9")));
    assert_eq!(
        c.skipped,
        vec![(
            ip("203.0.113.7"),
            SkipReason::Secondary { link: "d0".into() }
        )]
    );

    let c = choose(
        &links,
        &addrs,
        &AddressFilter::new(&[net("203.0.113.9/32")], &[]),
    );
    assert_eq!(c.chosen, None);
    assert!(matches!(c.skipped[1].1, SkipReason::Secondary { .. }));
}

#[test]
fn tentative_deprecated_and_dadfailed_are_skipped() {
    let links = [up(2, "d0")];
    for (flag, name) in [
        (AddressFlags::Tentative, "tentative"),
        (AddressFlags::Deprecated, "deprecated"),
        (
            AddressFlags::Dadfailed,
            "duplicate address detection failed",
        ),
    ] {
        let mut a = addr(2, "203.0.113.7");
        a.flags |= flag;
        let c = choose(&links, &[a], &AddressFilter::default());
        assert_eq!(c.chosen, None);
        assert_eq!(
            c.skipped,
            vec![(
                ip("203.0.113.7"),
                SkipReason::NotValid {
                    link: "d0".into(),
                    flag: name
                }
            )]
        );
    }
}

#[test]
fn down_links_are_ignored() {
    let mut admin_down = up(2, "d0");
    admin_down.admin_up = false;
    let mut no_carrier = up(3, "d1");
    no_carrier.carrier = false;
    let mut dormant = up(4, "d2");
    dormant.oper_state = State::Dormant;
    let mut oper_up = up(5, "d3");
    oper_up.oper_state = State::Up;
    let links = [admin_down, no_carrier, dormant, oper_up];
    let addrs = [
        addr(2, "203.0.113.2"),
        addr(3, "203.0.113.3"),
        addr(4, "203.0.113.4"),
        addr(5, "203.0.113.5"),
    ];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, Some(ip("203.0.113.5")));
    let downs: Vec<u32> = c
        .skipped
        .iter()
        .filter_map(|(_, why)| match why {
            SkipReason::LinkDown { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(downs, vec![2, 3, 4]);
}

#[test]
fn address_without_its_link_is_skipped() {
    let c = choose(&[], &[addr(7, "203.0.113.7")], &AddressFilter::default());
    assert_eq!(c.chosen, None);
    assert_eq!(
        c.skipped,
        vec![(ip("203.0.113.7"), SkipReason::LinkMissing { index: 7 })]
    );
}

#[test]
fn nothing_to_choose_from() {
    assert_eq!(
        choose(&[], &[], &AddressFilter::default()),
        Choice::default()
    );
}

#[test]
fn link_facts_from_message() {
    let mut msg = LinkMessage::default();
    msg.header.index = 4;
    msg.header.flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Broadcast;
    msg.attributes.push(LinkAttribute::IfName("eth0".into()));
    msg.attributes.push(LinkAttribute::OperState(State::Up));
    assert_eq!(
        LinkFacts::from_message(&msg),
        LinkFacts {
            index: 4,
            name: "eth0".into(),
            admin_up: true,
            carrier: true,
            oper_state: State::Up
        }
    );
    let l = LinkFacts::from_message(&LinkMessage::default());
    assert!(!l.admin_up && !l.carrier && l.oper_state == State::Unknown);
}

#[test]
fn addr_facts_prefer_local_and_full_flags() {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.index = 3;
    msg.header.prefix_len = 32;
    // A point-to-point link: IFA_ADDRESS is the peer.
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V4(ip("203.0.113.1"))));
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(ip("203.0.113.7"))));
    msg.attributes.push(AddressAttribute::Flags(
        AddressFlags::Permanent | AddressFlags::Noprefixroute,
    ));
    assert_eq!(
        AddrFacts::from_message(&msg),
        Some(AddrFacts {
            index: 3,
            address: ip("203.0.113.7"),
            prefix_len: 32,
            flags: AddressFlags::Permanent | AddressFlags::Noprefixroute,
        })
    );

    let mut v6 = AddressMessage::default();
    v6.header.family = AddressFamily::Inet6;
    v6.attributes
        .push(AddressAttribute::Address("2001:db8::1".parse().unwrap()));
    assert_eq!(AddrFacts::from_message(&v6), None);
}

#[test]
fn addr_facts_fall_back_to_header_flags() {
    use netlink_packet_route::address::AddressHeaderFlags;
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.flags = AddressHeaderFlags::Secondary;
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V4(ip("203.0.113.7"))));
    let a = AddrFacts::from_message(&msg).unwrap();
    assert!(a.flags.contains(AddressFlags::Secondary));
}

#[test]
fn choice_display_names_every_skip() {
    let links = [up(2, "d0")];
    let c = choose(
        &links,
        &[addr(2, "10.1.0.2"), addr(2, "203.0.113.7")],
        &AddressFilter::default(),
    );
    assert_eq!(
        c.to_string(),
        "203.0.113.7 (skipped: 10.1.0.2: in 10.0.0.0/8, filtered by default (allow it with -exclfilternet 10.0.0.0/8))"
    );
    assert_eq!(Choice::default().to_string(), "none");
}

fn arb_links() -> impl Strategy<Value = Vec<LinkFacts>> {
    proptest::collection::btree_set(1u32..12, 0..6).prop_flat_map(|indexes| {
        let n = indexes.len();
        (
            Just(indexes),
            proptest::collection::vec((any::<bool>(), any::<bool>(), 0u8..8), n),
        )
            .prop_map(|(indexes, states)| {
                indexes
                    .into_iter()
                    .zip(states)
                    .map(|(index, (admin_up, carrier, oper))| LinkFacts {
                        index,
                        name: format!("l{index}"),
                        admin_up,
                        carrier,
                        oper_state: State::from(oper),
                    })
                    .collect()
            })
    })
}

fn arb_addrs() -> impl Strategy<Value = Vec<AddrFacts>> {
    let nets = prop_oneof![
        Just([203u8, 0, 113]),
        Just([198, 51, 100]),
        Just([10, 1, 0]),
        Just([192, 168, 5]),
        Just([127, 0, 0]),
    ];
    proptest::collection::vec((1u32..12, nets, 1u8..255, 0u32..0x80), 0..12).prop_map(|v| {
        v.into_iter()
            .map(|(index, [a, b, c], d, flags)| AddrFacts {
                index,
                address: Ipv4Addr::new(a, b, c, d),
                prefix_len: 24,
                flags: AddressFlags::from_bits_retain(flags),
            })
            .collect()
    })
}

fn arb_filter() -> impl Strategy<Value = AddressFilter> {
    let nets = proptest::sample::subsequence(
        vec![
            net("203.0.113.0/24"),
            net("192.168.0.0/16"),
            net("10.1.0.0/24"),
            net("198.51.100.0/25"),
        ],
        0..3,
    );
    (nets.clone(), nets).prop_map(|(incl, excl)| AddressFilter::new(&incl, &excl))
}

proptest! {
    #[test]
    fn every_address_is_chosen_or_explained_once(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
        let c = choose(&links, &addrs, &filter);
        let mut seen: Vec<Ipv4Addr> = c.skipped.iter().map(|(a, _)| *a).chain(c.chosen).collect();
        let mut given: Vec<Ipv4Addr> = addrs.iter().map(|a| a.address).collect();
        seen.sort();
        given.sort();
        prop_assert_eq!(seen, given);
    }

    #[test]
    fn the_chosen_address_passes_every_check(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
        let c = choose(&links, &addrs, &filter);
        if let Some(chosen) = c.chosen {
            let ok = addrs.iter().any(|a| {
                a.address == chosen
                    && skip_reason(links.iter().find(|l| l.index == a.index), a, &filter).is_none()
            });
            prop_assert!(ok);
            prop_assert!(filter.filtered_by(chosen).is_none());
        } else {
            let none_usable = c
                .skipped
                .iter()
                .all(|(_, why)| !matches!(why, SkipReason::NotFirst { .. }));
            prop_assert!(none_usable);
        }
    }

    #[test]
    fn only_the_order_within_a_link_matters(links in arb_links(), addrs in arb_addrs(), filter in arb_filter(), seed in any::<u64>()) {
        // Shuffle the links and interleave the links' addresses anew,
        // keeping each link's own order.
        let mut shuffled_links = links.clone();
        shuffled_links.sort_by_key(|l| (u64::from(l.index) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut regrouped = addrs.clone();
        regrouped.sort_by_key(|a| (u64::from(a.index) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        prop_assert_eq!(choose(&links, &addrs, &filter), choose(&shuffled_links, &regrouped, &filter));
    }
}
