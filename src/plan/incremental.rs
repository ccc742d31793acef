//! Incremental planning: the planner's state kept between pod events, so that
//! one event re-plans only the public keys the pod claims now or held before,
//! and the SNAT / FORWARD slots of the pods whose winning entries moved.
//! `plan()` stays the oracle: after every event `table()` equals `plan()` of
//! the same pods, and the returned changes turn the old rules into the new.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;

use super::admission::node_refuses_span;
use super::{
    on_node, refusal, NatTable, NodeServices, Pending, PlanConfig, PodFacts, Refusal, Rejection,
};
use crate::annotation::{self, AnnotationError};
use crate::firewall::Changes;
use crate::model::{DualStack, Family, Mapping, NatKey, PodRef, PortMapping, Proto};
use replan::range_of;
use small_set::SmallSet;

/// What one event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableChange {
    /// The rules to delete and to add, each list sorted: what the applier
    /// programs, without a diff of the whole table.
    pub(crate) rules: Changes,
    /// Pods whose own part of the table changed (rules, conflicts, rejection,
    /// pending entries): the ones whose events must be looked at again.
    pub(crate) pods: BTreeSet<PodRef>,
}

impl TableChange {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.pods.is_empty()
    }

    /// Folds a later change into this one, so that a burst of events makes
    /// one changeset: a rule added then deleted, or deleted then added back,
    /// drops out. Costs the size of the two changes, not of the table.
    pub(crate) fn absorb(&mut self, later: TableChange) {
        let (a, d) = (&mut self.rules.add, &mut self.rules.del);
        let (a2, d2) = (later.rules.add, later.rules.del);
        fold(&mut a.dnat, &mut d.dnat, a2.dnat, d2.dnat);
        fold(&mut a.snat, &mut d.snat, a2.snat, d2.snat);
        fold(&mut a.forward, &mut d.forward, a2.forward, d2.forward);
        fold(&mut a.local, &mut d.local, a2.local, d2.local);
        fold(&mut a.allow, &mut d.allow, a2.allow, d2.allow);
        self.pods.extend(later.pods);
    }
}

/// Brings `dst`, a copy of an earlier `src` table, up to `src` after
/// `change` (what turned the one into the other): the rules by the change,
/// the conflicts, rejection and pending entries of the pods it names.
/// O(change), but for a pass over the conflicts per named pod.
pub(crate) fn follow(dst: &mut NatTable, src: &NatTable, change: &TableChange) {
    change.rules.apply_to(&mut dst.rules);
    dst.public_address = src.public_address;
    if change.pods.is_empty() {
        return;
    }
    dst.conflicts.retain(|c| !change.pods.contains(&c.loser));
    for pod in &change.pods {
        let theirs = src.conflicts.iter().filter(|c| &c.loser == pod).cloned();
        dst.conflicts.extend(theirs);
        let at = dst.rejected.binary_search_by(|r| r.pod.cmp(pod));
        let now = src.rejected.binary_search_by(|r| r.pod.cmp(pod)).ok();
        match (at, now) {
            (Ok(i), Some(j)) => dst.rejected[i] = src.rejected[j].clone(),
            (Ok(i), None) => {
                dst.rejected.remove(i);
            }
            (Err(i), Some(j)) => dst.rejected.insert(i, src.rejected[j].clone()),
            (Err(_), None) => {}
        }
        let of = |list: &[Pending]| list[range_of(list, |p| p.pod.cmp(pod))].to_vec();
        replace_run(&mut dst.pending, pod, of(&src.pending), |p| &p.pod);
        let of = |list: &[Refusal]| list[range_of(list, |r| r.pod.cmp(pod))].to_vec();
        replace_run(&mut dst.refused, pod, of(&src.refused), |r| &r.pod);
    }
    dst.conflicts.sort();
}

/// Replaces `pod`'s run in `list` (sorted by pod) with `items`; true when
/// that changed it.
fn replace_run<T: PartialEq>(
    list: &mut Vec<T>,
    pod: &PodRef,
    items: Vec<T>,
    pod_of: impl Fn(&T) -> &PodRef,
) -> bool {
    let range = range_of(list, |x| pod_of(x).cmp(pod));
    if list[range.clone()] == items[..] {
        return false;
    }
    list.splice(range, items);
    true
}

/// Two successive changes of one sorted list as one: with S1 = S0 - d1 + a1
/// and S2 = S1 - d2 + a2, S2 - S0 = (a1 - d2) + (a2 - d1) and S0 - S2 =
/// (d1 - a2) + (d2 - a1), each a union of disjoint parts.
fn fold<T: Ord + Clone>(add: &mut Vec<T>, del: &mut Vec<T>, add2: Vec<T>, del2: Vec<T>) {
    fn minus<'a, T: Ord>(x: &'a [T], y: &'a [T]) -> impl Iterator<Item = &'a T> {
        x.iter().filter(|e| y.binary_search(e).is_err())
    }
    let (a1, d1) = (std::mem::take(add), std::mem::take(del));
    add.extend(minus(&a1, &del2).chain(minus(&add2, &d1)).cloned());
    add.sort();
    del.extend(minus(&d1, &add2).chain(minus(&del2, &a1)).cloned());
    del.sort();
}

/// One pod's claim on a public key and the `span` ports after it. The
/// derived order is `plan()`'s rank (Ready, then creation time, then
/// namespace/name), so a port's winner is the greatest claim covering it;
/// `entry` never decides, as a pod claims a port at most once (the
/// annotation rejects overlapping entries).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    ready: bool,
    created: Option<Timestamp>,
    pod: PodRef,
    entry: usize,
    span: u16,
}

/// A pod `plan()` looks at (on this node, annotated), with its annotation
/// parsed once per annotation text.
#[derive(Clone, Debug)]
struct PodState {
    facts: PodFacts,
    parsed: Result<annotation::Parsed, AnnotationError>,
}

impl PodState {
    fn rank(&self) -> (bool, Option<Timestamp>, &PodRef) {
        (self.facts.ready, self.facts.created, &self.facts.pod)
    }

    fn claim(&self, entry: usize, span: u16) -> Claim {
        Claim {
            ready: self.facts.ready,
            created: self.facts.created,
            pod: self.facts.pod.clone(),
            entry,
            span,
        }
    }

    fn entries(&self) -> &[PortMapping] {
        self.parsed.as_ref().map_or(&[], |p| &p.mappings)
    }

    /// Whether the pod is a candidate: an annotation not rejected whole, not
    /// terminating, not finished.
    fn candidate(&self) -> bool {
        let f = &self.facts;
        self.parsed.is_ok() && !(f.terminating || f.finished)
    }

    /// The pod's IP of `family` while the pod is a candidate.
    fn candidate_ip(&self, family: Family) -> Option<IpAddr> {
        self.facts.ips.get(family).filter(|_| self.candidate())
    }

    /// Every IP of a candidate pod.
    fn candidate_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.facts.ips.iter().filter(|_| self.candidate())
    }
}

/// Everything one event may have changed, collected before re-planning it.
#[derive(Default)]
struct Dirty {
    /// Claims that came or went: their first key and span.
    keys: BTreeSet<(NatKey, u16)>,
    snat: BTreeSet<(IpAddr, Proto)>,
    /// Pod addresses and protocols whose FORWARD rules are re-planned.
    forward: BTreeSet<(IpAddr, Proto)>,
    pods: BTreeSet<PodRef>,
    /// A rebuild: every slot is dirty already and nobody asks which pods
    /// changed, so neither is tracked (a third of a rebuild's time).
    rebuild: bool,
}

impl Dirty {
    fn touch(&mut self, pod: &PodRef) {
        if !self.rebuild {
            self.pods.insert(pod.clone());
        }
    }

    /// The SNAT and FORWARD slots a pod's winning entries can hold.
    fn slots_of(&mut self, s: &PodState) {
        for e in s.entries() {
            let Some(ip) = s.candidate_ip(e.family) else {
                continue;
            };
            self.snat.insert((ip, e.proto));
            self.forward.insert((ip, e.proto));
        }
    }
}

/// The NAT table kept up to date one pod event at a time.
///
/// Fed from the pod store: a pod added or changed → `upsert`, gone → `remove`,
/// a new full list (first sync, relist, resync) → `reset`, the public address
/// moved → `set_public_address`. The changes returned are relative to the
/// previous `table()`: after an apply that failed, diff `table().rules`
/// against what the kernel holds instead.
///
/// `table().rules` are sorted Vecs updated in place, so `table()` is free to
/// read; the price is a memmove of the tail per added or deleted rule, about
/// 2 us at 5000 DNAT rules, some 40% of an upsert that adds a port (see
/// `bench_one_port_vs_full_plan`). The sorted `dnat` list doubles as the index
/// of winners by key, so the state holds no second copy of the rules.
#[derive(Debug)]
pub(crate) struct IncrementalPlan {
    cfg: PlanConfig,
    pods: HashMap<PodRef, PodState>,
    /// Claims by their first public key (a range's first port); the
    /// greatest claim covering a port wins it.
    claims: BTreeMap<NatKey, SmallSet<Claim>>,
    /// How many claims there are of each span above 0: the longest bounds
    /// how far back a claim covering a port can start.
    spans: BTreeMap<u16, usize>,
    /// Candidate pods per pod IP: who competes for SNAT and FORWARD there
    /// (two pods share an IP while an old one is not gone yet).
    by_ip: HashMap<IpAddr, SmallSet<PodRef>>,
    /// Hairpin sources: every pod on this node, annotated or not.
    locals: local::Locals,
    /// The node's own sockets: keys they serve are refused.
    services: NodeServices,
    table: NatTable,
}

impl IncrementalPlan {
    pub(crate) fn new(cfg: PlanConfig, public_address: DualStack) -> IncrementalPlan {
        IncrementalPlan {
            cfg,
            pods: HashMap::new(),
            claims: BTreeMap::new(),
            spans: BTreeMap::new(),
            by_ip: HashMap::new(),
            locals: local::Locals::default(),
            services: NodeServices::default(),
            table: NatTable {
                public_address,
                ..NatTable::default()
            },
        }
    }

    /// The current table; equals `plan()` of the pods seen so far.
    pub(crate) fn table(&self) -> &NatTable {
        &self.table
    }

    /// Rebuilds from a full pod list (first sync, resync). Annotations whose
    /// text did not change are not parsed again.
    pub(crate) fn reset(&mut self, pods: &[PodFacts]) -> &NatTable {
        self.reset_locals(pods);
        let mut old = std::mem::take(&mut self.pods);
        let states = pods
            .iter()
            .filter(|f| self.considers(f))
            .map(|f| {
                let parsed = match old.remove(&f.pod) {
                    Some(s) if s.facts.annotation == f.annotation => s.parsed,
                    _ => self.parse(f),
                };
                PodState {
                    facts: f.clone(),
                    parsed,
                }
            })
            .collect();
        self.rebuild(states);
        &self.table
    }

    /// A pod was added or changed (or is seen again unchanged: then nothing
    /// is done).
    pub(crate) fn upsert(&mut self, facts: PodFacts) -> TableChange {
        let ips = crate::plan::local_ips(&facts, &self.cfg);
        let local = self.set_local(&facts.pod, ips);
        let mut change = self.upsert_nat(facts);
        change.rules.add.local = local.add.local;
        change.rules.del.local = local.del.local;
        change
    }

    fn upsert_nat(&mut self, facts: PodFacts) -> TableChange {
        if !self.considers(&facts) {
            return self.remove_nat(&facts.pod);
        }
        if self.pods.get(&facts.pod).is_some_and(|s| s.facts == facts) {
            return TableChange::default();
        }
        let old = self.pods.remove(&facts.pod);
        let parsed = match &old {
            Some(o) if o.facts.annotation == facts.annotation => o.parsed.clone(),
            _ => self.parse(&facts),
        };
        let pod = facts.pod.clone();
        self.replace(&pod, old, Some(PodState { facts, parsed }))
    }

    /// A pod is gone.
    pub(crate) fn remove(&mut self, pod: &PodRef) -> TableChange {
        let local = self.set_local(pod, Vec::new());
        let mut change = self.remove_nat(pod);
        change.rules.add.local = local.add.local;
        change.rules.del.local = local.del.local;
        change
    }

    fn remove_nat(&mut self, pod: &PodRef) -> TableChange {
        match self.pods.remove(pod) {
            Some(old) => self.replace(pod, Some(old), None),
            None => TableChange::default(),
        }
    }

    /// Like `reset`, planned for `address` (the public address changed too).
    pub(crate) fn reset_at(&mut self, pods: &[PodFacts], address: DualStack) -> &NatTable {
        self.table.public_address = address;
        self.reset(pods)
    }

    /// The winning mappings of one pod, in key order: looked up by its own
    /// entries, not by a walk of the table.
    pub(crate) fn mappings_of(&self, pod: &PodRef) -> Vec<&Mapping> {
        let Some(s) = self.pods.get(pod) else {
            return Vec::new();
        };
        let mut out: Vec<&Mapping> = s
            .entries()
            .iter()
            .flat_map(|e| self.parts_of(e))
            .filter(|m| &m.owner == pod)
            .collect();
        out.sort_unstable_by_key(|m| m.key);
        out.dedup_by_key(|m| m.key);
        out
    }

    /// The public address changed: every auto entry moves, so this re-plans
    /// everything (annotations are not parsed again) and diffs the tables.
    pub(crate) fn set_public_address(&mut self, address: DualStack) -> TableChange {
        if address == self.table.public_address {
            return TableChange::default();
        }
        self.replan_all(|s| s.table.public_address = address)
    }

    /// The node's sockets as just read. Unchanged: nothing to do. Changed
    /// (rare: a node service started or stopped): the keys the table holds
    /// that a socket now serves are kept — the agent held them first, the
    /// loop reports them — and everything is re-planned, as an address
    /// change does.
    pub(crate) fn set_node_services(&mut self, sockets: NodeServices) -> TableChange {
        if sockets.same_sockets(&self.services) {
            return TableChange::default();
        }
        let services = self.keeping_held(sockets);
        self.replan_all(|s| s.services = services)
    }

    /// The node's sockets for the next `reset` (which re-plans anyway), the
    /// keys held now kept as `set_node_services` keeps them.
    pub(crate) fn replace_node_services(&mut self, sockets: NodeServices) {
        self.services = self.keeping_held(sockets);
    }

    /// `sockets`, keeping the keys of this table that one of them serves.
    fn keeping_held(&self, sockets: NodeServices) -> NodeServices {
        let held = if sockets.is_empty() {
            Default::default()
        } else {
            let dnat = &self.table.rules.dnat;
            dnat.iter()
                .flat_map(|m| m.ports().map(|(k, _)| k))
                .filter(|k| sockets.serving(k).is_some())
                .collect()
        };
        sockets.keeping(held)
    }

    /// The node's sockets the plan follows.
    pub(crate) fn node_services(&self) -> &NodeServices {
        &self.services
    }

    /// Re-plans every pod after `set` changed an input all of them depend
    /// on, and diffs the tables.
    fn replan_all(&mut self, set: impl FnOnce(&mut Self)) -> TableChange {
        let before = std::mem::take(&mut self.table);
        self.table.public_address = before.public_address;
        set(self);
        self.table.rules.local = before.rules.local.clone();
        let states = std::mem::take(&mut self.pods).into_values().collect();
        self.rebuild(states);
        let rules = Changes::between(&before.rules, &self.table.rules);
        let mut pods = BTreeSet::new();
        for r in [&rules.add, &rules.del] {
            pods.extend(r.dnat.iter().map(|m| m.owner.clone()));
            pods.extend(r.snat.iter().map(|s| s.owner.clone()));
            pods.extend(r.forward.iter().map(|f| f.owner.clone()));
        }
        let (add, del) = crate::firewall::diff(&before.conflicts, &self.table.conflicts);
        pods.extend(add.into_iter().chain(del).map(|c| c.loser));
        let (add, del) = crate::firewall::diff(&before.pending, &self.table.pending);
        pods.extend(add.into_iter().chain(del).map(|p| p.pod));
        let (add, del) = crate::firewall::diff(&before.refused, &self.table.refused);
        pods.extend(add.into_iter().chain(del).map(|r| r.pod));
        TableChange { rules, pods }
    }

    /// The pods `plan()` looks at.
    fn considers(&self, f: &PodFacts) -> bool {
        f.annotation.is_some() && on_node(f.node.as_deref(), &self.cfg.node_id)
    }

    fn parse(&self, f: &PodFacts) -> Result<annotation::Parsed, AnnotationError> {
        annotation::parse_for(f.annotation.as_deref().unwrap_or_default(), &self.cfg)
    }

    fn key_of(&self, e: &PortMapping) -> Option<NatKey> {
        Some(NatKey {
            public_ip: e.src_ip.or(self.table.public_address.get(e.family))?,
            public_port: e.src_port,
            proto: e.proto,
        })
    }

    /// The mappings within entry `e`'s ports, whoever won them: the sorted
    /// DNAT list answers (a binary search, then the parts of a range).
    fn parts_of(&self, e: &PortMapping) -> impl Iterator<Item = &Mapping> + '_ {
        let dnat = &self.table.rules.dnat;
        let key = self.key_of(e);
        let start = key.map_or(dnat.len(), |k| dnat.partition_point(|m| m.key < k));
        let (proto, end) = (e.proto, e.src_end());
        dnat[start..]
            .iter()
            .take_while(move |m| {
                key.is_some_and(|k| m.key.public_ip == k.public_ip && m.key.public_port <= end)
            })
            .filter(move |m| m.key.proto == proto)
    }

    /// Does `pod` win (any port of) entry `e`?
    fn wins(&self, pod: &PodRef, e: &PortMapping) -> bool {
        self.parts_of(e).any(|m| &m.owner == pod)
    }

    /// The longest span of any claim: how far before a port a claim
    /// covering it can start.
    fn reach(&self) -> u16 {
        self.spans.last_key_value().map_or(0, |(s, _)| *s)
    }

    /// Replaces the whole state. Pods go in in `PodRef` order and keys, slots
    /// are re-planned in sorted order, so every sorted insert is an append.
    fn rebuild(&mut self, mut states: Vec<PodState>) {
        // A store holds one pod per name; should a list repeat one, the
        // later copy is kept (reversed, then a stable sort and dedup).
        states.reverse();
        states.sort_by(|a, b| a.facts.pod.cmp(&b.facts.pod));
        states.dedup_by(|a, b| a.facts.pod == b.facts.pod);
        self.pods.clear();
        self.claims.clear();
        self.spans.clear();
        self.by_ip.clear();
        // The hairpin sources do not depend on annotations: kept as they are.
        let local = std::mem::take(&mut self.table.rules.local);
        self.table = NatTable {
            public_address: self.table.public_address,
            ..NatTable::default()
        };
        self.table.rules.local = local;
        let mut dirty = Dirty {
            rebuild: true,
            ..Dirty::default()
        };
        for s in states {
            self.enter(&s, &mut dirty);
            self.pods.insert(s.facts.pod.clone(), s);
        }
        self.replan(dirty);
    }

    /// Swaps one pod's state (`old` already out of `pods`) and re-plans what
    /// either state touches.
    fn replace(
        &mut self,
        pod: &PodRef,
        old: Option<PodState>,
        new: Option<PodState>,
    ) -> TableChange {
        let mut dirty = Dirty::default();
        if let Some(o) = &old {
            self.leave(o, &mut dirty);
        }
        match new {
            Some(n) => {
                self.enter(&n, &mut dirty);
                self.pods.insert(pod.clone(), n);
            }
            None => {
                self.set_rejected(pod, None, &mut dirty);
                self.set_pending(pod, Vec::new(), &mut dirty);
                self.set_refused(pod, Vec::new(), &mut dirty);
            }
        }
        self.replan(dirty)
    }

    /// Indexes a pod's claims and records its rejection and pending entries.
    fn enter(&mut self, s: &PodState, dirty: &mut Dirty) {
        let pod = &s.facts.pod;
        self.set_rejected(pod, Rejection::of(pod, &s.parsed), dirty);
        let mut pending = Vec::new();
        let mut refused = Vec::new();
        for ip in s.candidate_ips() {
            self.by_ip.entry(ip).or_default().insert(pod.clone());
        }
        for (entry, e) in s.entries().iter().enumerate() {
            if s.candidate_ip(e.family).is_none() {
                continue;
            }
            let policy = &s.facts.namespace_policy;
            if let Some(reason) = policy.refuses_span(e.src_port, e.span, e.proto) {
                let ip = e.src_ip.or(self.table.public_address.get(e.family));
                refused.push(refusal(pod, e, ip, reason));
                continue;
            }
            match self.key_of(e) {
                Some(key) => {
                    if let Some(reason) = node_refuses_span(&self.services, &key, e.span) {
                        refused.push(refusal(pod, e, Some(key.public_ip), reason));
                        continue;
                    }
                    self.claims
                        .entry(key)
                        .or_default()
                        .insert(s.claim(entry, e.span));
                    count_span(&mut self.spans, e.span, true);
                    dirty.keys.insert((key, e.span));
                }
                None => pending.push(Pending {
                    pod: pod.clone(),
                    entry: e.entry,
                    family: e.family,
                    public_port: e.src_port,
                    proto: e.proto,
                    pod_port: e.dst_port,
                    span: e.span,
                }),
            }
        }
        dirty.slots_of(s);
        self.set_pending(pod, pending, dirty);
        refused.sort();
        self.set_refused(pod, refused, dirty);
    }

    /// Takes a pod's claims out of the indexes (its rejection and pending
    /// entries are replaced by `enter` or cleared by `replace`).
    fn leave(&mut self, s: &PodState, dirty: &mut Dirty) {
        for ip in s.candidate_ips() {
            if let Some(set) = self.by_ip.get_mut(&ip) {
                set.remove(&s.facts.pod);
                if set.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        for (entry, e) in s.entries().iter().enumerate() {
            if s.candidate_ip(e.family).is_none() {
                continue;
            }
            let Some(key) = self.key_of(e) else { continue };
            if let Some(set) = self.claims.get_mut(&key) {
                // A refused entry claimed nothing.
                if set.remove(&s.claim(entry, e.span)) {
                    count_span(&mut self.spans, e.span, false);
                }
                if set.is_empty() {
                    self.claims.remove(&key);
                }
            }
            dirty.keys.insert((key, e.span));
        }
        dirty.slots_of(s);
    }

    fn set_rejected(&mut self, pod: &PodRef, rejection: Option<Rejection>, dirty: &mut Dirty) {
        let list = &mut self.table.rejected;
        let at = list.binary_search_by(|r| r.pod.cmp(pod));
        match (at, rejection) {
            (Ok(i), Some(r)) if list[i] == r => return,
            (Ok(i), Some(r)) => list[i] = r,
            (Ok(i), None) => {
                list.remove(i);
            }
            (Err(i), Some(r)) => list.insert(i, r),
            (Err(_), None) => return,
        }
        dirty.touch(pod);
    }

    fn set_refused(&mut self, pod: &PodRef, refused: Vec<Refusal>, dirty: &mut Dirty) {
        if replace_run(&mut self.table.refused, pod, refused, |r| &r.pod) {
            dirty.touch(pod);
        }
    }

    fn set_pending(&mut self, pod: &PodRef, pending: Vec<Pending>, dirty: &mut Dirty) {
        if replace_run(&mut self.table.pending, pod, pending, |p| &p.pod) {
            dirty.touch(pod);
        }
    }
}

/// Counts a claim of `span` in or out of `spans` (spans above 0 only).
fn count_span(spans: &mut BTreeMap<u16, usize>, span: u16, up: bool) {
    if span == 0 {
        return;
    }
    let n = spans.entry(span).or_default();
    if up {
        *n += 1;
    } else {
        *n -= 1;
        if *n == 0 {
            spans.remove(&span);
        }
    }
}

mod local;
mod replan;
mod small_set;

#[cfg(test)]
mod tests;
