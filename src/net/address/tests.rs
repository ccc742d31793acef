use super::*;
use proptest::prelude::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The chosen addresses, at most one per family (`&[]` for none).
fn stack(addrs: &[&str]) -> DualStack {
    addrs.iter().map(|a| ip(a)).collect()
}

fn dual() -> AddressFilter {
    AddressFilter::default().with_families(Families::DUAL)
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
    let address = ip(a);
    AddrFacts {
        index,
        address,
        prefix_len: if address.is_ipv6() { 64 } else { 24 },
        flags: AddressFlags::Permanent,
    }
}

fn flagged(index: u32, a: &str, flags: AddressFlags) -> AddrFacts {
    let mut f = addr(index, a);
    f.flags |= flags;
    f
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
    assert_eq!(c.chosen, stack(&["203.0.113.7"]));
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
    assert_eq!(c.chosen, stack(&["203.0.113.7"]));
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
    assert_eq!(c.chosen, stack(&["203.0.113.9"]));
}

#[test]
fn secondary_is_never_chosen_even_when_its_primary_is_filtered() {
    let links = [up(2, "d0")];
    let mut secondary = addr(2, "203.0.113.7");
    secondary.flags |= AddressFlags::Secondary;
    let addrs = [addr(2, "203.0.113.9"), secondary.clone()];
    let c = choose(&links, &addrs, &AddressFilter::default());
    assert_eq!(c.chosen, stack(&["203.0.113.9"]));
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
    assert_eq!(c.chosen, stack(&[]));
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
        assert_eq!(c.chosen, stack(&[]));
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
    assert_eq!(c.chosen, stack(&["203.0.113.5"]));
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
    assert_eq!(c.chosen, stack(&[]));
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
        .push(AddressAttribute::Address(ip("203.0.113.1")));
    msg.attributes
        .push(AddressAttribute::Local(ip("203.0.113.7")));
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

    // Neither an address of another family in the message nor a message of
    // another family counts.
    let mut mixed = AddressMessage::default();
    mixed.header.family = AddressFamily::Inet;
    mixed
        .attributes
        .push(AddressAttribute::Address(ip("2001:db8::1")));
    assert_eq!(AddrFacts::from_message(&mixed), None);
    let mut other = AddressMessage::default();
    other.header.family = AddressFamily::Packet;
    other
        .attributes
        .push(AddressAttribute::Address(ip("203.0.113.7")));
    assert_eq!(AddrFacts::from_message(&other), None);
}

#[test]
fn addr_facts_from_an_ipv6_message() {
    let mut v6 = AddressMessage::default();
    v6.header.family = AddressFamily::Inet6;
    v6.header.index = 5;
    v6.header.prefix_len = 64;
    v6.attributes
        .push(AddressAttribute::Address(ip("2001:db8::1")));
    v6.attributes.push(AddressAttribute::Flags(
        AddressFlags::Permanent | AddressFlags::Nodad,
    ));
    assert_eq!(
        AddrFacts::from_message(&v6),
        Some(AddrFacts {
            index: 5,
            address: ip("2001:db8::1"),
            prefix_len: 64,
            flags: AddressFlags::Permanent | AddressFlags::Nodad,
        })
    );

    // An IPv4 address in an IPv6 message is not taken for it.
    let mut mixed = AddressMessage::default();
    mixed.header.family = AddressFamily::Inet6;
    mixed
        .attributes
        .push(AddressAttribute::Address(ip("203.0.113.7")));
    assert_eq!(AddrFacts::from_message(&mixed), None);
}

#[test]
fn addr_facts_of_a_temporary_ipv6_address_from_header_flags() {
    use netlink_packet_route::address::AddressHeaderFlags;
    // IFA_F_TEMPORARY shares IFA_F_SECONDARY's bit.
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg.header.flags = AddressHeaderFlags::Secondary;
    msg.attributes
        .push(AddressAttribute::Address(ip("2001:db8::9")));
    let a = AddrFacts::from_message(&msg).unwrap();
    let c = choose(&[up(0, "d0")], &[a], &dual());
    assert_eq!(
        c.skipped,
        vec![(
            ip("2001:db8::9"),
            SkipReason::Temporary { link: "d0".into() }
        )]
    );
}

#[test]
fn addr_facts_fall_back_to_header_flags() {
    use netlink_packet_route::address::AddressHeaderFlags;
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.flags = AddressHeaderFlags::Secondary;
    msg.attributes
        .push(AddressAttribute::Address(ip("203.0.113.7")));
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

/// `IFA_F_TEMPORARY` has no name in netlink-packet-route: it is the bit of
/// `IFA_F_SECONDARY`.
const TEMPORARY: AddressFlags = AddressFlags::Secondary;

fn filtered(n: &str, rule: FilterRule) -> SkipReason {
    SkipReason::Filtered { net: net(n), rule }
}

#[test]
fn default_v6_filter_covers_the_non_global_ranges() {
    let f = dual();
    for (a, n) in [
        ("::1", "::1/128"),
        ("fe80::1", "fe80::/10"),
        ("febf:ffff::1", "fe80::/10"),
        ("fc00::1", "fc00::/7"),
        ("fd00::1", "fc00::/7"),
        ("ff02::1", "ff00::/8"),
        ("::ffff:203.0.113.7", "::ffff:0:0/96"),
        ("64:ff9b::cb00:7107", "64:ff9b::/96"),
    ] {
        assert_eq!(
            f.filtered_by(ip(a)),
            Some((net(n), FilterRule::Default)),
            "{a}"
        );
    }
    for a in [
        "2001:db8::7",
        "2001:db8:1::9",
        "2606:4700::1111",
        "::2",
        "fec0::1",
        "64:ff9b:1::1",
    ] {
        assert_eq!(f.filtered_by(ip(a)), None, "{a}");
    }
    // Every default network is covered above, and only IPv6 ones filter
    // IPv6 addresses: 203.0.113.7 stays public although ::ffff:203.0.113.7
    // is filtered.
    assert_eq!(DEFAULT_FILTERED_V6.len(), 6);
    assert_eq!(f.filtered_by(ip("203.0.113.7")), None);
}

#[test]
fn each_default_v6_network_is_skipped_with_its_reason() {
    let links = [up(1, "lo"), up(2, "d0")];
    let addrs = [
        addr(1, "::1"),
        addr(2, "fe80::a8c4:60ff:fe10:b662"),
        addr(2, "fd00::1"),
        addr(2, "ff02::1"),
        addr(2, "::ffff:203.0.113.7"),
        addr(2, "64:ff9b::cb00:7107"),
        addr(2, "2001:db8::7"),
    ];
    let c = choose(&links, &addrs, &dual());
    assert_eq!(c.chosen, stack(&["2001:db8::7"]));
    assert_eq!(
        c.skipped,
        // d0's IPv6 addresses oldest first: the reverse of the dump.
        vec![
            (ip("::1"), filtered("::1/128", FilterRule::Default)),
            (
                ip("64:ff9b::cb00:7107"),
                filtered("64:ff9b::/96", FilterRule::Default)
            ),
            (
                ip("::ffff:203.0.113.7"),
                filtered("::ffff:0:0/96", FilterRule::Default)
            ),
            (ip("ff02::1"), filtered("ff00::/8", FilterRule::Default)),
            (ip("fd00::1"), filtered("fc00::/7", FilterRule::Default)),
            (
                ip("fe80::a8c4:60ff:fe10:b662"),
                filtered("fe80::/10", FilterRule::Default)
            ),
        ]
    );
    assert_eq!(
        reason_display(&c, "fd00::1"),
        "in fc00::/7, filtered by default (allow it with -exclfilternet fc00::/7)"
    );
}

fn reason_display(c: &Choice, a: &str) -> String {
    c.skipped
        .iter()
        .find(|(x, _)| *x == ip(a))
        .map(|(_, why)| why.to_string())
        .unwrap_or_else(|| panic!("{a} not skipped in {c}"))
}

#[test]
fn global_v6_address_is_chosen_first_by_ifindex_then_oldest() {
    let links = [up(3, "d1"), up(2, "d0")];
    // As the kernel dumps them: on d0, ::9 was added after ::7 (a new IPv6
    // address goes ahead of the older ones of its scope).
    let addrs = [
        addr(3, "2001:db8::1"),
        addr(2, "2001:db8::9"),
        addr(2, "2001:db8::7"),
    ];
    let c = choose(&links, &addrs, &dual());
    assert_eq!(c.chosen, stack(&["2001:db8::7"]));
    assert_eq!(
        c.skipped,
        vec![
            (
                ip("2001:db8::9"),
                SkipReason::NotFirst {
                    chosen: ip("2001:db8::7")
                }
            ),
            (
                ip("2001:db8::1"),
                SkipReason::NotFirst {
                    chosen: ip("2001:db8::7")
                }
            ),
        ]
    );
    assert_eq!(c.to_string().split(' ').next(), Some("2001:db8::7"));
}

#[test]
fn temporary_deprecated_tentative_and_dadfailed_v6_are_skipped() {
    let links = [up(2, "d0")];
    for (flag, why) in [
        (TEMPORARY, SkipReason::Temporary { link: "d0".into() }),
        (
            AddressFlags::Tentative,
            SkipReason::NotValid {
                link: "d0".into(),
                flag: "tentative",
            },
        ),
        (
            AddressFlags::Deprecated,
            SkipReason::NotValid {
                link: "d0".into(),
                flag: "deprecated",
            },
        ),
        (
            AddressFlags::Dadfailed,
            SkipReason::NotValid {
                link: "d0".into(),
                flag: "duplicate address detection failed",
            },
        ),
        // The kernel keeps a permanent address whose detection failed as
        // tentative too; it says which of the two for good.
        (
            AddressFlags::Dadfailed | AddressFlags::Tentative,
            SkipReason::NotValid {
                link: "d0".into(),
                flag: "duplicate address detection failed",
            },
        ),
        // A temporary address is temporary first, whatever else it is.
        (
            TEMPORARY | AddressFlags::Deprecated,
            SkipReason::Temporary { link: "d0".into() },
        ),
    ] {
        let addrs = [flagged(2, "2001:db8:1::9", flag), addr(2, "2001:db8::7")];
        let c = choose(&links, &addrs, &dual());
        assert_eq!(c.chosen, stack(&["2001:db8::7"]), "{flag:?}");
        assert_eq!(c.skipped, vec![(ip("2001:db8:1::9"), why)], "{flag:?}");

        let c = choose(&links, &addrs[..1], &dual());
        assert_eq!(c.chosen, stack(&[]), "{flag:?}");
    }
    assert_eq!(
        SkipReason::Temporary { link: "d0".into() }.to_string(),
        "temporary (privacy) address on d0; it changes by design"
    );
}

#[test]
fn secondary_bit_means_temporary_only_for_ipv6() {
    let links = [up(2, "d0")];
    let addrs = [
        addr(2, "203.0.113.9"),
        flagged(2, "203.0.113.7", AddressFlags::Secondary),
        flagged(2, "2001:db8::9", TEMPORARY),
    ];
    let c = choose(&links, &addrs, &dual());
    assert_eq!(c.chosen, stack(&["203.0.113.9"]));
    assert_eq!(
        c.skipped,
        vec![
            (
                ip("203.0.113.7"),
                SkipReason::Secondary { link: "d0".into() }
            ),
            (
                ip("2001:db8::9"),
                SkipReason::Temporary { link: "d0".into() }
            ),
        ]
    );
}

#[test]
fn v6_exclusion_allows_a_default_network_or_part_of_it() {
    let f = AddressFilter::new(&[], &[net("fd00::/8")]).with_families(Families::DUAL);
    assert_eq!(f.filtered_by(ip("fd00::1")), None);
    assert_eq!(
        f.filtered_by(ip("fc00::1")),
        Some((net("fc00::/7"), FilterRule::Default))
    );
    let links = [up(2, "d0")];
    let c = choose(&links, &[addr(2, "fc00::1"), addr(2, "fd00::1")], &f);
    assert_eq!(c.chosen, stack(&["fd00::1"]));

    let f = AddressFilter::new(&[], &[net("fe80::/10")]).with_families(Families::DUAL);
    let c = choose(&links, &[addr(2, "fe80::1")], &f);
    assert_eq!(c.chosen, stack(&["fe80::1"]));
}

#[test]
fn v6_inclusion_filters_more_and_beats_exclusion() {
    let f = AddressFilter::new(&[net("2001:db8::/64")], &[]).with_families(Families::DUAL);
    let links = [up(2, "d0")];
    let c = choose(
        &links,
        &[addr(2, "2001:db8::7"), addr(2, "2001:db8:1::9")],
        &f,
    );
    assert_eq!(c.chosen, stack(&["2001:db8:1::9"]));
    assert_eq!(
        c.skipped,
        vec![(
            ip("2001:db8::7"),
            filtered("2001:db8::/64", FilterRule::Included)
        )]
    );
    assert_eq!(
        reason_display(&c, "2001:db8::7"),
        "in 2001:db8::/64, listed in -inclfilternet"
    );

    let f =
        AddressFilter::new(&[net("fd00:1::/32")], &[net("fd00::/8")]).with_families(Families::DUAL);
    assert_eq!(
        f.filtered_by(ip("fd00:1::1")),
        Some((net("fd00:1::/32"), FilterRule::Included))
    );
    assert_eq!(f.filtered_by(ip("fd00:2::1")), None);

    // Truncated to the prefix, as for IPv4.
    let f = AddressFilter::new(&[net("2001:db8::77/64")], &[]);
    assert_eq!(
        f.filtered_by(ip("2001:db8::1")),
        Some((net("2001:db8::/64"), FilterRule::Included))
    );
}

#[test]
fn filter_networks_apply_to_their_own_family_only() {
    let f = AddressFilter::new(&[net("::/0")], &[net("0.0.0.0/0")]).with_families(Families::DUAL);
    assert_eq!(
        f.filtered_by(ip("2001:db8::7")),
        Some((net("::/0"), FilterRule::Included))
    );
    // 0.0.0.0/0 allows every IPv4 address again, and none of the IPv6 ones.
    assert_eq!(f.filtered_by(ip("10.1.0.2")), None);
    let f = AddressFilter::new(&[], &[net("0.0.0.0/0")]).with_families(Families::DUAL);
    assert_eq!(
        f.filtered_by(ip("fd00::1")),
        Some((net("fc00::/7"), FilterRule::Default))
    );
    let f = AddressFilter::new(&[net("0.0.0.0/0")], &[]).with_families(Families::DUAL);
    assert_eq!(f.filtered_by(ip("2001:db8::7")), None);
}

#[test]
fn ipv4_only_ignores_ipv6_addresses_entirely() {
    assert_eq!(AddressFilter::default().families(), Families::default());
    let links = [up(1, "lo"), up(2, "d0")];
    let addrs = [
        addr(1, "127.0.0.1"),
        addr(1, "::1"),
        addr(2, "2001:db8::7"),
        addr(2, "fd00::1"),
        flagged(2, "2001:db8::9", TEMPORARY),
        addr(2, "203.0.113.7"),
        addr(2, "198.51.100.1"),
    ];
    for filter in [
        AddressFilter::default(),
        // Even when an IPv6 network is listed.
        AddressFilter::new(&[net("2001:db8::/32")], &[net("fc00::/7")]),
    ] {
        let c = choose(&links, &addrs, &filter);
        assert_eq!(c.chosen, stack(&["203.0.113.7"]));
        assert_eq!(
            c.skipped,
            vec![
                (
                    ip("127.0.0.1"),
                    filtered("127.0.0.0/8", FilterRule::Default)
                ),
                (
                    ip("198.51.100.1"),
                    SkipReason::NotFirst {
                        chosen: ip("203.0.113.7")
                    }
                ),
            ]
        );
        assert!(!c.to_string().contains("::"), "{c}");
    }
    // With nothing but IPv6 addresses there is nothing to choose from.
    assert_eq!(
        choose(&links, &addrs[1..5], &AddressFilter::default()),
        Choice::default()
    );
}

#[test]
fn ipv6_only_ignores_ipv4_addresses_entirely() {
    let links = [up(2, "d0")];
    let addrs = [
        addr(2, "203.0.113.7"),
        addr(2, "10.1.0.2"),
        addr(2, "2001:db8::7"),
    ];
    let f = AddressFilter::default().with_families(Families {
        ipv4: false,
        ipv6: true,
    });
    let c = choose(&links, &addrs, &f);
    assert_eq!(c.chosen, stack(&["2001:db8::7"]));
    assert_eq!(c.skipped, vec![]);
}

#[test]
fn families_are_chosen_independently() {
    let mut d1 = up(3, "d1");
    d1.carrier = false;
    let links = [up(2, "d0"), d1, up(4, "d2")];
    let addrs = [
        // d0: only a private IPv4 address, but a global IPv6 one.
        addr(2, "10.1.0.2"),
        addr(2, "2001:db8::7"),
        // d1 is down.
        addr(3, "203.0.113.3"),
        addr(3, "2001:db8::3"),
        // d2: the IPv6 address comes first in the dump, yet its IPv4 one is
        // chosen as well.
        addr(4, "2001:db8::9"),
        addr(4, "203.0.113.7"),
        addr(4, "198.51.100.1"),
    ];
    let c = choose(&links, &addrs, &dual());
    assert_eq!(c.chosen, stack(&["203.0.113.7", "2001:db8::7"]));
    assert_eq!(c.chosen.get(Family::Ipv4), Some(ip("203.0.113.7")));
    assert_eq!(c.chosen.get(Family::Ipv6), Some(ip("2001:db8::7")));
    let reasons: Vec<(IpAddr, SkipReason)> = c
        .skipped
        .iter()
        .filter(|(_, why)| !matches!(why, SkipReason::LinkDown { .. }))
        .cloned()
        .collect();
    assert_eq!(
        reasons,
        vec![
            // Per link, IPv4 before IPv6.
            (ip("10.1.0.2"), filtered("10.0.0.0/8", FilterRule::Default)),
            (
                ip("198.51.100.1"),
                SkipReason::NotFirst {
                    chosen: ip("203.0.113.7")
                }
            ),
            (
                ip("2001:db8::9"),
                SkipReason::NotFirst {
                    chosen: ip("2001:db8::7")
                }
            ),
        ]
    );
    let down: Vec<IpAddr> = c
        .skipped
        .iter()
        .filter(|(_, why)| matches!(why, SkipReason::LinkDown { index: 3, .. }))
        .map(|(a, _)| *a)
        .collect();
    assert_eq!(down, vec![ip("203.0.113.3"), ip("2001:db8::3")]);
    assert_eq!(
        c.skipped_of(Family::Ipv6)
            .map(|(a, _)| *a)
            .collect::<Vec<_>>(),
        vec![ip("2001:db8::3"), ip("2001:db8::9")]
    );

    // One family without a usable address leaves the other one chosen.
    let c = choose(&links, &addrs[..2], &dual());
    assert_eq!(c.chosen, stack(&["2001:db8::7"]));
    assert_eq!(c.chosen.get(Family::Ipv4), None);
    assert_eq!(c.to_string(), "2001:db8::7 (skipped: 10.1.0.2: in 10.0.0.0/8, filtered by default (allow it with -exclfilternet 10.0.0.0/8))");

    let c = choose(&links, &addrs[4..], &dual());
    assert_eq!(
        c.to_string().split(' ').next(),
        Some("203.0.113.7,2001:db8::9")
    );
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
    let v4 = prop_oneof![
        Just([203u8, 0, 113]),
        Just([198, 51, 100]),
        Just([10, 1, 0]),
        Just([192, 168, 5]),
        Just([127, 0, 0]),
    ]
    .prop_flat_map(|[a, b, c]| (1u8..255).prop_map(move |d| IpAddr::from([a, b, c, d])));
    // Global (documentation space, not filtered), unique local, link-local.
    let v6 = prop_oneof![
        Just([0x2001u16, 0xdb8, 0, 0]),
        Just([0x2001, 0xdb8, 1, 0]),
        Just([0xfd00, 0, 0, 0]),
        Just([0xfe80, 0, 0, 0]),
    ]
    .prop_flat_map(|[a, b, c, d]| {
        (1u16..255).prop_map(move |h| IpAddr::from([a, b, c, d, 0, 0, 0, h]))
    });
    proptest::collection::vec((1u32..12, prop_oneof![v4, v6], 0u32..0x80), 0..12).prop_map(|v| {
        v.into_iter()
            .map(|(index, address, flags)| AddrFacts {
                index,
                address,
                prefix_len: if address.is_ipv6() { 64 } else { 24 },
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
            net("2001:db8::/64"),
            net("fd00::/8"),
            net("fe80::/10"),
        ],
        0..3,
    );
    let families = prop_oneof![
        Just(Families::default()),
        Just(Families::DUAL),
        Just(Families {
            ipv4: false,
            ipv6: true
        }),
    ];
    (nets.clone(), nets, families)
        .prop_map(|(incl, excl, families)| AddressFilter::new(&incl, &excl).with_families(families))
}

fn only(filter: &AddressFilter, f: Family) -> AddressFilter {
    filter.clone().with_families(Families {
        ipv4: f == Family::Ipv4,
        ipv6: f == Family::Ipv6,
    })
}

proptest! {
    #[test]
    fn every_address_is_chosen_or_explained_once(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
        let c = choose(&links, &addrs, &filter);
        let mut seen: Vec<IpAddr> = c.skipped.iter().map(|(a, _)| *a).chain(c.chosen.iter()).collect();
        // Addresses of a family that is not enabled are neither.
        let mut given: Vec<IpAddr> = addrs
            .iter()
            .map(|a| a.address)
            .filter(|a| filter.families().contains(Family::of(*a)))
            .collect();
        seen.sort();
        given.sort();
        prop_assert_eq!(seen, given);
    }

    #[test]
    fn the_chosen_address_passes_every_check(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
        let c = choose(&links, &addrs, &filter);
        for family in Family::ALL {
            if let Some(chosen) = c.chosen.get(family) {
                prop_assert!(filter.families().contains(family));
                let ok = addrs.iter().any(|a| {
                    a.address == chosen
                        && skip_reason(links.iter().find(|l| l.index == a.index), a, &filter).is_none()
                });
                prop_assert!(ok);
                prop_assert!(filter.filtered_by(chosen).is_none());
            } else {
                let none_usable = c
                    .skipped_of(family)
                    .all(|(_, why)| !matches!(why, SkipReason::NotFirst { .. }));
                prop_assert!(none_usable);
            }
        }
        // An address makes way only for the chosen one of its own family.
        for (a, why) in &c.skipped {
            if let SkipReason::NotFirst { chosen } = why {
                prop_assert_eq!(Some(*chosen), c.chosen.get(Family::of(*a)));
            }
        }
    }

    #[test]
    fn each_family_is_chosen_as_if_alone(links in arb_links(), addrs in arb_addrs(), filter in arb_filter()) {
        let c = choose(&links, &addrs, &filter);
        for family in Family::ALL {
            let alone = choose(&links, &addrs, &only(&filter, family));
            if filter.families().contains(family) {
                prop_assert_eq!(c.chosen.get(family), alone.chosen.get(family));
                prop_assert_eq!(
                    c.skipped_of(family).collect::<Vec<_>>(),
                    alone.skipped.iter().collect::<Vec<_>>()
                );
            } else {
                prop_assert_eq!(c.chosen.get(family), None);
                prop_assert_eq!(c.skipped_of(family).count(), 0);
            }
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
