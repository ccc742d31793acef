//! The iptables flavor's plans: what each of the agent's chains must hold,
//! the minimal deletes and inserts against a read of the kernel (or, on a
//! settled state, against one change), and the state after a commit.

use super::*;

/// The content each of the agent's chains must have, in order.
/// `local`: `-localaccess`, with the name of `<PREFIX>_PRE` (the OUTPUT
/// chain's jump target); `counting`: `-iptablescounters`, with the name of
/// `<PREFIX>_COUNT` (the INPUT counting chain's jump target).
pub(super) fn desired_chains(
    desired: &RuleSet,
    family: Family,
    local: Option<&str>,
    counting: Option<&str>,
) -> [Vec<AgentRule>; N_PLACES] {
    let marks = local.map(|_| desired.local.iter().cloned().map(AgentRule::Mark));
    let pre = marks
        .into_iter()
        .flatten()
        .chain(
            desired
                .dnat_sources()
                .into_iter()
                .map(|(m, src)| AgentRule::Dnat(m.clone(), src)),
        )
        .collect();
    let post = local
        .map(|_| AgentRule::Masquerade)
        .into_iter()
        .chain((0..internal_returns(family).len()).map(AgentRule::Return))
        .chain(desired.snat.iter().cloned().map(AgentRule::Snat))
        .collect();
    let fwd = desired
        .forward
        .iter()
        .cloned()
        .map(AgentRule::Forward)
        .collect();
    let out = local
        .map(|pre| AgentRule::LocalJump(pre.to_string()))
        .into_iter()
        .collect();
    let count = match counting {
        Some(_) => counted(&desired.dnat),
        None => Vec::new(),
    };
    // `<PREFIX>_COUNTIN` holds the jump to `<PREFIX>_COUNT`.
    let count_input = match (counting, local) {
        (Some(count), Some(_)) => vec![AgentRule::Jump(count.to_string())],
        _ => Vec::new(),
    };
    let mut chains: [Vec<AgentRule>; N_PLACES] = [pre, post, fwd, out, count, count_input];
    for c in &mut chains {
        c.sort();
        c.dedup();
    }
    chains
}

/// The counting rules of mappings (one each).
fn counted(dnat: &[Mapping]) -> Vec<AgentRule> {
    dnat.iter()
        .map(|m| AgentRule::Count(rules::Counted::of(m)))
        .collect()
}

/// Up to this many new rules per batch ask the kernel for an echo, whose
/// handles keep the cache complete (the next change needs no re-read);
/// beyond it (a rebuild) the echoes would only fill the socket buffer.
pub(super) const MAX_ECHOED_RULES: usize = 4096;

/// A rule a batch inserts: (chain index, index in that chain's plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inserted {
    Own(usize, usize),
    Jump(usize, usize),
}

/// The handles the kernel echoed for the inserted rules, by sequence number.
/// (The commit's NEWGEN is echoed too, with a sequence number of its own.)
pub(super) fn echoed_handles(
    inserted: &[(u32, Inserted)],
    echoes: &[Echo],
) -> HashMap<Inserted, u64> {
    let by_seq: HashMap<u32, Inserted> = inserted.iter().copied().collect();
    echoes
        .iter()
        .filter(|e| e.msg_type == sys::NFT_MSG_NEWRULE)
        .filter_map(|e| {
            let which = by_seq.get(&e.seq)?;
            Some((*which, e.handle?))
        })
        .collect()
}

/// Everything one apply changes, planned against one read of the kernel.
pub struct Changes {
    /// Per table (`TABLES`): made by this plan.
    pub(super) create_table: [bool; 3],
    pub(super) create_parent: [bool; N_PLACES],
    pub(super) create_own: [bool; N_PLACES],
    /// An own chain of a place no longer managed (`<PREFIX>_OUTPUT` after
    /// `-localaccess` was switched off): emptied by `own`, its jumps deleted
    /// by `jumps`, then the chain itself goes.
    pub(super) delete_own: [bool; N_PLACES],
    /// The base chain of such a place, when the agent made it and nothing
    /// but its jumps are in it: it goes too, last.
    pub(super) delete_parent: [bool; N_PLACES],
    pub(super) own: [ChainPlan<AgentRule>; N_PLACES],
    pub(super) jumps: [ChainPlan<()>; N_PLACES],
    /// Planned by `delta` on a settled state (which it keeps settled).
    pub(super) delta: bool,
    /// DNAT mappings this plan adds and removes (for the report and the
    /// UDP conntrack flush), not counting a rule that is only moved.
    pub(super) added_dnat: Vec<Mapping>,
    pub(super) removed_dnat: Vec<Mapping>,
    /// Keys whose allowed sources shrink (their conntrack entries from
    /// the sources no longer allowed are flushed).
    pub(super) admission: Vec<Admission>,
    /// Chains of an earlier version's, deleted first and made anew (marked)
    /// by the rest of the plan, which is planned against the state without
    /// them (`IptState::without`).
    pub(super) adopt: Option<Adoption>,
}

impl Changes {
    pub(super) fn plan(state: &IptState, desired: &RuleSet, jumps: &JumpPositions) -> Changes {
        let want = desired_chains(
            desired,
            state.family,
            state.local.as_deref(),
            state.counting.as_deref(),
        );
        let managed = |i: usize| state.manages(i);
        // A place no longer managed is retired: its chain emptied and
        // deleted, its jumps removed (the Go layout again).
        // A chain with the agent's name that is not its own is never
        // retired (nor are the jumps to it).
        let retired = |i: usize| !managed(i) && state.own_owned(i);
        let own = std::array::from_fn(|i| {
            if !managed(i) && !retired(i) {
                return ChainPlan::default();
            }
            if !managed(i) {
                return ChainPlan {
                    delete: (0..state.own[i].len()).collect(),
                    insert: Vec::new(),
                };
            }
            let current: Vec<Option<&AgentRule>> =
                state.own[i].iter().map(|s| s.rule.as_ref()).collect();
            plan_chain(&current, &want[i], AgentRule::rank)
        });
        let jump_plans = std::array::from_fn(|i| {
            if !managed(i) && !retired(i) {
                return ChainPlan::default();
            }
            if !managed(i) {
                let jumps = state.parents[i].iter().enumerate();
                return ChainPlan {
                    delete: jumps
                        .filter(|(_, s)| s.rule != ParentRule::Foreign)
                        .map(|(j, _)| j)
                        .collect(),
                    insert: Vec::new(),
                };
            }
            let current: Vec<ParentRule> = state.parents[i].iter().map(|s| s.rule).collect();
            plan_jump(&current, PLACES[i].requested(jumps))
        });
        let mut changes = Changes {
            create_table: std::array::from_fn(|t| {
                !state.table_present[t] && state.places().iter().any(|p| p.table() == TABLES[t])
            }),
            create_parent: std::array::from_fn(|i| managed(i) && !state.parent_exists[i]),
            create_own: std::array::from_fn(|i| managed(i) && !state.own_exists[i]),
            delete_own: std::array::from_fn(retired),
            delete_parent: std::array::from_fn(|i| {
                retired(i)
                    && state.parent_exists[i]
                    && (state.parent_marked[i] || state.parent_earlier[i])
                    && state.parents[i]
                        .iter()
                        .all(|s| s.rule != ParentRule::Foreign)
            }),
            own,
            jumps: jump_plans,
            delta: false,
            added_dnat: Vec::new(),
            removed_dnat: Vec::new(),
            admission: Vec::new(),
            adopt: None,
        };
        (changes.added_dnat, changes.removed_dnat) = changes.dnat_changes(state, desired);
        if !changes.own[Place::Pre.index()].is_empty() {
            changes.admission = Admission::between(&state.rules(), desired);
        }
        changes
    }

    /// The plan for `ch` on a settled state, by binary search in each chain:
    /// deletes by position, each new rule before the first remaining rule
    /// that sorts after it (so the chains stay sorted), jumps untouched.
    /// `None` if the state is not settled or `ch` does not fit it.
    pub(super) fn delta(state: &IptState, ch: &crate::firewall::Changes) -> Option<Changes> {
        if !state.settled {
            return None;
        }
        // The hairpin sources are rules only with local access.
        let local = state.local.is_some();
        let counters = state.counting.is_some();
        let rules = |r: &RuleSet| -> [Vec<AgentRule>; N_PLACES] {
            let marks = r
                .local
                .iter()
                .filter(|_| local)
                .cloned()
                .map(AgentRule::Mark);
            [
                marks.collect(),
                r.snat.iter().cloned().map(AgentRule::Snat).collect(),
                r.forward.iter().cloned().map(AgentRule::Forward).collect(),
                Vec::new(),
                if counters {
                    counted(&r.dnat)
                } else {
                    Vec::new()
                },
                Vec::new(),
            ]
        };
        let (mut adds, mut dels) = (rules(&ch.add), rules(&ch.del));
        let pre = Place::Pre.index();
        let dnat = dnat_delta(&state.own[pre], ch)?;
        adds[pre].extend(dnat.add);
        dels[pre].extend(dnat.del);
        // A rule both deleted and added stays (a mapping whose pod address
        // or port changed keeps its counting rule, key and owner the same).
        for (a, d) in adds.iter_mut().zip(dels.iter_mut()) {
            if a.is_empty() || d.is_empty() {
                continue;
            }
            a.sort_unstable();
            d.sort_unstable();
            let (a0, d0) = (a.clone(), d.clone());
            a.retain(|r| d0.binary_search(r).is_err());
            d.retain(|r| a0.binary_search(r).is_err());
        }
        let mut own: [ChainPlan<AgentRule>; N_PLACES] =
            std::array::from_fn(|_| ChainPlan::default());
        for i in 0..N_PLACES {
            let chain = &state.own[i];
            let find = |r: &AgentRule| chain.binary_search_by(|s| s.rule.as_ref().cmp(&Some(r)));
            let plan = &mut own[i];
            for d in &dels[i] {
                plan.delete.push(find(d).ok()?);
            }
            plan.delete.sort_unstable();
            for a in &adds[i] {
                let mut at = find(a).err()?;
                while plan.delete.binary_search(&at).is_ok() {
                    at += 1;
                }
                let anchor = if at < chain.len() {
                    Anchor::Before(at)
                } else {
                    Anchor::Append
                };
                plan.insert.push((a.clone(), anchor));
            }
        }
        Some(Changes {
            create_table: [false; 3],
            create_parent: [false; N_PLACES],
            create_own: [false; N_PLACES],
            delete_own: [false; N_PLACES],
            delete_parent: [false; N_PLACES],
            own,
            jumps: std::array::from_fn(|_| ChainPlan::default()),
            delta: true,
            added_dnat: ch.add.dnat.clone(),
            removed_dnat: ch.del.dnat.clone(),
            admission: dnat.admission,
            adopt: None,
        })
    }

    pub(super) fn creates(&self) -> bool {
        self.adopt.is_some()
            || self.create_table.iter().any(|c| *c)
            || self.create_parent.iter().any(|c| *c)
            || self.create_own.iter().any(|c| *c)
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.creates()
            && !self.delete_own.iter().any(|d| *d)
            && !self.delete_parent.iter().any(|d| *d)
            && self.own.iter().all(ChainPlan::is_empty)
            && self.jumps.iter().all(ChainPlan::is_empty)
    }

    /// Every handle the plan refers to is known (see `Slot`).
    pub(super) fn handles_known(&self, state: &IptState) -> bool {
        if let Some(a) = &self.adopt {
            // The jumps the adoption deletes, then the rest against the
            // state without the adopted chains.
            let jumps_known = a.own.iter().chain(&a.parents).all(|&i| {
                state.parents[i]
                    .iter()
                    .all(|s| s.rule == ParentRule::Foreign || s.handle.is_some())
            });
            return jumps_known && self.rule_handles_known(&state.without(a));
        }
        self.rule_handles_known(state)
    }

    fn rule_handles_known(&self, state: &IptState) -> bool {
        (0..N_PLACES).all(|i| {
            self.own[i]
                .referenced()
                .all(|j| state.own[i][j].handle.is_some())
                && self.jumps[i]
                    .referenced()
                    .all(|j| state.parents[i][j].handle.is_some())
        })
    }

    /// Rules the plan adds.
    pub(super) fn inserts(&self) -> usize {
        let own: usize = self.own.iter().map(|p| p.insert.len()).sum();
        own + self.jumps.iter().map(|p| p.insert.len()).sum::<usize>()
    }

    /// The state after this plan commits; a new rule's handle is known if
    /// the kernel echoed it.
    pub(super) fn after(&self, state: IptState, handles: &HashMap<Inserted, u64>) -> IptState {
        let managed: [bool; N_PLACES] = std::array::from_fn(|i| state.manages(i));
        let IptState {
            parents,
            own,
            family,
            local,
            counting,
            table_present,
            parent_exists,
            own_exists,
            table_marked,
            parent_marked,
            parent_earlier,
            own_marked,
            ..
        } = state;
        let created = |i: usize| managed[i] && !parent_exists[i];
        let mut parents = parents.into_iter();
        let mut own = own.into_iter();
        let mut after = IptState {
            family,
            local,
            counting,
            table_present: std::array::from_fn(|t| table_present[t] || self.create_table[t]),
            table_marked: std::array::from_fn(|t| table_marked[t] || self.create_table[t]),
            parent_exists: std::array::from_fn(|i| {
                (parent_exists[i] || managed[i]) && !self.delete_parent[i]
            }),
            parent_marked: std::array::from_fn(|i| parent_marked[i] || created(i)),
            parent_earlier: std::array::from_fn(|i| parent_earlier[i] && !created(i)),
            own_exists: std::array::from_fn(|i| {
                (own_exists[i] || managed[i]) && !self.delete_own[i]
            }),
            own_marked: std::array::from_fn(|i| {
                (own_marked[i] || (managed[i] && !own_exists[i])) && !self.delete_own[i]
            }),
            parents: std::array::from_fn(|i| {
                apply_plan(
                    parents.next().unwrap_or_default(),
                    &self.jumps[i],
                    |k, _| Slot {
                        handle: handles.get(&Inserted::Jump(i, k)).copied(),
                        rule: ParentRule::Jump { exact: true },
                    },
                )
            }),
            own: std::array::from_fn(|i| {
                apply_plan(own.next().unwrap_or_default(), &self.own[i], |k, r| Slot {
                    handle: handles.get(&Inserted::Own(i, k)).copied(),
                    rule: Some(r.clone()),
                })
            }),
            settled: false,
        };
        // A delta keeps the chains sorted; after a full plan they are in
        // rank order, maybe not sorted (rules of one rank are kept as read).
        after.settled = self.delta || after.own_sorted();
        after
    }

    /// DNAT mappings this plan adds and removes (for the report and the
    /// UDP conntrack flush): as a diff of the decoded rules, not counting
    /// a rule that is only moved.
    pub(super) fn dnat_changes(
        &self,
        state: &IptState,
        desired: &RuleSet,
    ) -> (Vec<Mapping>, Vec<Mapping>) {
        let pre = Place::Pre.index();
        let mut current: Vec<&Mapping> = state.own[pre]
            .iter()
            .filter_map(|s| match &s.rule {
                Some(AgentRule::Dnat(m, _)) => Some(m),
                _ => None,
            })
            .collect();
        current.sort_unstable();
        current.dedup();
        let added = self.own[pre]
            .insert
            .iter()
            .filter_map(|(r, _)| match r {
                AgentRule::Dnat(m, _) if current.binary_search(&m).is_err() => Some(m.clone()),
                _ => None,
            })
            .collect();
        let removed = current
            .into_iter()
            .filter(|m| desired.dnat.binary_search(m).is_err())
            .cloned()
            .collect();
        (added, removed)
    }
}

/// The DNAT rules a change deletes and inserts in a settled `<PREFIX>_PRE`,
/// key by key: a key's rules are its mapping once per allowed range (once
/// without `-s` when open), so a change of its mapping or of its ranges
/// rewrites exactly the rules that differ. O(change · ranges of the keys
/// it touches).
struct DnatDelta {
    add: Vec<AgentRule>,
    del: Vec<AgentRule>,
    admission: Vec<Admission>,
}

/// `None`: `ch` does not fit the chain (see `KeyView::after`), or the
/// chain holds something a settled chain cannot (two mappings for a key,
/// a key both open and restricted).
fn dnat_delta(
    chain: &[Slot<Option<AgentRule>>],
    ch: &crate::firewall::Changes,
) -> Option<DnatDelta> {
    let mut out = DnatDelta {
        add: Vec::new(),
        del: Vec::new(),
        admission: Vec::new(),
    };
    for key in KeyView::touched(ch) {
        let old = key_rules(chain, &key);
        let before = key_view(&old)?;
        let after = before.after(ch, &key)?;
        let new = expand(&after);
        out.del
            .extend(old.iter().filter(|r| !new.contains(r)).cloned());
        out.add
            .extend(new.iter().filter(|r| !old.contains(r)).cloned());
        out.admission.extend(Admission::of(&key, &before, &after));
    }
    Some(out)
}

/// The DNAT rules of `key` in a sorted chain (binary search).
fn key_rules(chain: &[Slot<Option<AgentRule>>], key: &NatKey) -> Vec<AgentRule> {
    let before_key = |r: &Option<AgentRule>| match r {
        Some(AgentRule::Dnat(m, _)) => m.key < *key,
        Some(r) => r.rank_before_dnat(),
        None => true,
    };
    let at = chain.partition_point(|s| before_key(&s.rule));
    chain[at..]
        .iter()
        .map_while(|s| match &s.rule {
            Some(r @ AgentRule::Dnat(m, _)) if m.key == *key => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// What a key's DNAT rules say: its mapping and ranges.
fn key_view(rules: &[AgentRule]) -> Option<KeyView> {
    let mut view = KeyView::default();
    for r in rules {
        let AgentRule::Dnat(m, src) = r else {
            return None;
        };
        if view.mapping.as_ref().is_some_and(|v| v != m) {
            return None;
        }
        view.mapping = Some(m.clone());
        view.sources.extend(*src);
    }
    if !view.sources.is_empty() && view.sources.len() != rules.len() {
        return None;
    }
    Some(view)
}

/// A key's DNAT rules (none when it has no mapping).
fn expand(v: &KeyView) -> Vec<AgentRule> {
    let Some(m) = &v.mapping else {
        return Vec::new();
    };
    if v.sources.is_empty() {
        return vec![AgentRule::Dnat(m.clone(), None)];
    }
    v.sources
        .iter()
        .map(|s| AgentRule::Dnat(m.clone(), Some(*s)))
        .collect()
}
