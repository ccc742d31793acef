//! The incremental planner against the full one: spec-named cases for the
//! winner moves, and random event sequences checked against `plan()` after
//! every step.

use std::collections::BTreeMap;

use proptest::prelude::*;

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::model::{Families, RuleSet};
use crate::plan::admission::{Bound, PortAllotment};
use crate::plan::tests::{cfg, pod, snat_contest, P25, PUB};
use crate::plan::{plan, plan_with, NamespacePolicy};

fn planner(pods: &[PodFacts]) -> IncrementalPlan {
    let mut inc = IncrementalPlan::new(cfg(), DualStack::v4(PUB));
    for p in pods {
        inc.upsert(p.clone());
    }
    inc
}

fn owners<T>(rules: &[T], owner: impl Fn(&T) -> &PodRef) -> Vec<String> {
    rules.iter().map(|r| owner(r).to_string()).collect()
}

#[test]
fn winner_leaves_and_the_loser_takes_over() {
    let old = pod("a", "old", "10.1.0.1", 100, P25);
    let new = pod("a", "new", "10.1.0.2", 200, P25);
    let mut inc = planner(std::slice::from_ref(&old));
    let ch = inc.upsert(new.clone());
    assert_eq!(owners(&ch.rules.add.dnat, |m| &m.owner), vec!["a:new"]);
    assert_eq!(owners(&ch.rules.del.dnat, |m| &m.owner), vec!["a:old"]);
    assert_eq!(owners(&ch.rules.del.snat, |s| &s.owner), vec!["a:old"]);
    assert!(ch.pods.contains(&old.pod), "the old pod became a loser");
    assert_eq!(inc.table().conflicts.len(), 1);

    let ch = inc.remove(&new.pod);
    assert_eq!(owners(&ch.rules.add.dnat, |m| &m.owner), vec!["a:old"]);
    assert_eq!(owners(&ch.rules.add.snat, |s| &s.owner), vec!["a:old"]);
    assert_eq!(owners(&ch.rules.add.forward, |f| &f.owner), vec!["a:old"]);
    assert_eq!(owners(&ch.rules.del.forward, |f| &f.owner), vec!["a:new"]);
    assert_eq!(ch.pods, [old.pod.clone(), new.pod].into_iter().collect());
    assert!(inc.table().conflicts.is_empty());
    assert_eq!(inc.table(), &plan(&[old], DualStack::v4(PUB), &cfg()));
}

#[test]
fn snat_moves_to_the_next_entry_when_the_first_loses() {
    let (a, b) = snat_contest();
    let mut inc = planner(std::slice::from_ref(&a));
    assert_eq!(
        inc.table().rules.snat[0].public_ip,
        Ipv4Addr::new(198, 51, 100, 1)
    );
    let ch = inc.upsert(b.clone());
    let a_snat = |r: &RuleSet| {
        r.snat
            .iter()
            .find(|s| s.owner == a.pod)
            .map(|s| s.public_ip)
    };
    assert_eq!(a_snat(&ch.rules.del), Some(IpAddr::from([198, 51, 100, 1])));
    assert_eq!(a_snat(&ch.rules.add), Some(IpAddr::from([198, 51, 100, 2])));
    assert_eq!(
        inc.table(),
        &plan(&[a.clone(), b.clone()], DualStack::v4(PUB), &cfg())
    );

    let ch = inc.remove(&b.pod);
    assert_eq!(a_snat(&ch.rules.add), Some(IpAddr::from([198, 51, 100, 1])));
    assert_eq!(inc.table(), &plan(&[a], DualStack::v4(PUB), &cfg()));
}

#[test]
fn a_new_pod_on_an_old_pods_ip_owns_the_shared_snat_and_forward() {
    // The old pod still holds its IP while the new one already has it.
    let mut old = pod("a", "old", "10.1.0.1", 100, P25);
    let new = pod(
        "a",
        "new",
        "10.1.0.1",
        200,
        r#"{"entries":[{"srcPort":26,"dstPort":25}]}"#,
    );
    let mut inc = planner(&[old.clone(), new.clone()]);
    let t = inc.table();
    assert_eq!(owners(&t.rules.dnat, |m| &m.owner), vec!["a:old", "a:new"]);
    assert_eq!(owners(&t.rules.snat, |s| &s.owner), vec!["a:new"]);
    assert_eq!(owners(&t.rules.forward, |f| &f.owner), vec!["a:new"]);

    old.terminating = true;
    let ch = inc.upsert(old.clone());
    assert_eq!(owners(&ch.rules.del.dnat, |m| &m.owner), vec!["a:old"]);
    assert!(ch.rules.add.is_empty() && ch.rules.del.snat.is_empty());
    assert_eq!(
        inc.table(),
        &plan(&[old.clone(), new.clone()], DualStack::v4(PUB), &cfg())
    );

    // The new pod goes first instead: the old one gets the shared slots back.
    old.terminating = false;
    inc.upsert(old.clone());
    let ch = inc.remove(&new.pod);
    assert_eq!(owners(&ch.rules.add.snat, |s| &s.owner), vec!["a:old"]);
    assert_eq!(owners(&ch.rules.add.forward, |f| &f.owner), vec!["a:old"]);
    assert_eq!(inc.table(), &plan(&[old], DualStack::v4(PUB), &cfg()));
}

#[test]
fn a_pod_seen_again_unchanged_costs_nothing() {
    let p = pod("a", "p", "10.1.0.1", 1, P25);
    let mut inc = planner(std::slice::from_ref(&p));
    assert!(inc.upsert(p.clone()).is_empty());
    assert!(inc.remove(&PodRef::new("a", "never-seen")).is_empty());
    let mut other_node = pod("a", "q", "10.1.0.2", 2, P25);
    other_node.node = Some("node2".into());
    assert!(inc.upsert(other_node).is_empty());
}

#[test]
fn a_rejected_annotation_is_reported_then_cleared_when_fixed() {
    let mut p = pod(
        "a",
        "p",
        "10.1.0.1",
        1,
        r#"{"entries":[{"srcPort":22,"dstPort":22}]}"#,
    );
    let mut inc = planner(&[]);
    let ch = inc.upsert(p.clone());
    assert!(ch.rules.is_empty());
    assert_eq!(ch.pods, [p.pod.clone()].into_iter().collect());
    assert_eq!(inc.table().rejected.len(), 1);
    p.annotation = Some(P25.into());
    let ch = inc.upsert(p.clone());
    assert_eq!(ch.rules.add.len(), 3);
    assert!(inc.table().rejected.is_empty());
}

#[test]
fn an_address_found_later_turns_pending_entries_into_rules() {
    let p = pod("a", "p", "10.1.0.1", 1, P25);
    let mut inc = IncrementalPlan::new(cfg(), DualStack::default());
    let ch = inc.upsert(p.clone());
    assert!(ch.rules.is_empty() && ch.pods.contains(&p.pod));
    assert_eq!(inc.table().pending.len(), 1);
    let ch = inc.set_public_address(DualStack::v4(PUB));
    assert_eq!(ch.rules.add.len(), 3);
    assert!(ch.pods.contains(&p.pod));
    assert_eq!(inc.table(), &plan(&[p], DualStack::v4(PUB), &cfg()));
}

#[test]
fn a_pod_that_comes_and_goes_within_one_burst_programs_nothing() {
    let stays = pod("a", "stays", "10.1.0.1", 1, P25);
    let mut inc = planner(std::slice::from_ref(&stays));
    let brief = pod("a", "brief", "10.1.0.2", 2, P25);
    let mut burst = inc.upsert(brief.clone());
    burst.absorb(inc.remove(&brief.pod));
    assert!(burst.rules.is_empty(), "{burst:?}");
    // Both pods are told about: the one that stays lost its port meanwhile.
    assert_eq!(burst.pods, [stays.pod, brief.pod].into_iter().collect());
}

/// Annotations that meet: the same port (TCP and UDP, auto and manual
/// address), shared pod ports, SNAT across addresses, rejected ones.
const ANNOTATIONS: &[&str] = &[
    r#"{"entries":[{"srcIP":"2001:db8::1","srcPort":25,"dstPort":25},{"srcPort":26,"dstPort":25}]}"#,
    r#"{"entries":[{"srcIP":"2001:db8::7","srcPort":25,"dstPort":2525,"proto":"udp"},{"srcIP":"198.51.100.1","srcPort":25,"dstPort":25}]}"#,
    P25,
    r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcPort":143,"dstPort":143}]}"#,
    r#"{"entries":[{"srcPort":500,"dstPort":500,"proto":"udp"},{"srcPort":500,"dstPort":500}]}"#,
    r#"{"entries":[{"srcIP":"198.51.100.1","srcPort":25,"dstPort":25},{"srcPort":26,"dstPort":25}]}"#,
    r#"{"entries":[{"srcIP":"203.0.113.7","srcPort":143,"dstPort":143},{"srcPort":26,"dstPort":26,"proto":"udp"}]}"#,
    r#"{"entries":[{"srcIP":"198.51.100.1","srcPort":25,"dstPort":25}]}"#,
    r#"{"entries":[{"srcPort":26,"dstPort":25,"proto":"udp"},{"srcPort":25,"dstPort":25}]}"#,
    r#"{"entries":[{"srcPort":25,"dstPort":0}]}"#,
    r#"{"entries":[{"srcPort":22,"dstPort":22}]}"#,
    r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":25,"dstPort":26}]}"#,
    "not json",
    r#"{"entries":[]}"#,
    // The same keys with source allow-lists (both families, one family
    // only, and the same key with other ranges: a change of ranges alone).
    r#"{"entries":[{"srcPort":25,"dstPort":25,"sourceRanges":["198.51.100.0/24","2001:db8:1::/48"]}]}"#,
    r#"{"entries":[{"srcPort":25,"dstPort":25,"sourceRanges":["198.51.100.0/25","192.0.2.0/24"]},{"srcPort":26,"dstPort":25}]}"#,
    r#"{"entries":[{"srcIP":"2001:db8::7","srcPort":25,"dstPort":2525,"proto":"udp","sourceRanges":["2001:db8:1::/48"]}]}"#,
    // Port ranges over the single ports above and over each other: won
    // per port, in parts.
    r#"{"entries":[{"srcPort":23,"srcPortEnd":30,"dstPort":1023,"proto":"udp"}]}"#,
    r#"{"entries":[{"srcPort":25,"srcPortEnd":27,"dstPort":2000}]}"#,
    r#"{"entries":[{"srcPort":24,"srcPortEnd":26,"dstPort":24},{"srcPort":143,"srcPortEnd":150,"dstPort":143,"proto":"udp"}]}"#,
    r#"{"entries":[{"srcIP":"2001:db8::7","srcPort":54,"srcPortEnd":600,"dstPort":30000,"proto":"udp"}]}"#,
    r#"{"entries":[{"srcPort":26,"srcPortEnd":500,"dstPort":3000,"proto":"udp"},{"srcPort":143,"dstPort":143}]}"#,
    // A range restricted to sources: its parts keep the ranges.
    r#"{"entries":[{"srcPort":24,"srcPortEnd":28,"dstPort":3024,"sourceRanges":["198.51.100.0/24","2001:db8:1::/48"]}]}"#,
    // Entries rejected alone, the pod's others published.
    r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":143,"srcPortEnd":5000,"dstPort":143}]}"#,
    r#"{"entries":[{"srcPort":143,"dstPort":143,"sourceRanges":[]},{"srcPort":26,"dstPort":26,"proto":"udp"}]}"#,
];

/// Public addresses the node may have: none, IPv4 alone, both, IPv6 alone.
const ADDRESSES: [DualStack; 5] = [
    DualStack { v4: None, v6: None },
    DualStack {
        v4: Some(PUB),
        v6: None,
    },
    DualStack {
        v4: Some(Ipv4Addr::new(203, 0, 113, 8)),
        v6: Some(V6),
    },
    DualStack {
        v4: Some(PUB),
        v6: Some(V6),
    },
    DualStack {
        v4: None,
        v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 8)),
    },
];
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// The random sequences run dual-stack: both families, each planned on its
/// own, must still equal the full plan.
fn dual() -> PlanConfig {
    PlanConfig {
        families: Families::DUAL,
        local_access: true,
        source_ranges: true,
        ..cfg()
    }
}

#[derive(Clone, Debug)]
enum Event {
    Upsert(PodFacts),
    /// One field of a pod already there changes, as in a status update.
    Tweak(PodRef, u8),
    Remove(PodRef),
    Address(DualStack),
    /// The node's sockets change (the loop keeps the keys it held).
    Services(usize),
    Resync,
}

/// Namespace policies a pod may be under.
fn policy(i: u8) -> NamespacePolicy {
    match i % 5 {
        0 => NamespacePolicy::Open,
        1 => NamespacePolicy::NotSelected,
        2 => NamespacePolicy::Ports(PortAllotment::parse("25,500/udp").unwrap()),
        3 => NamespacePolicy::Ports(PortAllotment::parse("26,143").unwrap()),
        _ => NamespacePolicy::Invalid("bad".into()),
    }
}

/// Node sockets: none; a wildcard on 25/tcp; 143 on the public address and
/// an IPv6 wildcard (taking IPv4) on 26/udp; an IPv6-only 25/tcp.
fn services(i: usize) -> NodeServices {
    let b = |a: &str, v6only| Bound {
        addr: a.parse().unwrap(),
        v6only,
    };
    let socks = match i % 4 {
        0 => vec![],
        1 => vec![(Proto::Tcp, 25, b("0.0.0.0", false))],
        2 => vec![
            (Proto::Tcp, 143, b("203.0.113.7", false)),
            (Proto::Udp, 26, b("::", false)),
        ],
        _ => vec![(Proto::Tcp, 25, b("::", true))],
    };
    NodeServices::from_sockets(socks)
}

fn arb_ref() -> impl Strategy<Value = PodRef> {
    (0u8..2, 0u8..3).prop_map(|(ns, name)| PodRef::new(format!("ns{ns}"), format!("p{name}")))
}

fn arb_facts() -> impl Strategy<Value = PodFacts> {
    (
        arb_ref(),
        (0u8..4, 0u8..3, 0i64..3, any::<bool>()),
        (0u8..8, 0u8..8, 0u8..4),
        (0..ANNOTATIONS.len() + 1, 0u8..8),
    )
        .prop_map(
            |(r, (ip, ip6, created, ready), (term, fin, node), (ann, ns))| {
                let mut p = pod(&r.namespace, &r.name, &format!("10.1.0.{ip}"), created, P25);
                p.ready = ready;
                p.terminating = term == 0;
                p.finished = fin == 0;
                if ip == 0 {
                    p.ips.v4 = None;
                }
                if ip6 > 0 {
                    p.ips.v6 = Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, ip6.into()));
                }
                p.node = match node {
                    0 => Some("node1".into()),
                    1 => Some("node2.example.org".into()),
                    2 => None,
                    _ => p.node,
                };
                p.annotation = ANNOTATIONS.get(ann).map(|a| a.to_string());
                // Mostly open, as most namespaces are.
                p.namespace_policy = policy(ns.saturating_sub(3));
                p
            },
        )
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        5 => arb_facts().prop_map(Event::Upsert),
        5 => (arb_ref(), 0u8..6).prop_map(|(r, t)| Event::Tweak(r, t)),
        3 => arb_ref().prop_map(Event::Remove),
        1 => (0..ADDRESSES.len()).prop_map(|i| Event::Address(ADDRESSES[i])),
        1 => (0..4usize).prop_map(Event::Services),
        1 => Just(Event::Resync),
    ]
}

fn tweak(p: &mut PodFacts, what: u8) {
    match what {
        0 => p.ready = !p.ready,
        1 => {
            let next = p.ips.v4.map_or(1, |ip| ip.octets()[3] % 3 + 1);
            p.ips.v4 = Some(Ipv4Addr::new(10, 1, 0, next));
            // The IPv6 address comes, moves and goes in turn.
            p.ips.v6 = match p.ips.v6.map(|a| a.segments()[7]) {
                None => Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
                Some(1) => Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
                Some(_) => None,
            };
        }
        2 => p.terminating = !p.terminating,
        3 => p.finished = !p.finished,
        4 => {
            let i = ANNOTATIONS
                .iter()
                .position(|a| Some(*a) == p.annotation.as_deref());
            p.annotation = Some(ANNOTATIONS[i.map_or(0, |i| (i + 1) % ANNOTATIONS.len())].into());
        }
        5 => {
            let i = (0..5)
                .find(|i| policy(*i) == p.namespace_policy)
                .unwrap_or(0);
            p.namespace_policy = policy(i + 1);
        }
        _ => {
            p.created = p
                .created
                .map(|t| t + k8s_openapi::jiff::SignedDuration::from_secs(1))
        }
    }
}

/// Everything the table says about one pod (what its events are made of).
fn view_of(t: &NatTable, pod: &PodRef) -> String {
    let mut out = String::new();
    for m in t.rules.dnat.iter().filter(|m| &m.owner == pod) {
        out += &format!("{m:?}");
    }
    for s in t.rules.snat.iter().filter(|s| &s.owner == pod) {
        out += &format!("{s:?}");
    }
    for f in t.rules.forward.iter().filter(|f| &f.owner == pod) {
        out += &format!("{f:?}");
    }
    for c in t.conflicts.iter().filter(|c| &c.loser == pod) {
        out += &format!("{c:?}");
    }
    for r in t.rejected.iter().filter(|r| &r.pod == pod) {
        out += &format!("{r:?}");
    }
    for p in t.pending.iter().filter(|p| &p.pod == pod) {
        out += &format!("{p:?}");
    }
    for r in t.refused.iter().filter(|r| &r.pod == pod) {
        out += &format!("{r:?}");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn incremental_table_equals_the_full_plan_after_every_event(
        events in proptest::collection::vec(arb_event(), 1..40),
    ) {
        let mut pods: BTreeMap<PodRef, PodFacts> = BTreeMap::new();
        let mut address = ADDRESSES[3];
        let mut inc = IncrementalPlan::new(dual(), address);
        let mut burst = TableChange::default();
        let mut shadow = inc.table().clone();
        for event in events {
            let before = inc.table().clone();
            let change = match event {
                Event::Upsert(p) => {
                    pods.insert(p.pod.clone(), p.clone());
                    inc.upsert(p)
                }
                Event::Tweak(r, what) => {
                    let Some(p) = pods.get_mut(&r) else { continue };
                    tweak(p, what);
                    inc.upsert(p.clone())
                }
                Event::Remove(r) => {
                    pods.remove(&r);
                    inc.remove(&r)
                }
                Event::Address(a) => {
                    address = a;
                    inc.set_public_address(a)
                }
                Event::Services(i) => {
                    inc.set_node_services(services(i))
                }
                Event::Resync => {
                    let all: Vec<PodFacts> = pods.values().cloned().collect();
                    inc.reset(&all);
                    // Nothing may change: the state was already up to date.
                    TableChange {
                        rules: Changes::between(&before.rules, &inc.table().rules),
                        pods: BTreeSet::new(),
                    }
                }
            };
            let all: Vec<PodFacts> = pods.values().cloned().collect();
            let want = plan_with(&all, address, inc.node_services(), &dual());
            prop_assert_eq!(inc.table(), &want);
            // No pod port is accepted twice (pods sharing an address).
            for w in want.rules.forward.windows(2) {
                let same = (w[0].pod_ip, w[0].proto) == (w[1].pod_ip, w[1].proto);
                prop_assert!(!same || w[0].pod_port + w[0].span < w[1].pod_port, "{:?}", w);
            }
            // The change is exactly the difference, and applying it gives the new rules.
            prop_assert_eq!(&change.rules, &Changes::between(&before.rules, &want.rules));
            let mut rules = before.rules.clone();
            change.rules.apply_to(&mut rules);
            prop_assert_eq!(&rules, &want.rules);
            // A copy kept up to date by the change alone (the status page's).
            follow(&mut shadow, inc.table(), &change);
            prop_assert_eq!(&shadow, &want);
            burst.absorb(change.clone());
            // Every pod whose own view changed is reported.
            for (ns, name) in (0..2).flat_map(|ns| (0..3).map(move |n| (ns, n))) {
                let p = &PodRef::new(format!("ns{ns}"), format!("p{name}"));
                let mine: Vec<&Mapping> = want.mappings_of(p).collect();
                prop_assert_eq!(inc.mappings_of(p), mine);
                if view_of(&before, p) != view_of(&want, p) {
                    prop_assert!(change.pods.contains(p), "{} changed but is not reported", p);
                }
            }
        }
        // The whole sequence folded into one change is the net difference.
        prop_assert_eq!(&burst.rules, &Changes::between(&RuleSet::default(), &inc.table().rules));
        // A fresh planner reset from the final pods agrees too.
        let all: Vec<PodFacts> = pods.values().cloned().collect();
        let mut fresh = IncrementalPlan::new(dual(), address);
        fresh.services = inc.node_services().clone();
        prop_assert_eq!(fresh.reset(&all), &plan_with(&all, address, inc.node_services(), &dual()));
    }
}

/// 1000 pods x 5 ports: one upsert that adds (or drops) a port against one
/// full `plan()` (+ the full diff the loop makes today). Figures are medians
/// (the machine is shared), no assertion on time:
/// `cargo test --release --lib plan::incremental -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark, run in release with --ignored --nocapture"]
fn bench_one_port_vs_full_plan() {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    fn annotation(i: u16, ports: u16) -> String {
        let entries: Vec<String> = (0..ports)
            .map(|k| {
                format!(
                    r#"{{"srcPort":{},"dstPort":{}}}"#,
                    10000 + i * 10 + k,
                    8000 + k
                )
            })
            .collect();
        format!(r#"{{"entries":[{}]}}"#, entries.join(","))
    }
    fn time<T>(f: impl FnOnce() -> T) -> Duration {
        let t = Instant::now();
        black_box(f());
        t.elapsed()
    }
    let row = |what: &str, mut samples: Vec<Duration>| {
        samples.sort();
        let median = samples[samples.len() / 2].as_secs_f64() * 1e6;
        println!(
            "  {what:<42} {median:9.1} us  (median of {})",
            samples.len()
        );
    };
    let pods: Vec<PodFacts> = (0..1000u16)
        .map(|i| {
            let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            pod(
                "bench",
                &format!("p{i}"),
                &ip,
                i64::from(i),
                &annotation(i, 5),
            )
        })
        .collect();
    let five = pods[500].clone();
    let mut six = five.clone();
    six.annotation = Some(annotation(500, 6));
    let mut not_ready = five.clone();
    not_ready.ready = false;

    let mut inc = IncrementalPlan::new(cfg(), DualStack::v4(PUB));
    inc.reset(&pods);
    println!("1000 pods x 5 ports ({} rules)", inc.table().rules.len());
    let resets = (0..20)
        .map(|_| {
            let mut fresh = IncrementalPlan::new(cfg(), DualStack::v4(PUB));
            time(|| fresh.reset(&pods).rules.len())
        })
        .collect();
    let (mut add, mut drop, mut flip) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2000 {
        add.push(time(|| inc.upsert(six.clone())));
        drop.push(time(|| inc.upsert(five.clone())));
        // A status update that moves no rule (pod 500 has no rival).
        flip.push(time(|| inc.upsert(not_ready.clone())));
        flip.push(time(|| inc.upsert(five.clone())));
    }
    assert_eq!(inc.table(), &plan(&pods, DualStack::v4(PUB), &cfg()));
    // Parts of an upsert: parsing the annotation, and the memmove of a
    // sorted Vec insert + remove in the middle of the DNAT list.
    let text = six.annotation.clone().unwrap_or_default();
    let parse = (0..2000)
        .map(|_| {
            time(|| {
                crate::annotation::parse(&text, &cfg().restricted_ports, Families::default()).ok()
            })
        })
        .collect();
    let mut dnat = inc.table().rules.dnat.clone();
    let shift = (0..2000)
        .map(|_| {
            time(|| {
                let m = dnat.remove(2500);
                dnat.insert(2500, black_box(m));
            })
        })
        .collect();
    let mut with_six = pods.clone();
    with_six[500] = six;
    let before = plan(&pods, DualStack::v4(PUB), &cfg());
    let full = (0..50)
        .map(|_| time(|| plan(&with_six, DualStack::v4(PUB), &cfg())))
        .collect();
    let full_diff = (0..50)
        .map(|_| {
            time(|| {
                let t = plan(&with_six, DualStack::v4(PUB), &cfg());
                Changes::between(&before.rules, &t.rules)
            })
        })
        .collect();
    row("incremental upsert adding 1 port", add);
    row("incremental upsert dropping 1 port", drop);
    row("upsert flipping Ready, no rule moves", flip);
    row("  of an upsert: parse 6 entries", parse);
    row("  of an upsert: DNAT Vec remove + insert", shift);
    row("full plan()", full);
    row("full plan() + Changes::between", full_diff);
    row("reset (first sync)", resets);
}
