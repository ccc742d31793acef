//! Tests of the full planner, named after the SPEC rules they check.

use super::*;
use proptest::prelude::*;
use std::net::Ipv4Addr;

pub(crate) fn ts(secs: i64) -> Option<Timestamp> {
    Some(Timestamp::from_second(secs).unwrap())
}

pub(crate) fn pod(ns: &str, name: &str, ip: &str, created: i64, ann: &str) -> PodFacts {
    PodFacts {
        pod: PodRef::new(ns, name),
        node: Some("node1.example.org".into()),
        ips: DualStack::from_iter([ip.parse::<IpAddr>().unwrap()]),
        created: ts(created),
        ready: true,
        terminating: false,
        finished: false,
        annotation: Some(ann.into()),
        host_network: false,
        namespace_policy: Default::default(),
    }
}

pub(super) fn cfg() -> PlanConfig {
    PlanConfig {
        node_id: "node1".into(),
        restricted_ports: [22, 53, 6443].into_iter().collect(),
        families: Families::default(),
        local_access: false,
        source_ranges: true,
    }
}

pub(super) const PUB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
pub(super) const P25: &str = r#"{"entries":[{"srcPort":25,"dstPort":25}]}"#;

/// Pod a publishes 25 on public A and 26 on public B; the newer pod b takes
/// 25 on A, so a's SNAT must follow its first *winning* entry (B).
pub(super) fn snat_contest() -> (PodFacts, PodFacts) {
    let a = pod(
        "a",
        "a",
        "10.1.0.1",
        1,
        r#"{"entries":[{"srcIP":"198.51.100.1","srcPort":25,"dstPort":25},{"srcIP":"198.51.100.2","srcPort":26,"dstPort":26}]}"#,
    );
    let b = pod(
        "a",
        "b",
        "10.1.0.2",
        2,
        r#"{"entries":[{"srcIP":"198.51.100.1","srcPort":25,"dstPort":25}]}"#,
    );
    (a, b)
}

fn owners(t: &NatTable) -> Vec<String> {
    t.rules.dnat.iter().map(|m| m.owner.to_string()).collect()
}

#[test]
fn mail_server_gets_dnat_snat_forward() {
    let p = pod(
        "mail",
        "mx-0",
        "10.1.0.5",
        100,
        r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":143,"dstPort":143},{"srcPort":587,"dstPort":587}]}"#,
    );
    let t = plan(&[p], DualStack::v4(PUB), &cfg());
    assert_eq!(t.rules.dnat.len(), 3);
    assert!(t
        .rules
        .dnat
        .iter()
        .all(|m| m.key.public_ip == PUB && m.pod_ip == Ipv4Addr::new(10, 1, 0, 5)));
    assert_eq!(
        t.rules.snat,
        vec![SnatRule {
            pod_ip: Ipv4Addr::new(10, 1, 0, 5).into(),
            proto: Proto::Tcp,
            public_ip: PUB.into(),
            owner: PodRef::new("mail", "mx-0")
        }]
    );
    assert_eq!(
        t.rules
            .forward
            .iter()
            .map(|f| f.pod_port)
            .collect::<Vec<_>>(),
        vec![25, 143, 587]
    );
    assert!(t.conflicts.is_empty() && t.rejected.is_empty() && t.pending.is_empty());
}

#[test]
fn newer_pod_wins_and_older_is_listed_as_loser() {
    let old = pod("a", "old", "10.1.0.1", 100, P25);
    let new = pod("a", "new", "10.1.0.2", 200, P25);
    let t = plan(&[old, new], DualStack::v4(PUB), &cfg());
    assert_eq!(owners(&t), vec!["a:new"]);
    assert_eq!(t.conflicts.len(), 1);
    assert_eq!(t.conflicts[0].loser, PodRef::new("a", "old"));
    assert_eq!(t.conflicts[0].winner, PodRef::new("a", "new"));
    // The loser gets no SNAT / FORWARD either.
    assert!(t.rules.snat.iter().all(|s| &*s.owner.name == "new"));
    assert!(t.rules.forward.iter().all(|s| &*s.owner.name == "new"));
}

#[test]
fn ready_beats_newer() {
    let old = pod("a", "old", "10.1.0.1", 100, P25);
    let mut new = pod("a", "new", "10.1.0.2", 200, P25);
    new.ready = false;
    let t = plan(&[new, old], DualStack::v4(PUB), &cfg());
    assert_eq!(owners(&t), vec!["a:old"]);
}

#[test]
fn ties_go_by_namespace_then_name() {
    let t = plan(
        &[
            pod("b", "x", "10.1.0.1", 100, P25),
            pod("a", "z", "10.1.0.2", 100, P25),
        ],
        DualStack::v4(PUB),
        &cfg(),
    );
    assert_eq!(owners(&t), vec!["b:x"]);
    let t = plan(
        &[
            pod("a", "y", "10.1.0.1", 100, P25),
            pod("a", "z", "10.1.0.2", 100, P25),
        ],
        DualStack::v4(PUB),
        &cfg(),
    );
    assert_eq!(owners(&t), vec!["a:z"]);
}

#[test]
fn non_candidates_are_excluded() {
    let mut terminating = pod("a", "t", "10.1.0.1", 300, P25);
    terminating.terminating = true;
    let mut finished = pod("a", "f", "10.1.0.2", 300, P25);
    finished.finished = true;
    let mut no_ip = pod("a", "n", "10.1.0.3", 300, P25);
    no_ip.ips = DualStack::default();
    let mut elsewhere = pod("a", "e", "10.1.0.4", 300, P25);
    elsewhere.node = Some("node2.example.org".into());
    let mut unscheduled = pod("a", "u", "10.1.0.6", 300, P25);
    unscheduled.node = None;
    let ok = pod("a", "ok", "10.1.0.5", 100, P25);
    let t = plan(
        &[terminating, finished, no_ip, elsewhere, unscheduled, ok],
        DualStack::v4(PUB),
        &cfg(),
    );
    assert_eq!(owners(&t), vec!["a:ok"]);
    assert!(t.conflicts.is_empty());
}

#[test]
fn short_node_name_matches() {
    let mut p = pod("a", "p", "10.1.0.1", 1, P25);
    p.node = Some("node1".into());
    let c = PlanConfig {
        node_id: "node1.example.org".into(),
        ..cfg()
    };
    assert_eq!(plan(&[p], DualStack::v4(PUB), &c).rules.dnat.len(), 1);
}

#[test]
fn manual_address_vs_auto_and_pending() {
    let p = pod(
        "a",
        "p",
        "10.1.0.1",
        1,
        r#"{"entries":[{"srcPort":80,"dstPort":8080},{"srcIP":"198.51.100.9","srcPort":443,"dstPort":8443}]}"#,
    );
    let t = plan(std::slice::from_ref(&p), DualStack::v4(PUB), &cfg());
    let keys: Vec<String> = t.rules.dnat.iter().map(|m| m.key.to_string()).collect();
    assert_eq!(keys, vec!["198.51.100.9:443/tcp", "203.0.113.7:80/tcp"]);
    // SNAT goes to the first entry's address (annotation order).
    assert_eq!(t.rules.snat.len(), 1);
    assert_eq!(t.rules.snat[0].public_ip, PUB);

    let t = plan(&[p], DualStack::default(), &cfg());
    assert_eq!(keys_of(&t), vec!["198.51.100.9:443/tcp"]);
    assert_eq!(
        t.pending,
        vec![Pending {
            pod: PodRef::new("a", "p"),
            entry: 0,
            family: Family::Ipv4,
            public_port: 80,
            proto: Proto::Tcp,
            pod_port: 8080,
            span: 0
        }]
    );
    assert_eq!(t.rules.snat[0].public_ip, Ipv4Addr::new(198, 51, 100, 9));
}

fn keys_of(t: &NatTable) -> Vec<String> {
    t.rules.dnat.iter().map(|m| m.key.to_string()).collect()
}

#[test]
fn tcp_and_udp_on_the_same_port_are_different_keys() {
    let a = pod(
        "a",
        "tcp",
        "10.1.0.1",
        1,
        r#"{"entries":[{"srcPort":500,"dstPort":500}]}"#,
    );
    let b = pod(
        "a",
        "udp",
        "10.1.0.2",
        2,
        r#"{"entries":[{"srcPort":500,"dstPort":500,"proto":"udp"}]}"#,
    );
    let t = plan(&[a, b], DualStack::v4(PUB), &cfg());
    assert_eq!(
        keys_of(&t),
        vec!["203.0.113.7:500/tcp", "203.0.113.7:500/udp"]
    );
    assert!(t.conflicts.is_empty());
    assert_eq!(t.rules.snat.len(), 2);
}

#[test]
fn rejected_pod_gets_nothing_and_others_keep_working() {
    let bad = pod(
        "a",
        "bad",
        "10.1.0.1",
        500,
        r#"{"entries":[{"srcPort":25,"dstPort":0}]}"#,
    );
    let good = pod("a", "good", "10.1.0.2", 1, P25);
    let t = plan(&[bad, good], DualStack::v4(PUB), &cfg());
    assert_eq!(owners(&t), vec!["a:good"]);
    assert_eq!(t.rejected.len(), 1);
    assert_eq!(t.rejected[0].pod, PodRef::new("a", "bad"));
    assert_eq!(
        t.rejected[0].rejected.to_string(),
        "annotation rejected, no NAT for this pod: entries[0].dstPort: port 0 is reserved"
    );
}

#[test]
fn a_bad_range_or_allow_list_is_rejected_alone_and_the_pods_other_entries_published() {
    let p = pod(
        "voip",
        "pbx",
        "10.1.0.1",
        1,
        r#"{"entries":[{"srcPort":5060,"dstPort":5060,"proto":"udp"},{"srcPort":10000,"srcPortEnd":10999,"dstPort":65000,"proto":"udp"},{"srcPort":993,"dstPort":993,"sourceRanges":["198.51.100.1/24"]},{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp"}]}"#,
    );
    let t = plan(&[p], DualStack::v4(PUB), &cfg());
    assert_eq!(
        keys_of(&t),
        vec!["203.0.113.7:5060/udp", "203.0.113.7:10000/udp"]
    );
    assert_eq!(t.rules.dnat[1].span, 99);
    assert_eq!(t.rejected.len(), 1);
    assert_eq!(
        t.rejected[0].rejected.to_string(),
        "entries rejected alone, the pod's other entries are unaffected: \
         entries[1].srcPortEnd: 10000-10999 maps to pod ports 65000-65999 past 65535; \
         entries[2].sourceRanges: [0]: 198.51.100.1/24 has host bits set; the network is 198.51.100.0/24"
    );
}

#[test]
fn snat_follows_first_winning_entry_per_protocol() {
    // Entry 0 (public A) is lost to a newer pod; entry 1 (public B) is won.
    let (a, b) = snat_contest();
    let t = plan(&[a, b], DualStack::v4(PUB), &cfg());
    let a_snat = t.rules.snat.iter().find(|s| &*s.owner.name == "a").unwrap();
    assert_eq!(a_snat.public_ip, Ipv4Addr::new(198, 51, 100, 2));
}

fn arb_pod() -> impl Strategy<Value = PodFacts> {
    (
        0u8..3,
        0u8..6,
        1u8..4,
        0i64..4,
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec((0u8..4, 0u8..2, 1u16..4, any::<bool>()), 0..4),
    )
        .prop_map(|(ns, name, ip, created, ready, term, entries)| {
            let items: Vec<String> = entries
                .iter()
                .map(|(sp, proto, dp, manual)| {
                    let ip = if *manual {
                        r#""srcIP":"198.51.100.1","#
                    } else {
                        ""
                    };
                    let proto = if *proto == 0 { "tcp" } else { "udp" };
                    format!(
                        r#"{{{ip}"srcPort":{},"dstPort":{},"proto":"{proto}"}}"#,
                        1000 + *sp as u16,
                        2000 + dp
                    )
                })
                .collect();
            let mut p = pod(
                &format!("ns{ns}"),
                &format!("p{name}"),
                &format!("10.1.0.{ip}"),
                created,
                &format!(r#"{{"entries":[{}]}}"#, items.join(",")),
            );
            p.ready = ready;
            p.terminating = term && name == 0;
            p
        })
}

proptest! {
    #[test]
    fn result_is_independent_of_input_order(
        pods in proptest::collection::vec(arb_pod(), 0..8),
        seed in any::<u64>(),
    ) {
        // Distinct pod identities, as in a real cluster.
        let mut seen = BTreeSet::new();
        let pods: Vec<PodFacts> = pods.into_iter().filter(|p| seen.insert(p.pod.clone())).collect();
        let mut shuffled = pods.clone();
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let a = plan(&pods, DualStack::v4(PUB), &cfg());
        let b = plan(&shuffled, DualStack::v4(PUB), &cfg());
        prop_assert_eq!(&a, &b);
        // Every key has exactly one winner; every loser is a real claimant.
        let keys: BTreeSet<NatKey> = a.rules.dnat.iter().map(|m| m.key).collect();
        prop_assert_eq!(keys.len(), a.rules.dnat.len());
        for c in &a.conflicts {
            prop_assert!(a.rules.dnat.iter().any(|m| m.key == c.key && m.owner == c.winner));
        }
    }
}

/// SPEC "Safe on a public node": a port the node serves on the public
/// address or the wildcard is refused by name; the pod's other entries go
/// on; a key the agent held before the service appeared stays.
#[test]
fn a_port_the_node_serves_is_refused_and_the_rest_goes_on() {
    use crate::plan::admission::Bound;
    let p = pod(
        "mail",
        "mx",
        "10.1.0.5",
        1,
        r#"{"entries":[{"srcPort":10250,"dstPort":10250},{"srcPort":25,"dstPort":25},{"srcPort":8472,"dstPort":8472,"proto":"udp"}]}"#,
    );
    let services = NodeServices::from_sockets([
        (
            Proto::Tcp,
            10250,
            Bound {
                addr: "0.0.0.0".parse().unwrap(),
                v6only: false,
            },
        ),
        (
            Proto::Udp,
            8472,
            Bound {
                addr: PUB.into(),
                v6only: false,
            },
        ),
    ]);
    let t = plan_with(
        std::slice::from_ref(&p),
        DualStack::v4(PUB),
        &services,
        &cfg(),
    );
    assert_eq!(owners(&t), ["mail:mx"]);
    assert_eq!(t.rules.dnat[0].key.public_port, 25);
    let msgs: Vec<String> = t.refused.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        msgs,
        [
            "port 10250/tcp on 203.0.113.7 is served by the node itself (0.0.0.0:10250)",
            "port 8472/udp on 203.0.113.7 is served by the node itself (203.0.113.7:8472)",
        ]
    );
    assert!(t
        .refused
        .iter()
        .all(|r| r.reason.metric_label() == "node_service"));
    // Held before the listener came: kept.
    let held = NatKey {
        public_ip: PUB.into(),
        public_port: 10250,
        proto: Proto::Tcp,
    };
    let t = plan_with(
        &[p],
        DualStack::v4(PUB),
        &services.keeping([held].into()),
        &cfg(),
    );
    assert_eq!(t.rules.dnat.len(), 2);
    assert_eq!(t.refused.len(), 1);
}

/// SPEC "Who may publish": a namespace the selector does not match
/// publishes nothing; a ports annotation limits the public ports; a
/// malformed one publishes nothing. Each refusal names entry and reason.
#[test]
fn namespace_policy_decides_per_entry() {
    use crate::plan::admission::PortAllotment;
    let ann = r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":2525,"dstPort":25},{"srcPort":500,"dstPort":500,"proto":"udp"}]}"#;
    let mut open = pod("a", "open", "10.1.0.1", 1, ann);
    open.namespace_policy = NamespacePolicy::Open;
    let mut limited = pod("b", "limited", "10.1.0.2", 1, ann);
    limited.namespace_policy =
        NamespacePolicy::Ports(PortAllotment::parse("25,400-600/udp").unwrap());
    let mut outside = pod("c", "outside", "10.1.0.3", 1, ann);
    outside.namespace_policy = NamespacePolicy::NotSelected;
    let mut broken = pod("d", "broken", "10.1.0.4", 1, ann);
    broken.namespace_policy = NamespacePolicy::Invalid("\"25/sctp\": unknown protocol".into());
    // Separate public addresses so nobody conflicts.
    let t = plan(&[open], DualStack::v4(PUB), &cfg());
    assert_eq!(t.rules.dnat.len(), 3);
    assert!(t.refused.is_empty());
    let t = plan(&[limited], DualStack::v4(PUB), &cfg());
    let ports: Vec<u16> = t.rules.dnat.iter().map(|m| m.key.public_port).collect();
    assert_eq!(ports, [25, 500]);
    assert_eq!(t.refused.len(), 1);
    assert_eq!(t.refused[0].entry, 1);
    assert_eq!(
        t.refused[0].to_string(),
        "port 2525/tcp: namespace b may publish only 25,400-600/udp"
    );
    let t = plan(&[outside, broken], DualStack::v4(PUB), &cfg());
    assert!(t.rules.dnat.is_empty() && t.rules.snat.is_empty() && t.rules.forward.is_empty());
    let labels: Vec<&str> = t.refused.iter().map(|r| r.reason.metric_label()).collect();
    assert_eq!(
        labels,
        [
            "namespace_not_selected",
            "namespace_not_selected",
            "namespace_not_selected",
            "namespace_policy_invalid",
            "namespace_policy_invalid",
            "namespace_policy_invalid",
        ]
    );
    assert!(t.refused[0]
        .to_string()
        .contains("namespace c is not selected by -namespaceselector"));
}

#[test]
fn a_range_is_one_mapping_with_one_offset() {
    let rtp = r#"{"entries":[{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp"}]}"#;
    let t = plan(
        &[pod("voip", "pbx", "10.1.0.5", 100, rtp)],
        DualStack::v4(PUB),
        &cfg(),
    );
    assert_eq!(t.rules.dnat.len(), 1, "one mapping for 100 ports");
    let m = &t.rules.dnat[0];
    assert_eq!(
        (m.key.public_port, m.port_end(), m.pod_port),
        (10000, 10099, 20000)
    );
    let f = &t.rules.forward[0];
    assert_eq!((t.rules.forward.len(), f.pod_port, f.span), (1, 20000, 99));
    assert_eq!(t.rules.snat.len(), 1);
}

#[test]
fn a_newer_pod_claiming_part_of_a_range_wins_only_that_part() {
    let rtp = r#"{"entries":[{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp"}]}"#;
    let part = r#"{"entries":[{"srcPort":10040,"srcPortEnd":10059,"dstPort":100,"proto":"udp"}]}"#;
    let old = pod("voip", "pbx", "10.1.0.5", 100, rtp);
    let new = pod("voip", "probe", "10.1.0.6", 200, part);
    // Either order of the pods: the same table.
    let t = plan(&[old.clone(), new.clone()], DualStack::v4(PUB), &cfg());
    assert_eq!(t, plan(&[new, old], DualStack::v4(PUB), &cfg()));
    let parts: Vec<(u16, u16, u16, &str)> = t
        .rules
        .dnat
        .iter()
        .map(|m| (m.key.public_port, m.port_end(), m.pod_port, &*m.owner.name))
        .collect();
    assert_eq!(
        parts,
        [
            (10000, 10039, 20000, "pbx"),
            (10040, 10059, 100, "probe"),
            (10060, 10099, 20060, "pbx"),
        ]
    );
    // The loser is told which ports it lost: one conflict for the run.
    assert_eq!(t.conflicts.len(), 1);
    let c = &t.conflicts[0];
    assert_eq!(
        (c.key.public_port, c.span, &*c.loser.name),
        (10040, 19, "pbx")
    );
    // FORWARD accepts the pod ports of the parts each pod won.
    let fwd: Vec<(u16, u16, &str)> = t
        .rules
        .forward
        .iter()
        .map(|f| (f.pod_port, f.span, &*f.owner.name))
        .collect();
    assert_eq!(
        fwd,
        [(20000, 39, "pbx"), (20060, 39, "pbx"), (100, 19, "probe")]
    );
}

#[test]
fn forward_rules_accept_each_pod_port_once_by_rank() {
    let ip: IpAddr = "10.1.0.5".parse().unwrap();
    let (a, b) = (PodRef::new("ns", "a"), PodRef::new("ns", "b"));
    let rules = |runs: Vec<(u16, u16, u8, &PodRef)>| -> Vec<(u16, u16, String)> {
        super::forward_rules(ip, Proto::Udp, runs)
            .into_iter()
            .map(|f| (f.pod_port, f.span, f.owner.name.to_string()))
            .collect()
    };
    // A range cut around a higher-ranked pod's port.
    assert_eq!(
        rules(vec![(100, 99, 1, &a), (150, 0, 2, &b)]),
        [
            (100, 49, "a".into()),
            (150, 0, "b".into()),
            (151, 48, "a".into())
        ]
    );
    // A lower-ranked pod's port inside the range: the range stays whole.
    assert_eq!(
        rules(vec![(100, 99, 2, &a), (150, 0, 1, &b)]),
        [(100, 99, "a".into())]
    );
    // Two entries of one pod onto one pod port: one rule; adjacent runs
    // stay apart (one rule per entry, as the Go version writes them).
    assert_eq!(
        rules(vec![(25, 0, 1, &a), (25, 0, 1, &a)]),
        [(25, 0, "a".into())]
    );
    assert_eq!(
        rules(vec![(26, 0, 1, &a), (25, 0, 1, &a)]),
        [(25, 0, "a".into()), (26, 0, "a".into())]
    );
}
