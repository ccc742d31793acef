//! Re-planning what one event dirtied: the winner and conflicts of each key,
//! then the SNAT and FORWARD slots, each compared with the table in place.

use std::net::IpAddr;
use std::ops::Range;

use super::{Claim, Dirty, IncrementalPlan, PodState, TableChange};
use crate::firewall::{diff, Changes};
use crate::model::{Family, Mapping, NatKey, Proto, SnatRule, SourceRule};
use crate::plan::ranges::{settle, Claimed};
use crate::plan::{forward_rules, source_rules, Conflict};

impl IncrementalPlan {
    /// Re-plans the dirty keys (winner, conflicts), then the SNAT and FORWARD
    /// slots of every pod whose winning entries may have moved.
    pub(super) fn replan(&mut self, mut dirty: Dirty) -> TableChange {
        let mut rules = Changes::default();
        // Dirty claims in key order; each is re-planned with every claim it
        // overlaps, transitively (a window): what `plan()` settles together.
        let mut done: Option<(IpAddr, u16)> = None;
        for (key, span) in std::mem::take(&mut dirty.keys) {
            let ip = key.public_ip;
            let (mut lo, hi) = (key.public_port, key.public_port + span);
            if let Some((_, last)) = done.filter(|d| d.0 == ip) {
                if hi <= last {
                    continue;
                }
                lo = lo.max(last + 1);
            }
            let last = self.replan_ports(ip, lo, hi, &mut dirty, &mut rules);
            done = Some((ip, last));
        }

        for (pod_ip, proto) in std::mem::take(&mut dirty.snat) {
            // Each candidate's first winning entry of `proto` (annotation
            // order); the highest-ranked candidate owns the slot.
            let want =
                self.candidates_at(pod_ip)
                    .filter_map(|s| {
                        let pod = &s.facts.pod;
                        let family = Family::of(pod_ip);
                        let e = s.entries().iter().find(|e| {
                            e.proto == proto && e.family == family && self.wins(pod, e)
                        })?;
                        Some((s.rank(), self.key_of(e)?.public_ip))
                    })
                    .max_by(|a, b| a.0.cmp(&b.0))
                    .map(|((_, _, owner), public_ip)| (public_ip, owner));
            let list = &self.table.rules.snat;
            let at = list.binary_search_by(|r| (r.pod_ip, r.proto).cmp(&(pod_ip, proto)));
            if at.ok().map(|i| (list[i].public_ip, &list[i].owner)) == want {
                continue;
            }
            let want = want.map(|(public_ip, owner)| SnatRule {
                pod_ip,
                proto,
                public_ip,
                owner: owner.clone(),
            });
            let list = &mut self.table.rules.snat;
            swap_rule(list, at, want, &mut rules.add.snat, &mut rules.del.snat);
        }

        for (pod_ip, proto) in std::mem::take(&mut dirty.forward) {
            // The pod-port runs every candidate at the address won, settled
            // per port as `plan()` settles them.
            let family = Family::of(pod_ip);
            let mut runs = Vec::new();
            for s in self.candidates_at(pod_ip) {
                let pod = &s.facts.pod;
                for e in s.entries() {
                    if e.proto != proto || e.family != family {
                        continue;
                    }
                    for m in self.parts_of(e).filter(|m| &m.owner == pod) {
                        let offset = m.key.public_port - e.src_port;
                        runs.push((e.dst_port + offset, m.span, s.rank(), pod));
                    }
                }
            }
            let want = forward_rules(pod_ip, proto, runs);
            let list = &mut self.table.rules.forward;
            let range = range_of(list, |r| (r.pod_ip, r.proto).cmp(&(pod_ip, proto)));
            if list[range.clone()] == want[..] {
                continue;
            }
            let (add, del) = diff(&list[range.clone()], &want);
            rules.add.forward.extend(add);
            rules.del.forward.extend(del);
            list.splice(range, want);
        }

        for r in [&rules.add, &rules.del] {
            let owners = r.snat.iter().map(|s| &s.owner);
            for owner in owners.chain(r.forward.iter().map(|f| &f.owner)) {
                dirty.touch(owner);
            }
        }
        TableChange {
            rules,
            pods: dirty.pods,
        }
    }

    /// The claims settled together with ports `lo..=hi` of `ip`: every
    /// claim overlapping them, the ports grown until none sticks out (a
    /// closed window, a union of `plan()`'s groups); with the window.
    fn window(&self, ip: IpAddr, mut lo: u16, mut hi: u16) -> Window<'_> {
        loop {
            let claims: Vec<Claimed<&Claim, usize>> = self
                .claims_near(ip, lo, hi)
                .enumerate()
                .map(|(id, (k, c))| Claimed {
                    lo: k.public_port,
                    hi: k.public_port + c.span,
                    proto: k.proto,
                    rank: c,
                    id,
                })
                .collect();
            let l = claims.iter().map(|c| c.lo).fold(lo, u16::min);
            let h = claims.iter().map(|c| c.hi).fold(hi, u16::max);
            if (l, h) == (lo, hi) {
                return Window { ip, lo, hi, claims };
            }
            (lo, hi) = (l, h);
        }
    }

    /// The claims on `ip` covering any of the ports `lo..=hi`.
    fn claims_near(&self, ip: IpAddr, lo: u16, hi: u16) -> impl Iterator<Item = (&NatKey, &Claim)> {
        let from = key_at(ip, lo.saturating_sub(self.reach()), Proto::Tcp);
        self.claims
            .range(from..=key_at(ip, hi, Proto::Udp))
            .flat_map(|(k, set)| set.into_iter().map(move |c| (k, c)))
            .filter(move |(k, c)| k.public_port + c.span >= lo)
    }

    /// The mappings, conflicts and allow-lists a window's claims give,
    /// each sorted.
    fn settle_window(&self, w: &Window<'_>) -> (Vec<Mapping>, Vec<Conflict>, Vec<SourceRule>) {
        let mut dnat: Vec<Mapping> = Vec::new();
        let mut conflicts: Vec<Conflict> = Vec::new();
        let mut allow: Vec<SourceRule> = Vec::new();
        for part in settle(&w.claims) {
            let key = key_at(w.ip, part.lo, part.proto);
            let span = part.hi - part.lo;
            let winner = w.claims[part.winner].rank;
            if let Some(l) = part.loser {
                conflicts.push(Conflict {
                    key,
                    loser: w.claims[l].rank.pod.clone(),
                    winner: winner.pod.clone(),
                    span,
                });
                continue;
            }
            let Some(s) = self.pods.get(&winner.pod) else {
                continue;
            };
            let Some(pod_ip) = s.facts.ips.get(key.family()) else {
                continue;
            };
            let Some(e) = s.entries().get(winner.entry) else {
                continue;
            };
            dnat.push(Mapping {
                key,
                pod_ip,
                pod_port: e.dst_port + (part.lo - e.src_port),
                owner: winner.pod.clone(),
                span,
            });
            allow.extend(source_rules(key, span, e, &winner.pod));
        }
        dnat.sort();
        conflicts.sort();
        allow.sort();
        (dnat, conflicts, allow)
    }

    /// Settles the claims of ports `lo..=hi` of `ip` (grown to a closed
    /// window) and puts the mappings, conflicts and allow-lists they give
    /// in place of the window's, recording the rules that changed; the
    /// window's last port.
    fn replan_ports(
        &mut self,
        ip: IpAddr,
        lo: u16,
        hi: u16,
        dirty: &mut Dirty,
        rules: &mut Changes,
    ) -> u16 {
        let w = self.window(ip, lo, hi);
        let (lo, hi) = (w.lo, w.hi);
        let (dnat, conflicts, allow) = self.settle_window(&w);
        drop(w);
        let window = |k: &NatKey| {
            if k.public_ip != ip {
                k.public_ip.cmp(&ip)
            } else if k.public_port < lo {
                std::cmp::Ordering::Less
            } else if k.public_port > hi {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        };

        let list = &mut self.table.conflicts;
        let range = range_of(list, |c| window(&c.key));
        if list[range.clone()] != conflicts[..] {
            for c in list[range.clone()].iter().chain(&conflicts) {
                dirty.touch(&c.loser);
            }
            list.splice(range, conflicts);
        }
        // The allow-lists follow the winning entries (none without a
        // mapping): compared in place, like the conflicts.
        let list = &mut self.table.rules.allow;
        let range = range_of(list, |a| window(&a.key));
        if list[range.clone()] != allow[..] {
            let (add, del) = diff(&list[range.clone()], &allow);
            rules.add.allow.extend(add);
            rules.del.allow.extend(del);
            list.splice(range, allow);
        }
        let list = &self.table.rules.dnat;
        let range = range_of(list, |m| window(&m.key));
        if list[range.clone()] == dnat[..] {
            return hi;
        }
        let (add, del) = diff(&list[range.clone()], &dnat);
        // The winning entries of every owner whose mappings moved: their
        // SNAT and FORWARD slots are re-planned after (a rebuild has all).
        for m in add.iter().chain(&del) {
            dirty.forward.insert((m.pod_ip, m.key.proto));
            if dirty.rebuild {
                continue;
            }
            if let Some(s) = self.pods.get(&m.owner) {
                dirty.slots_of(s);
            }
            dirty.touch(&m.owner);
        }
        rules.add.dnat.extend(add);
        rules.del.dnat.extend(del);
        self.table.rules.dnat.splice(range, dnat);
        hi
    }

    fn candidates_at(&self, ip: IpAddr) -> impl Iterator<Item = &PodState> + '_ {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|p| self.pods.get(p))
    }
}

/// Claims settled together: every claim on `ip` overlapping ports
/// `lo..=hi`, none sticking out.
struct Window<'a> {
    ip: IpAddr,
    lo: u16,
    hi: u16,
    claims: Vec<Claimed<&'a Claim, usize>>,
}

fn key_at(public_ip: IpAddr, public_port: u16, proto: Proto) -> NatKey {
    NatKey {
        public_ip,
        public_port,
        proto,
    }
}

/// The range of a sorted list whose items compare `Equal` under `cmp`.
pub(super) fn range_of<T>(list: &[T], cmp: impl Fn(&T) -> std::cmp::Ordering) -> Range<usize> {
    let start = list.partition_point(|x| cmp(x).is_lt());
    let end = start + list[start..].partition_point(|x| cmp(x).is_eq());
    start..end
}

/// Puts `want` in the slot found at `at` of a sorted list, recording the rule
/// it adds and the one it deletes.
pub(super) fn swap_rule<T: Clone + PartialEq>(
    list: &mut Vec<T>,
    at: Result<usize, usize>,
    want: Option<T>,
    add: &mut Vec<T>,
    del: &mut Vec<T>,
) {
    match (at, want) {
        (Ok(i), Some(w)) if list[i] == w => {}
        (Ok(i), Some(w)) => {
            del.push(std::mem::replace(&mut list[i], w.clone()));
            add.push(w);
        }
        (Ok(i), None) => del.push(list.remove(i)),
        (Err(i), Some(w)) => {
            list.insert(i, w.clone());
            add.push(w);
        }
        (Err(_), None) => {}
    }
}
