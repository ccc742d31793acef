//! Tests of the iptables-nft rule encoding and decoding.

use super::super::xt;
use super::write::encode;
use super::*;
use crate::firewall::flavors::iptables::xt::tests::observed;
use crate::firewall::names::{internal_returns, GO_INTERNAL_NETWORKS};
use crate::firewall::wire::netlink::{find_attr, sys};
use crate::firewall::{comment_for, Names};
use crate::model::{Family, NatKey, PodRef, Proto};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr};

fn owner(s: &str) -> PodRef {
    PodRef::from_comment(s).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const V4: Family = Family::Ipv4;

/// The rules of the captured iptables-nft commands, as the agent names them.
fn agent_rules() -> Vec<(&'static str, &'static str, &'static str, AgentRule)> {
    let dnat = |public_port, proto, pod: &str, pod_port, o: &str| {
        AgentRule::Dnat(
            Mapping {
                key: NatKey {
                    public_ip: ip("203.0.113.7"),
                    public_port,
                    proto,
                },
                pod_ip: ip(pod),
                pod_port,
                owner: owner(o),
                span: 0,
            },
            None,
        )
    };
    vec![
        (
            "jump_pre",
            "nat",
            "PREROUTING",
            AgentRule::Jump("PODNAT_PRE".into()),
        ),
        (
            "jump_fwd",
            "filter",
            "FORWARD",
            AgentRule::Jump("PODNAT_FORWARD".into()),
        ),
        (
            "dnat_tcp",
            "nat",
            "PODNAT_PRE",
            dnat(25, Proto::Tcp, "10.1.0.5", 25, "mail:mx-0"),
        ),
        (
            "dnat_udp",
            "nat",
            "PODNAT_PRE",
            dnat(5353, Proto::Udp, "10.1.1.5", 53, "dns:resolver-1"),
        ),
        (
            "snat_tcp",
            "nat",
            "PODNAT_POST",
            AgentRule::Snat(SnatRule {
                pod_ip: ip("10.1.0.5"),
                proto: Proto::Tcp,
                public_ip: ip("203.0.113.7"),
                owner: owner("mail:mx-0"),
            }),
        ),
        (
            "snat_udp",
            "nat",
            "PODNAT_POST",
            AgentRule::Snat(SnatRule {
                pod_ip: ip("10.1.1.5"),
                proto: Proto::Udp,
                public_ip: ip("198.51.100.9"),
                owner: owner("dns:resolver-1"),
            }),
        ),
        (
            "fwd_tcp",
            "filter",
            "PODNAT_FORWARD",
            AgentRule::Forward(ForwardRule {
                pod_ip: ip("10.1.0.5"),
                proto: Proto::Tcp,
                pod_port: 25,
                owner: owner("mail:mx-0"),
                span: 0,
            }),
        ),
        (
            "fwd_udp",
            "filter",
            "PODNAT_FORWARD",
            AgentRule::Forward(ForwardRule {
                pod_ip: ip("10.1.1.5"),
                proto: Proto::Udp,
                pod_port: 53,
                owner: owner("dns:resolver-1"),
                span: 0,
            }),
        ),
        (
            "dnat_range",
            "nat",
            "PODNAT_PRE",
            match dnat(10000, Proto::Udp, "10.1.2.5", 20000, "voip:rtp-0") {
                AgentRule::Dnat(m, None) => AgentRule::Dnat(Mapping { span: 99, ..m }, None),
                _ => unreachable!(),
            },
        ),
        (
            "fwd_range",
            "filter",
            "PODNAT_FORWARD",
            AgentRule::Forward(ForwardRule {
                pod_ip: ip("10.1.2.5"),
                proto: Proto::Udp,
                pod_port: 20000,
                owner: owner("voip:rtp-0"),
                span: 99,
            }),
        ),
        (
            "count_jump",
            "mangle",
            "POSTROUTING",
            AgentRule::DnatJump("PODNAT_COUNT".into()),
        ),
        (
            "count_tcp",
            "mangle",
            "PODNAT_COUNT",
            AgentRule::Count(Counted {
                key: NatKey {
                    public_ip: ip("203.0.113.7"),
                    public_port: 25,
                    proto: Proto::Tcp,
                },
                span: 0,
                owner: owner("mail:mx-0"),
            }),
        ),
        (
            "count_range",
            "mangle",
            "PODNAT_COUNT",
            AgentRule::Count(Counted {
                key: NatKey {
                    public_ip: ip("203.0.113.7"),
                    public_port: 10000,
                    proto: Proto::Udp,
                },
                span: 99,
                owner: owner("voip:rtp-0"),
            }),
        ),
        ("ret_172", "nat", "PODNAT_POST", AgentRule::Return(0)),
        ("ret_192", "nat", "PODNAT_POST", AgentRule::Return(1)),
        ("ret_10", "nat", "PODNAT_POST", AgentRule::Return(2)),
        ("ret_127", "nat", "PODNAT_POST", AgentRule::Return(3)),
    ]
}

#[test]
fn every_rule_is_byte_identical_to_iptables_nft() {
    let names = Names::new("podnat");
    let observed = observed();
    for (name, table, chain, rule) in agent_rules() {
        let (_, flags, bytes) = observed.iter().find(|(n, _, _)| n == name).unwrap();
        // -A: NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND.
        assert_eq!(*flags, 0xc01, "{name}");
        let got = rule_attrs(table, chain, None, &rule, &names, V4);
        assert_eq!(
            got.as_bytes(),
            bytes.as_slice(),
            "{name}: encoding differs from iptables-nft"
        );
    }
}

#[test]
fn every_observed_rule_decodes_back() {
    let names = Names::new("podnat");
    let observed = observed();
    for (name, _, _, rule) in agent_rules() {
        let (_, _, bytes) = observed.iter().find(|(n, _, _)| n == name).unwrap();
        let exprs = parse_exprs(find_attr(bytes, sys::NFTA_RULE_EXPRESSIONS).unwrap());
        assert_eq!(decode(&exprs, &names, V4), Some(rule), "{name}");
    }
}

#[test]
fn near_misses_are_not_the_agents() {
    let names = Names::new("podnat");
    let m = AgentRule::Dnat(
        Mapping {
            key: NatKey {
                public_ip: ip("203.0.113.7"),
                public_port: 25,
                proto: Proto::Tcp,
            },
            pod_ip: ip("10.1.0.5"),
            pod_port: 25,
            owner: owner("mail:mx-0"),
            span: 0,
        },
        None,
    );
    let exprs = parse_exprs(encode(&m, &names, V4).exprs.attrs().as_bytes());
    assert_eq!(decode(&exprs, &names, V4), Some(m));
    // Without the counter.
    let no_counter: Vec<Expr> = exprs
        .iter()
        .filter(|e| **e != Expr::Counter)
        .cloned()
        .collect();
    assert_eq!(decode(&no_counter, &names, V4), None);
    // With an extra expression.
    let mut extra = exprs.clone();
    extra.insert(0, Expr::Other("ct".into()));
    assert_eq!(decode(&extra, &names, V4), None);
    // A jump with another comment is not the agent's canonical jump.
    let other = Names::new("other");
    let j = parse_exprs(
        encode(&AgentRule::Jump("PODNAT_PRE".into()), &other, V4)
            .exprs
            .attrs()
            .as_bytes(),
    );
    assert_eq!(decode(&j, &names, V4), None);
    assert_eq!(jump_target(&j), Some("PODNAT_PRE"));
    // An ownerless comment does not decode.
    let mut bad = exprs;
    for e in &mut bad {
        if let Expr::Xt { name, info, .. } = e {
            if name == "comment" {
                *info = xt::comment_info("no-colon");
            }
        }
    }
    assert_eq!(decode(&bad, &names, V4), None);
}

#[test]
fn a_port_range_is_the_agents_only_as_written() {
    let names = Names::new("podnat");
    let m = Mapping {
        key: NatKey {
            public_ip: ip("203.0.113.7"),
            public_port: 10000,
            proto: Proto::Udp,
        },
        pod_ip: ip("10.1.2.5"),
        pod_port: 20000,
        owner: owner("voip:rtp-0"),
        span: 99,
    };
    let exprs = exprs_of(&AgentRule::Dnat(m.clone(), None), &names, V4);
    assert_eq!(
        decode(&exprs, &names, V4),
        Some(AgentRule::Dnat(m.clone(), None))
    );
    // The rule with another DNAT target payload.
    let with_dnat = |info: Vec<u8>| -> Vec<Expr> {
        let mut e = exprs.clone();
        for x in &mut e {
            if matches!(x, Expr::Xt { name, .. } if name == "DNAT") {
                *x = Expr::Xt {
                    kind: "target".into(),
                    name: "DNAT".into(),
                    rev: xt::DNAT_REV,
                    info: info.clone(),
                };
            }
        }
        e
    };
    // `--dport` a port shorter than the pod ports: not the agent's.
    let mut short = exprs.clone();
    for e in &mut short {
        if let Expr::Range { to, .. } = e {
            *to = 10098u16.to_be_bytes().to_vec();
        }
    }
    assert_eq!(decode(&short, &names, V4), None);
    // The helper's own payload decodes (it substitutes, nothing else).
    let same = with_dnat(xt::dnat_range2(m.pod_ip, 20000, 99, 10000));
    assert_eq!(
        decode(&same, &names, V4),
        Some(AgentRule::Dnat(m.clone(), None))
    );
    // Another base (`/10001`): public 10000 would go to 19999.
    let base = with_dnat(xt::dnat_range2(m.pod_ip, 20000, 99, 10001));
    assert_eq!(decode(&base, &names, V4), None);
    // Pod ports past 65535 (`--to-destination A:65500-65535/10000` for a
    // 100-port range): never the agent's, whatever the bytes say.
    let past = with_dnat(xt::dnat_range2(m.pod_ip, 65500, 99, 10000));
    assert_eq!(decode(&past, &names, V4), None);
    // `--dport 10000:10000` is not how the agent writes one port.
    let one = Mapping { span: 0, ..m };
    let mut wide = exprs_of(&AgentRule::Dnat(one, None), &names, V4);
    let cmp = wide
        .iter()
        .position(|x| matches!(x, Expr::Cmp { data, .. } if *data == 10000u16.to_be_bytes()))
        .unwrap();
    wide[cmp] = Expr::Range {
        sreg: crate::firewall::wire::encode::REG_1,
        op: 0,
        from: 10000u16.to_be_bytes().to_vec(),
        to: 10000u16.to_be_bytes().to_vec(),
    };
    assert_eq!(decode(&wide, &names, V4), None);
}

fn arb_owner() -> impl Strategy<Value = PodRef> {
    ("[a-z][a-z0-9-]{0,20}", "[a-z][a-z0-9.-]{0,150}").prop_map(|(ns, n)| PodRef::new(ns, n))
}

fn arb_rule() -> impl Strategy<Value = AgentRule> {
    let ip = any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n)));
    let proto = prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)];
    prop_oneof![
        (0..GO_INTERNAL_NETWORKS.len()).prop_map(AgentRule::Return),
        (ip.clone(), proto.clone(), ip.clone(), arb_owner()).prop_map(
            |(pod_ip, proto, public_ip, owner)| AgentRule::Snat(SnatRule {
                pod_ip,
                proto,
                public_ip,
                owner
            })
        ),
        (
            ip.clone(),
            any::<u16>(),
            proto.clone(),
            ip.clone(),
            any::<u16>(),
            arb_owner(),
            proptest::option::of((any::<u32>(), 1..=32u8)),
            0..1000u16,
        )
            .prop_map(
                |(public_ip, public_port, proto, pod_ip, pod_port, owner, source, span)| {
                    let source = source.map(|(a, len)| {
                        ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), len)
                            .unwrap()
                            .trunc()
                    });
                    AgentRule::Dnat(
                        Mapping {
                            key: NatKey {
                                public_ip,
                                public_port,
                                proto,
                            },
                            pod_ip,
                            pod_port,
                            owner,
                            span: span.min(u16::MAX - public_port.max(pod_port)),
                        },
                        source,
                    )
                }
            ),
        (ip, proto, any::<u16>(), arb_owner(), 0..1000u16).prop_map(
            |(pod_ip, proto, pod_port, owner, span)| {
                AgentRule::Forward(ForwardRule {
                    pod_ip,
                    proto,
                    pod_port,
                    owner,
                    span: span.min(u16::MAX - pod_port),
                })
            }
        ),
        "[A-Z_]{1,28}".prop_map(AgentRule::Jump),
    ]
}

/// A long owner reads back as its cut comment (what `canonical` makes).
fn as_read_back(r: AgentRule) -> AgentRule {
    let cut = |o: &PodRef| PodRef::from_comment(&comment_for(o)).unwrap();
    match r {
        AgentRule::Snat(s) => AgentRule::Snat(SnatRule {
            owner: cut(&s.owner),
            ..s
        }),
        AgentRule::Dnat(m, source) => AgentRule::Dnat(
            Mapping {
                owner: cut(&m.owner),
                ..m
            },
            source,
        ),
        AgentRule::Forward(f) => AgentRule::Forward(ForwardRule {
            owner: cut(&f.owner),
            ..f
        }),
        other => other,
    }
}

proptest! {
    #[test]
    fn any_rule_round_trips(rule in arb_rule()) {
        let names = Names::new("podnat");
        let wire = encode(&rule, &names, V4);
        // The wire form parses back to the description...
        let parsed = parse_exprs(wire.exprs.attrs().as_bytes());
        prop_assert_eq!(&parsed, &exprs_of(&rule, &names, V4));
        // ...which decodes to the rule (owners as their comments say).
        prop_assert_eq!(decode(&parsed, &names, V4), Some(as_read_back(rule)));
    }
}

#[test]
fn go_internal_networks_are_the_models_in_go_order() {
    let mut go = GO_INTERNAL_NETWORKS.to_vec();
    let mut model = crate::model::INTERNAL_NETWORKS.to_vec();
    go.sort();
    model.sort();
    assert_eq!(go, model);
    let v4 = internal_returns(V4);
    assert_eq!(v4[0], (ip("172.16.0.0"), 12));
    assert_eq!(v4[3], (ip("127.0.0.0"), 8));
}

#[test]
fn chain_order_puts_returns_first() {
    let s = AgentRule::Snat(SnatRule {
        pod_ip: ip("10.0.0.1"),
        proto: Proto::Tcp,
        public_ip: ip("203.0.113.7"),
        owner: owner("a:b"),
    });
    let mut v = vec![s.clone(), AgentRule::Return(3), AgentRule::Return(0)];
    v.sort();
    assert_eq!(v, vec![AgentRule::Return(0), AgentRule::Return(3), s]);
}

/// The hairpin rules (`-localaccess`) decode back to themselves in both
/// families, and their xt payloads are laid out as iptables-nft 1.8.9 sends
/// them (testdata/iptables-nft-1.8.9-hairpin-encoding.md).
#[test]
fn hairpin_rules_round_trip_with_iptables_nft_payloads() {
    let names = Names::new("podnat");
    for (family, pod) in [(Family::Ipv4, "10.1.0.5"), (Family::Ipv6, "fd00:1::5")] {
        let mark = AgentRule::Mark(LocalPod {
            pod_ip: ip(pod),
            owner: owner("mail:mx-0"),
        });
        for rule in [mark, AgentRule::Masquerade] {
            let exprs = parse_exprs(encode(&rule, &names, family).exprs.attrs().as_bytes());
            assert_eq!(
                decode(&exprs, &names, family),
                Some(rule.clone()),
                "{rule:?}"
            );
            // The other family's encoding is not this rule.
            let other = if family == Family::Ipv4 {
                Family::Ipv6
            } else {
                Family::Ipv4
            };
            assert_ne!(decode(&exprs, &names, other), Some(rule));
        }
    }
    assert_eq!(xt::mark_or(0x2000), [0, 0x20, 0, 0, 0, 0x20, 0, 0]);
    assert_eq!(xt::addrtype_dst_local(), [0, 0, 4, 0, 0, 0, 0, 0]);
    let v4 = xt::masquerade_info(Family::Ipv4);
    assert_eq!(v4.len(), 24);
    assert_eq!(&v4[..4], &1u32.to_ne_bytes());
    assert!(v4[4..].iter().all(|b| *b == 0));
    assert_eq!(xt::masquerade_info(Family::Ipv6), vec![0u8; 40]);
}

/// A restricted mapping's DNAT rule carries `-s` as iptables-nft 1.8.9
/// writes it (after the protocol, before the destination): a byte-aligned
/// prefix loads only its bytes, another is masked, a host is a full cmp;
/// each decodes back to its range, in both families.
#[test]
fn source_restricted_dnat_rules_encode_the_prefix_as_iptables_nft() {
    let names = Names::new("podnat");
    let rule = |public: &str, pod: &str, source: &str| {
        AgentRule::Dnat(
            Mapping {
                key: NatKey {
                    public_ip: ip(public),
                    public_port: 993,
                    proto: Proto::Tcp,
                },
                pod_ip: ip(pod),
                pod_port: 993,
                owner: owner("mail:imap-0"),
                span: 0,
            },
            Some(source.parse().unwrap()),
        )
    };
    let loads = |e: &[Expr]| -> Vec<(u32, u32)> {
        e.iter()
            .filter_map(|x| match x {
                Expr::Payload { offset, len, .. } => Some((*offset, *len)),
                _ => None,
            })
            .collect()
    };
    let bitwise = |e: &[Expr]| e.iter().any(|x| matches!(x, Expr::Bitwise { .. }));
    // (family, public, pod, source, loads: saddr, daddr, dport; masked)
    let cases = [
        (
            V4,
            "203.0.113.7",
            "10.1.0.5",
            "198.51.100.0/24",
            [(12, 3), (16, 4), (2, 2)],
            false,
        ),
        (
            V4,
            "203.0.113.7",
            "10.1.0.5",
            "198.51.100.128/25",
            [(12, 4), (16, 4), (2, 2)],
            true,
        ),
        (
            V4,
            "203.0.113.7",
            "10.1.0.5",
            "198.51.100.9/32",
            [(12, 4), (16, 4), (2, 2)],
            false,
        ),
        (
            Family::Ipv6,
            "2001:db8::7",
            "fd00:1::5",
            "2001:db8:1::/48",
            [(8, 6), (24, 16), (2, 2)],
            false,
        ),
        (
            Family::Ipv6,
            "2001:db8::7",
            "fd00:1::5",
            "2001:db8:1::/50",
            [(8, 16), (24, 16), (2, 2)],
            true,
        ),
    ];
    for (family, public, pod, source, want_loads, masked) in cases {
        let r = rule(public, pod, source);
        let exprs = parse_exprs(encode(&r, &names, family).exprs.attrs().as_bytes());
        assert_eq!(loads(&exprs), want_loads, "{source}");
        assert_eq!(bitwise(&exprs), masked, "{source}");
        assert_eq!(decode(&exprs, &names, family), Some(r), "{source}");
    }
    // A masked source whose value has host bits set matches nothing: not a
    // rule the agent writes.
    let r = rule("203.0.113.7", "10.1.0.5", "198.51.100.128/25");
    let mut exprs = parse_exprs(encode(&r, &names, V4).exprs.attrs().as_bytes());
    for e in &mut exprs {
        if let Expr::Cmp { data, .. } = e {
            if data.as_slice() == [198, 51, 100, 128] {
                *data = vec![198, 51, 100, 129];
            }
        }
    }
    assert_eq!(decode(&exprs, &names, V4), None);
}
