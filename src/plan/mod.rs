//! The pure planner: (pods, public address, config) → the NAT table that
//! should exist. No I/O, no clock: every rule of the SPEC is a unit test here.
//!
//! Winner rule for one public address:port/proto: Ready pods beat not-ready
//! ones, then the later `creationTimestamp` wins, then the greater
//! `namespace/name` (so the result never depends on the order pods arrive in).
//!
//! `plan()` is the full planner (first sync, resync) and the oracle of
//! `incremental`, which re-plans one pod event at a time.

pub mod admission;
pub(crate) mod incremental;
pub(crate) mod ranges;
pub mod selector;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use self::admission::node_refuses_span;
pub use self::admission::{NamespacePolicy, NodeServices, Refusal, RefusalReason};
use crate::annotation::{self, AnnotationError};
use crate::config::short_node_name;
use crate::model::{
    DualStack, Families, Family, ForwardRule, LocalPod, Mapping, NatKey, PodRef, PortMapping,
    Proto, RuleSet, SnatRule, SourceRule,
};

/// What the planner needs to know about one pod (built from the Kubernetes
/// object at the edge, see `kube::pod`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub pod: PodRef,
    pub node: Option<String>,
    /// `status.podIPs`: at most one address per family.
    pub ips: DualStack,
    pub created: Option<Timestamp>,
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// Phase Succeeded or Failed.
    pub finished: bool,
    /// The value of the podnat annotation, if the pod carries it.
    pub annotation: Option<String>,
    /// `spec.hostNetwork`: its "pod IP" is the node's own address.
    pub host_network: bool,
    /// What the admin allows the pod's namespace (from the namespace watch;
    /// `Open` where no policy applies).
    pub namespace_policy: NamespacePolicy,
}

/// Planner settings (a slice of `Config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    pub node_id: String,
    pub restricted_ports: BTreeSet<u16>,
    pub families: Families,
    /// `-localaccess`: plan the hairpin sources (every pod on this node).
    pub local_access: bool,
    /// The flavor enforces `sourceRanges`; if not, an entry carrying them is
    /// rejected alone (published to every source it would be wider than
    /// asked).
    pub source_ranges: bool,
}

/// The allow-list of the part at `key` (and the `span` ports after it) won by
/// entry `e` of `owner` (none: every source).
pub(crate) fn source_rules<'a>(
    key: NatKey,
    span: u16,
    e: &'a PortMapping,
    owner: &'a PodRef,
) -> impl Iterator<Item = SourceRule> + 'a {
    e.sources
        .iter()
        .flat_map(|s| s.iter())
        .map(move |&source| SourceRule {
            key,
            span,
            source,
            owner: owner.clone(),
        })
}

/// A pod that claimed a port another pod won.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    pub key: NatKey,
    pub loser: PodRef,
    pub winner: PodRef,
    /// Ports after `key`'s the loser lost too (a range's part).
    pub span: u16,
}

impl Conflict {
    /// The ports lost: `203.0.113.7:25/tcp`, or `203.0.113.7:10040-10059/udp`
    /// for a range's part.
    pub fn ports(&self) -> String {
        if self.span == 0 {
            return self.key.to_string();
        }
        let end = u32::from(self.key.public_port) + u32::from(self.span);
        format!(
            "{}-{end}/{}",
            crate::model::host_port(self.key.public_ip, self.key.public_port),
            self.key.proto
        )
    }
}

/// A pod whose annotation, or some of whose entries, were rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub pod: PodRef,
    pub rejected: Rejected,
}

/// What of an annotation was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// All of it: the pod gets no NAT.
    Annotation(AnnotationError),
    /// These entries alone (the first error of each; see
    /// [`annotation::Parsed::rejected`]); `others`: the annotation has
    /// other entries, which go on as if these were not there.
    Entries {
        errors: Vec<AnnotationError>,
        others: bool,
    },
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Annotation(e) => write!(f, "annotation rejected, no NAT for this pod: {e}"),
            Rejected::Entries { errors, others } => {
                if *others {
                    write!(
                        f,
                        "entries rejected alone, the pod's other entries are unaffected: "
                    )?;
                } else {
                    write!(f, "every entry rejected, no NAT for this pod: ")?;
                }
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

impl Rejection {
    /// The rejection a parse result makes, if any.
    pub fn of(pod: &PodRef, parsed: &Result<annotation::Parsed, AnnotationError>) -> Option<Self> {
        let rejected = match parsed {
            Err(e) => Rejected::Annotation(e.clone()),
            Ok(p) if p.rejected.is_empty() => return None,
            Ok(p) => Rejected::Entries {
                errors: p.rejected.clone(),
                others: !p.mappings.is_empty(),
            },
        };
        Some(Rejection {
            pod: pod.clone(),
            rejected,
        })
    }
}

/// An auto-address entry waiting for a public address to be detected.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Pending {
    pub pod: PodRef,
    pub entry: usize,
    pub family: Family,
    pub public_port: u16,
    pub proto: Proto,
    pub pod_port: u16,
    /// The ports after the first (a range, `srcPortEnd`).
    pub span: u16,
}

/// The planner's answer: the rules to program plus what to tell users.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatTable {
    /// The node's public address per family (auto entries use them).
    pub public_address: DualStack,
    pub rules: RuleSet,
    pub conflicts: Vec<Conflict>,
    pub rejected: Vec<Rejection>,
    pub pending: Vec<Pending>,
    /// Entries of valid annotations that may not be published (namespace
    /// policy, node services), sorted by pod then entry.
    pub refused: Vec<Refusal>,
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

/// The addresses a pod on this node is a hairpin source with: every enabled
/// family's IP of a pod that has its own network and has not finished (a
/// terminating pod still talks during its grace period); none with
/// `-localaccess=false`. Annotated or not: the pod that reaches a published
/// port is usually a plain client.
pub(crate) fn local_ips(p: &PodFacts, cfg: &PlanConfig) -> Vec<IpAddr> {
    if !cfg.local_access
        || p.host_network
        || p.finished
        || !on_node(p.node.as_deref(), &cfg.node_id)
    {
        return Vec::new();
    }
    cfg.families.iter().filter_map(|f| p.ips.get(f)).collect()
}

/// The hairpin sources of `pods`: one per address, the greater pod owning a
/// shared one.
fn local_pods(pods: &[PodFacts], cfg: &PlanConfig) -> Vec<LocalPod> {
    let mut at: BTreeMap<IpAddr, &PodRef> = BTreeMap::new();
    for p in pods {
        for ip in local_ips(p, cfg) {
            let slot = at.entry(ip).or_insert(&p.pod);
            if p.pod > **slot {
                *slot = &p.pod;
            }
        }
    }
    at.into_iter()
        .map(|(pod_ip, owner)| LocalPod {
            pod_ip,
            owner: owner.clone(),
        })
        .collect()
}

/// Ordering of candidates for one key: the greatest wins.
fn rank(p: &PodFacts) -> (bool, Option<Timestamp>, &str, &str) {
    (p.ready, p.created, &p.pod.namespace, &p.pod.name)
}

/// A pod-port run a candidate won: (its index in `parsed`, first pod port,
/// span).
type PodPortRun = (usize, u16, u16);

/// The FORWARD rules of one pod address and protocol from the pod-port
/// runs its candidates won (`(first, span, rank, pod)`), settled per port
/// as public ports are: pods sharing an address (hostNetwork pods, or an
/// address reused before the old pod is gone) never accept one port twice
/// — a port's rule is the highest-ranked pod's, a run cut where another
/// pod's holds ports. The full and the incremental planner both end here.
pub(crate) fn forward_rules<R: Ord>(
    pod_ip: IpAddr,
    proto: Proto,
    runs: Vec<(u16, u16, R, &PodRef)>,
) -> Vec<ForwardRule> {
    let mut owners = Vec::with_capacity(runs.len());
    let mut claims: Vec<ranges::Claimed<R, usize>> = runs
        .into_iter()
        .enumerate()
        .map(|(id, (lo, span, rank, owner))| {
            owners.push(owner);
            ranges::Claimed {
                lo,
                hi: lo + span,
                proto,
                rank,
                id,
            }
        })
        .collect();
    claims.sort_by_key(|c| c.lo);
    let rule = |lo: u16, hi: u16, id: usize| ForwardRule {
        pod_ip,
        proto,
        pod_port: lo,
        owner: owners[id].clone(),
        span: hi - lo,
    };
    // The usual case: no two runs overlap, each is its rule.
    if claims.windows(2).all(|w| w[0].hi < w[1].lo) {
        return claims.iter().map(|c| rule(c.lo, c.hi, c.id)).collect();
    }
    let mut out: Vec<ForwardRule> = ranges::overlapping_groups(&claims)
        .into_iter()
        .flat_map(ranges::settle)
        .filter(|part| part.loser.is_none())
        .map(|part| rule(part.lo, part.hi, part.winner))
        .collect();
    out.sort();
    out
}

fn outranks(a: &PodFacts, b: &PodFacts) -> bool {
    rank(a).cmp(&rank(b)) == Ordering::Greater
}

/// Plans the NAT table for `pods` on `cfg.node_id`, no node service in
/// the way.
pub fn plan(pods: &[PodFacts], public_address: DualStack, cfg: &PlanConfig) -> NatTable {
    plan_with(pods, public_address, &NodeServices::default(), cfg)
}

/// Plans the NAT table for `pods` on `cfg.node_id`; an entry whose key a
/// node service serves is refused (unless `services` keeps it).
pub fn plan_with(
    pods: &[PodFacts],
    public_address: DualStack,
    services: &NodeServices,
    cfg: &PlanConfig,
) -> NatTable {
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
        let result = annotation::parse_for(text, cfg);
        table.rejected.extend(Rejection::of(&p.pod, &result));
        if let Ok(entries) = result {
            parsed.push((p, entries.mappings));
        }
    }
    table.rejected.sort_by(|a, b| a.pod.cmp(&b.pod));
    table.rejected.dedup_by(|a, b| a.pod == b.pod);

    // Candidates claim runs of ports (one port: a run of one), per public
    // address.
    let mut claims: BTreeMap<IpAddr, Vec<ranges::Claimed<_, (usize, usize)>>> = BTreeMap::new();
    for (pi, (p, entries)) in parsed.iter().enumerate() {
        if p.terminating || p.finished {
            continue;
        }
        for (ei, e) in entries.iter().enumerate() {
            // An entry of a family the pod has no IP of claims nothing.
            if p.ips.get(e.family).is_none() {
                continue;
            }
            let known_ip = e.src_ip.or(public_address.get(e.family));
            if let Some(reason) = p.namespace_policy.refuses_span(e.src_port, e.span, e.proto) {
                table.refused.push(refusal(&p.pod, e, known_ip, reason));
                continue;
            }
            let Some(public_ip) = known_ip else {
                table.pending.push(Pending {
                    pod: p.pod.clone(),
                    entry: e.entry,
                    family: e.family,
                    public_port: e.src_port,
                    proto: e.proto,
                    pod_port: e.dst_port,
                    span: e.span,
                });
                continue;
            };
            let key = NatKey {
                public_ip,
                public_port: e.src_port,
                proto: e.proto,
            };
            if let Some(reason) = node_refuses_span(services, &key, e.span) {
                table.refused.push(refusal(&p.pod, e, known_ip, reason));
                continue;
            }
            claims.entry(public_ip).or_default().push(ranges::Claimed {
                lo: e.src_port,
                hi: e.src_end(),
                proto: e.proto,
                rank: rank(p),
                id: (pi, ei),
            });
        }
    }

    // Winner per port; remember which entries won any, per pod.
    let mut won: BTreeSet<(usize, usize)> = BTreeSet::new();
    // Pod-port runs to accept in FORWARD, per pod IP and protocol.
    let mut forward: BTreeMap<(IpAddr, Proto), Vec<PodPortRun>> = BTreeMap::new();
    for (public_ip, mut list) in claims {
        list.sort_by_key(|c| c.lo);
        for group in ranges::overlapping_groups(&list) {
            for part in ranges::settle(group) {
                let (wp, we) = part.winner;
                let winner = parsed[wp].0;
                let key = NatKey {
                    public_ip,
                    public_port: part.lo,
                    proto: part.proto,
                };
                let span = part.hi - part.lo;
                if let Some((lp, _)) = part.loser {
                    table.conflicts.push(Conflict {
                        key,
                        loser: parsed[lp].0.pod.clone(),
                        winner: winner.pod.clone(),
                        span,
                    });
                    continue;
                }
                let Some(pod_ip) = winner.ips.get(key.family()) else {
                    continue;
                };
                won.insert((wp, we));
                let e = &parsed[wp].1[we];
                let pod_port = e.dst_port + (part.lo - e.src_port);
                table.rules.dnat.push(Mapping {
                    key,
                    pod_ip,
                    pod_port,
                    owner: winner.pod.clone(),
                    span,
                });
                table
                    .rules
                    .allow
                    .extend(source_rules(key, span, e, &winner.pod));
                forward
                    .entry((pod_ip, e.proto))
                    .or_default()
                    .push((wp, pod_port, span));
            }
        }
    }

    // SNAT per (pod IP, proto): the first winning entry in annotation order.
    // When two pods share a key there (an IP reused before the old pod is
    // gone), the higher-ranked pod owns it. Per family: an IPv6 pod address
    // is SNATed to an IPv6 public address.
    let mut snat: BTreeMap<(IpAddr, Proto), (usize, IpAddr)> = BTreeMap::new();
    for &(pi, ei) in &won {
        let (p, entries) = &parsed[pi];
        let e = &entries[ei];
        let Some(ip) = p.ips.get(e.family) else {
            continue;
        };
        let Some(public_ip) = e.src_ip.or(public_address.get(e.family)) else {
            continue;
        };
        let first_won = (0..=ei).find(|i| {
            let x = &entries[*i];
            won.contains(&(pi, *i)) && x.proto == e.proto && x.family == e.family
        });
        if first_won == Some(ei) {
            let slot = snat.entry((ip, e.proto)).or_insert((pi, public_ip));
            if outranks(p, parsed[slot.0].0) {
                *slot = (pi, public_ip);
            }
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
        .flat_map(|((pod_ip, proto), runs)| {
            let claims = runs
                .iter()
                .map(|&(pi, lo, span)| (lo, span, rank(parsed[pi].0), &parsed[pi].0.pod))
                .collect();
            forward_rules(pod_ip, proto, claims)
        })
        .collect();
    table.rules.local = local_pods(pods, cfg);
    table.rules.normalize();
    table.conflicts.sort();
    table.pending.sort();
    table.refused.sort();
    table
}

/// The refusal of entry `e` of `pod`.
pub(crate) fn refusal(
    pod: &PodRef,
    e: &PortMapping,
    public_ip: Option<IpAddr>,
    reason: RefusalReason,
) -> Refusal {
    Refusal {
        pod: pod.clone(),
        entry: e.entry,
        family: e.family,
        public_ip,
        public_port: e.src_port,
        span: e.span,
        proto: e.proto,
        reason,
    }
}

#[cfg(test)]
pub(crate) mod tests;
