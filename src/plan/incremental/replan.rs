//! Re-planning what one event dirtied: the winner and conflicts of each key,
//! then the SNAT and FORWARD slots, each compared with the table in place.

use std::net::IpAddr;
use std::ops::Range;

use super::{Dirty, IncrementalPlan, PodState, TableChange};
use crate::firewall::{diff, Changes};
use crate::model::{Family, ForwardRule, Mapping, SnatRule, SourceRule};
use crate::plan::{source_rules, Conflict};

impl IncrementalPlan {
    /// Re-plans the dirty keys (winner, conflicts), then the SNAT and FORWARD
    /// slots of every pod whose winning entries may have moved.
    pub(super) fn replan(&mut self, mut dirty: Dirty) -> TableChange {
        let mut rules = Changes::default();
        for key in std::mem::take(&mut dirty.keys) {
            let claims = self.claims.get(&key);
            let winner = claims.and_then(|c| c.last());
            let want = winner.and_then(|w| {
                let s = self.pods.get(&w.pod)?;
                let ip = s.facts.ips.get(key.family())?;
                Some((ip, s.entries().get(w.entry)?.dst_port, &w.pod))
            });
            let mut conflicts: Vec<Conflict> = winner
                .into_iter()
                .flat_map(|w| {
                    claims
                        .into_iter()
                        .flatten()
                        .filter(move |c| c.pod != w.pod)
                        .map(move |c| Conflict {
                            key,
                            loser: c.pod.clone(),
                            winner: w.pod.clone(),
                        })
                })
                .collect();
            conflicts.sort();
            let list = &mut self.table.conflicts;
            let range = range_of(list, |c| c.key.cmp(&key));
            if list[range.clone()] != conflicts[..] {
                for c in list[range.clone()].iter().chain(&conflicts) {
                    dirty.touch(&c.loser);
                }
                list.splice(range, conflicts);
            }
            // The key's allow-list follows its winning entry (none without a
            // mapping): compared in place, like the conflicts.
            let allow: Vec<SourceRule> = winner
                .and_then(|w| {
                    let s = self.pods.get(&w.pod)?;
                    s.facts.ips.get(key.family())?;
                    let e = s.entries().get(w.entry)?;
                    Some(source_rules(key, e, &w.pod).collect())
                })
                .unwrap_or_default();
            let list = &mut self.table.rules.allow;
            let range = range_of(list, |a| a.key.cmp(&key));
            if list[range.clone()] != allow[..] {
                let (add, del) = diff(&list[range.clone()], &allow);
                rules.add.allow.extend(add);
                rules.del.allow.extend(del);
                list.splice(range, allow);
            }
            // Compared before it is built: most re-planned keys keep their
            // mapping, and building one allocates its owner.
            let dnat = &self.table.rules.dnat;
            let at = dnat.binary_search_by(|m| m.key.cmp(&key));
            let old = at.ok().map(|i| &dnat[i]);
            if old.map(|m| (m.pod_ip, m.pod_port, &m.owner)) == want {
                continue;
            }
            let mapping = want.map(|(pod_ip, pod_port, owner)| Mapping {
                key,
                pod_ip,
                pod_port,
                owner: owner.clone(),
            });
            let old = old.map(|m| m.owner.clone());
            // The winning entries of both owners moved: their SNAT and
            // FORWARD slots are re-planned below (a rebuild has all of them).
            let rebuild = dirty.rebuild;
            let owners = old.iter().chain(mapping.as_ref().map(|m| &m.owner));
            for owner in owners.filter(|_| !rebuild) {
                if let Some(s) = self.pods.get(owner) {
                    dirty.slots_of(s);
                }
                dirty.touch(owner);
            }
            let dnat = &mut self.table.rules.dnat;
            swap_rule(dnat, at, mapping, &mut rules.add.dnat, &mut rules.del.dnat);
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

        for (pod_ip, proto, pod_port) in std::mem::take(&mut dirty.forward) {
            let want = self
                .candidates_at(pod_ip)
                .filter(|s| {
                    s.entries().iter().any(|e| {
                        e.proto == proto
                            && e.dst_port == pod_port
                            && e.family == Family::of(pod_ip)
                            && self.wins(&s.facts.pod, e)
                    })
                })
                .max_by(|a, b| a.rank().cmp(&b.rank()))
                .map(|s| &s.facts.pod);
            let list = &self.table.rules.forward;
            let at = list.binary_search_by(|r| {
                (r.pod_ip, r.proto, r.pod_port).cmp(&(pod_ip, proto, pod_port))
            });
            if at.ok().map(|i| &list[i].owner) == want {
                continue;
            }
            let want = want.map(|owner| ForwardRule {
                pod_ip,
                proto,
                pod_port,
                owner: owner.clone(),
            });
            let list = &mut self.table.rules.forward;
            swap_rule(
                list,
                at,
                want,
                &mut rules.add.forward,
                &mut rules.del.forward,
            );
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

    fn candidates_at(&self, ip: IpAddr) -> impl Iterator<Item = &PodState> + '_ {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|p| self.pods.get(p))
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
