//! The pure planner: (pods, public address, config) → the NAT table that
//! should exist. No I/O, no clock: every rule of the SPEC is a unit test here.
//!
//! Winner rule for one public address:port/proto: Ready pods beat not-ready
//! ones, then the later `creationTimestamp` wins, then the greater
//! `namespace/name` (so the result never depends on the order pods arrive in).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::annotation::{self, AnnotationError};
use crate::config::short_node_name;
use crate::model::{ForwardRule, Mapping, NatKey, PodRef, PortMapping, Proto, RuleSet, SnatRule};

/// What the planner needs to know about one pod (built from the Kubernetes
/// object at the edge, see `kube::pod`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub pod: PodRef,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub created: Option<Timestamp>,
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// Phase Succeeded or Failed.
    pub finished: bool,
    /// The value of the podnat annotation, if the pod carries it.
    pub annotation: Option<String>,
}

/// Planner settings (a slice of `Config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    pub node_id: String,
    pub restricted_ports: BTreeSet<u16>,
}

/// A pod that claimed a port another pod won.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    pub key: NatKey,
    pub loser: PodRef,
    pub winner: PodRef,
}

/// A pod whose annotation was rejected: it gets no NAT at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub pod: PodRef,
    pub error: AnnotationError,
}

/// An auto-address entry waiting for a public address to be detected.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Pending {
    pub pod: PodRef,
    pub entry: usize,
    pub public_port: u16,
    pub proto: Proto,
    pub pod_port: u16,
}

/// The planner's answer: the rules to program plus what to tell users.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatTable {
    pub public_address: Option<Ipv4Addr>,
    pub rules: RuleSet,
    pub conflicts: Vec<Conflict>,
    pub rejected: Vec<Rejection>,
    pub pending: Vec<Pending>,
}

impl NatTable {
    /// Winning mappings of one pod, in public-key order.
    pub fn mappings_of<'a>(&'a self, pod: &'a PodRef) -> impl Iterator<Item = &'a Mapping> + 'a {
        self.rules.dnat.iter().filter(move |m| &m.owner == pod)
    }
}

/// Does this pod run on the node we serve? Both sides cut at the first dot,
/// as the Go version matched them.
pub fn on_node(pod_node: Option<&str>, node_id: &str) -> bool {
    pod_node.is_some_and(|n| short_node_name(n) == short_node_name(node_id))
}

/// Ordering of candidates for one key: the greatest wins.
fn rank(p: &PodFacts) -> (bool, Option<Timestamp>, &str, &str) {
    (p.ready, p.created, &p.pod.namespace, &p.pod.name)
}

fn outranks(a: &PodFacts, b: &PodFacts) -> bool {
    rank(a).cmp(&rank(b)) == Ordering::Greater
}

/// Plans the NAT table for `pods` on `cfg.node_id`.
pub fn plan(pods: &[PodFacts], public_address: Option<Ipv4Addr>, cfg: &PlanConfig) -> NatTable {
    let mut table = NatTable {
        public_address,
        ..NatTable::default()
    };
    // Pods on this node with an annotation, parsed once.
    let mut parsed: Vec<(&PodFacts, Vec<PortMapping>)> = Vec::new();
    for p in pods {
        let Some(text) = p.annotation.as_deref() else {
            continue;
        };
        if !on_node(p.node.as_deref(), &cfg.node_id) {
            continue;
        }
        match annotation::parse(text, &cfg.restricted_ports) {
            Ok(entries) => parsed.push((p, entries)),
            Err(error) => table.rejected.push(Rejection {
                pod: p.pod.clone(),
                error,
            }),
        }
    }
    table.rejected.sort_by(|a, b| a.pod.cmp(&b.pod));
    table.rejected.dedup_by(|a, b| a.pod == b.pod);

    // Candidates claim keys.
    let mut claims: BTreeMap<NatKey, Vec<(usize, usize)>> = BTreeMap::new();
    for (pi, (p, entries)) in parsed.iter().enumerate() {
        if p.ip.is_none() || p.terminating || p.finished {
            continue;
        }
        for (ei, e) in entries.iter().enumerate() {
            let Some(public_ip) = e.src_ip.or(public_address) else {
                table.pending.push(Pending {
                    pod: p.pod.clone(),
                    entry: ei,
                    public_port: e.src_port,
                    proto: e.proto,
                    pod_port: e.dst_port,
                });
                continue;
            };
            let key = NatKey {
                public_ip,
                public_port: e.src_port,
                proto: e.proto,
            };
            claims.entry(key).or_default().push((pi, ei));
        }
    }

    // Winner per key; remember which entries won, per pod.
    let mut won: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (key, claimants) in &claims {
        let Some(&(wp, we)) = claimants.iter().reduce(|a, b| {
            if outranks(parsed[b.0].0, parsed[a.0].0) {
                b
            } else {
                a
            }
        }) else {
            continue;
        };
        won.insert((wp, we));
        let winner = parsed[wp].0;
        let Some(pod_ip) = winner.ip else { continue };
        table.rules.dnat.push(Mapping {
            key: *key,
            pod_ip,
            pod_port: parsed[wp].1[we].dst_port,
            owner: winner.pod.clone(),
        });
        for &(lp, _) in claimants {
            if lp != wp {
                table.conflicts.push(Conflict {
                    key: *key,
                    loser: parsed[lp].0.pod.clone(),
                    winner: winner.pod.clone(),
                });
            }
        }
    }

    // SNAT per (pod IP, proto): the first winning entry in annotation order;
    // FORWARD per (pod IP, proto, pod port). When two pods share a key there
    // (an IP reused before the old pod is gone), the higher-ranked pod owns it.
    let mut snat: BTreeMap<(Ipv4Addr, Proto), (usize, Ipv4Addr)> = BTreeMap::new();
    let mut forward: BTreeMap<(Ipv4Addr, Proto, u16), usize> = BTreeMap::new();
    for &(pi, ei) in &won {
        let (p, entries) = &parsed[pi];
        let (Some(ip), e) = (p.ip, &entries[ei]) else {
            continue;
        };
        let Some(public_ip) = e.src_ip.or(public_address) else {
            continue;
        };
        let first_won = (0..=ei).find(|i| won.contains(&(pi, *i)) && entries[*i].proto == e.proto);
        if first_won == Some(ei) {
            let slot = snat.entry((ip, e.proto)).or_insert((pi, public_ip));
            if outranks(p, parsed[slot.0].0) {
                *slot = (pi, public_ip);
            }
        }
        let slot = forward.entry((ip, e.proto, e.dst_port)).or_insert(pi);
        if outranks(p, parsed[*slot].0) {
            *slot = pi;
        }
    }
    table.rules.snat = snat
        .into_iter()
        .map(|((pod_ip, proto), (pi, public_ip))| SnatRule {
            pod_ip,
            proto,
            public_ip,
            owner: parsed[pi].0.pod.clone(),
        })
        .collect();
    table.rules.forward = forward
        .into_iter()
        .map(|((pod_ip, proto, pod_port), pi)| ForwardRule {
            pod_ip,
            proto,
            pod_port,
            owner: parsed[pi].0.pod.clone(),
        })
        .collect();
    table.rules.normalize();
    table.conflicts.sort();
    table.pending.sort();
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn ts(secs: i64) -> Option<Timestamp> {
        Some(Timestamp::from_second(secs).unwrap())
    }

    fn pod(ns: &str, name: &str, ip: &str, created: i64, ann: &str) -> PodFacts {
        PodFacts {
            pod: PodRef::new(ns, name),
            node: Some("node1.example.org".into()),
            ip: Some(ip.parse().unwrap()),
            created: ts(created),
            ready: true,
            terminating: false,
            finished: false,
            annotation: Some(ann.into()),
        }
    }

    fn cfg() -> PlanConfig {
        PlanConfig {
            node_id: "node1".into(),
            restricted_ports: [22, 53, 6443].into_iter().collect(),
        }
    }

    const PUB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    const P25: &str = r#"{"entries":[{"srcPort":25,"dstPort":25}]}"#;

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
        let t = plan(&[p], Some(PUB), &cfg());
        assert_eq!(t.rules.dnat.len(), 3);
        assert!(t
            .rules
            .dnat
            .iter()
            .all(|m| m.key.public_ip == PUB && m.pod_ip == Ipv4Addr::new(10, 1, 0, 5)));
        assert_eq!(
            t.rules.snat,
            vec![SnatRule {
                pod_ip: Ipv4Addr::new(10, 1, 0, 5),
                proto: Proto::Tcp,
                public_ip: PUB,
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
        let t = plan(&[old, new], Some(PUB), &cfg());
        assert_eq!(owners(&t), vec!["a:new"]);
        assert_eq!(t.conflicts.len(), 1);
        assert_eq!(t.conflicts[0].loser, PodRef::new("a", "old"));
        assert_eq!(t.conflicts[0].winner, PodRef::new("a", "new"));
        // The loser gets no SNAT / FORWARD either.
        assert!(t.rules.snat.iter().all(|s| s.owner.name == "new"));
        assert!(t.rules.forward.iter().all(|s| s.owner.name == "new"));
    }

    #[test]
    fn ready_beats_newer() {
        let old = pod("a", "old", "10.1.0.1", 100, P25);
        let mut new = pod("a", "new", "10.1.0.2", 200, P25);
        new.ready = false;
        let t = plan(&[new, old], Some(PUB), &cfg());
        assert_eq!(owners(&t), vec!["a:old"]);
    }

    #[test]
    fn ties_go_by_namespace_then_name() {
        let t = plan(
            &[
                pod("b", "x", "10.1.0.1", 100, P25),
                pod("a", "z", "10.1.0.2", 100, P25),
            ],
            Some(PUB),
            &cfg(),
        );
        assert_eq!(owners(&t), vec!["b:x"]);
        let t = plan(
            &[
                pod("a", "y", "10.1.0.1", 100, P25),
                pod("a", "z", "10.1.0.2", 100, P25),
            ],
            Some(PUB),
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
        no_ip.ip = None;
        let mut elsewhere = pod("a", "e", "10.1.0.4", 300, P25);
        elsewhere.node = Some("node2.example.org".into());
        let mut unscheduled = pod("a", "u", "10.1.0.6", 300, P25);
        unscheduled.node = None;
        let ok = pod("a", "ok", "10.1.0.5", 100, P25);
        let t = plan(
            &[terminating, finished, no_ip, elsewhere, unscheduled, ok],
            Some(PUB),
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
        assert_eq!(plan(&[p], Some(PUB), &c).rules.dnat.len(), 1);
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
        let t = plan(std::slice::from_ref(&p), Some(PUB), &cfg());
        let keys: Vec<String> = t.rules.dnat.iter().map(|m| m.key.to_string()).collect();
        assert_eq!(keys, vec!["198.51.100.9:443/tcp", "203.0.113.7:80/tcp"]);
        // SNAT goes to the first entry's address (annotation order).
        assert_eq!(t.rules.snat.len(), 1);
        assert_eq!(t.rules.snat[0].public_ip, PUB);

        let t = plan(&[p], None, &cfg());
        assert_eq!(keys_of(&t), vec!["198.51.100.9:443/tcp"]);
        assert_eq!(
            t.pending,
            vec![Pending {
                pod: PodRef::new("a", "p"),
                entry: 0,
                public_port: 80,
                proto: Proto::Tcp,
                pod_port: 8080
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
        let t = plan(&[a, b], Some(PUB), &cfg());
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
        let t = plan(&[bad, good], Some(PUB), &cfg());
        assert_eq!(owners(&t), vec!["a:good"]);
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].pod, PodRef::new("a", "bad"));
        assert_eq!(
            t.rejected[0].error.to_string(),
            "entries[0].dstPort: port 0 is reserved"
        );
    }

    #[test]
    fn snat_follows_first_winning_entry_per_protocol() {
        // Entry 0 (public A) is lost to a newer pod; entry 1 (public B) is won.
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
        let t = plan(&[a, b], Some(PUB), &cfg());
        let a_snat = t.rules.snat.iter().find(|s| s.owner.name == "a").unwrap();
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
            let a = plan(&pods, Some(PUB), &cfg());
            let b = plan(&shuffled, Some(PUB), &cfg());
            prop_assert_eq!(&a, &b);
            // Every key has exactly one winner; every loser is a real claimant.
            let keys: BTreeSet<NatKey> = a.rules.dnat.iter().map(|m| m.key).collect();
            prop_assert_eq!(keys.len(), a.rules.dnat.len());
            for c in &a.conflicts {
                prop_assert!(a.rules.dnat.iter().any(|m| m.key == c.key && m.owner == c.winner));
            }
        }
    }
}
