//! The iptables flavor's dry run: a plan as `iptables-restore --noflush`
//! input, with the rule positions iptables-nft would number.

use super::*;

/// The rule's `-A ...` line in the view's syntax.
pub(super) fn line(rule: &AgentRule, place: Place, n: &Names, family: Family) -> String {
    match rule {
        AgentRule::Return(i) => {
            let (net, len) = internal_returns(family)[*i];
            view::ipt_internal_return(n, net, len)
        }
        AgentRule::Masquerade => view::ipt_masquerade(n),
        AgentRule::Mark(l) => view::ipt_mark(n, l),
        AgentRule::Snat(s) => view::ipt_snat(n, s),
        AgentRule::Dnat(m, source) => view::ipt_dnat(n, m, *source),
        AgentRule::Forward(f) => view::ipt_forward(n, f),
        // A jump to another of the agent's chains is a rule of this place's
        // own chain (`<PREFIX>_COUNTIN`'s); to it, one of the base chain.
        AgentRule::Jump(target) if target != place.own(n) => {
            view::ipt_jump(n, place.own(n), target)
        }
        AgentRule::Jump(target) => view::ipt_jump(n, place.parent(), target),
        AgentRule::LocalJump(target) => view::ipt_local_jump(n, place.own(n), target),
        AgentRule::DnatJump(target) => view::ipt_dnat_jump(n, place.parent(), target),
        AgentRule::Count(c) => view::ipt_count(n, &c.key, c.span, &c.owner),
    }
}

/// `-A CHAIN spec` → `<head> spec` (e.g. `-D CHAIN spec`, `-I CHAIN 3 spec`).
pub(super) fn respec(line: &str, head: &str) -> String {
    let spec = line.splitn(3, ' ').nth(2).unwrap_or("");
    format!("{head} {spec}")
}

impl Iptables {
    /// `-D` lines for a plan's deletes, last rule first so that rule numbers
    /// stay valid; by rule number where the spec would be ambiguous (an
    /// identical rule earlier in the chain) or is not the agent's encoding.
    /// `specs`: each current rule's `-A` line, if it is the agent's.
    pub(super) fn delete_lines<T>(
        out: &mut String,
        chain: &str,
        plan: &ChainPlan<T>,
        specs: &[Option<String>],
    ) {
        let mut first = std::collections::HashMap::new();
        for (k, s) in specs.iter().enumerate() {
            if let Some(s) = s {
                first.entry(s.as_str()).or_insert(k);
            }
        }
        let mut del = plan.delete.clone();
        del.sort_unstable();
        for &j in del.iter().rev() {
            match &specs[j] {
                Some(s) if first.get(s.as_str()) == Some(&j) => {
                    let _ = writeln!(out, "{}", respec(s, &format!("-D {chain}")));
                }
                _ => {
                    let _ = writeln!(out, "-D {chain} {}", j + 1);
                }
            }
        }
    }

    /// The changes as iptables-restore input (`--noflush`): per table,
    /// `-N` for missing chains, `-D` for deletes, `-I`/`-A` for inserts.
    /// An adoption's deletes as iptables-restore lines (the marks it adds
    /// are not iptables text): the jumps, then the chains, by table.
    pub(super) fn render_adoption(&self, state: &IptState, a: &Adoption) -> String {
        let n = &self.names;
        let mut out = String::from("# adopted: made anew with the agent's mark\n");
        for table in TABLES {
            let mut t = String::new();
            for &i in a.own.iter().chain(&a.parents) {
                let place = PLACES[i];
                if place.table() != table {
                    continue;
                }
                for s in &state.parents[i] {
                    if s.rule != ParentRule::Foreign {
                        let jump = line(&place.jump(n), place, n, self.family);
                        let _ = writeln!(t, "{}", respec(&jump, &format!("-D {}", place.parent())));
                    }
                }
            }
            for &i in &a.own {
                if PLACES[i].table() == table {
                    let _ = writeln!(t, "-F {}", PLACES[i].own(n));
                }
            }
            for &i in &a.own {
                if PLACES[i].table() == table {
                    let _ = writeln!(t, "-X {}", PLACES[i].own(n));
                }
            }
            if !t.is_empty() {
                let _ = write!(out, "*{table}\n{t}COMMIT\n");
            }
        }
        out
    }

    pub(super) fn render_changes(&self, state: &IptState, changes: &Changes) -> String {
        let n = &self.names;
        let mut out = String::new();
        for table in TABLES {
            let mut t = String::new();
            for place in PLACES.iter().filter(|p| p.table() == table) {
                if changes.create_own[place.index()] {
                    let _ = writeln!(t, "-N {}", place.own(n));
                }
            }
            for place in PLACES.iter().copied().filter(|p| p.table() == table) {
                let i = place.index();
                let own = place.own(n);
                let plan = &changes.own[i];
                let specs: Vec<Option<String>> = state.own[i]
                    .iter()
                    .map(|s| s.rule.as_ref().map(|r| line(r, place, n, self.family)))
                    .collect();
                Self::delete_lines(&mut t, own, plan, &specs);
                // Inserted in order, each new rule lands at its final
                // position (the rules before it are all in place by then).
                let mut at = vec![0; plan.insert.len()];
                let after = apply_plan(vec![None; state.own[i].len()], plan, |k, _| Some(k));
                for (p, k) in after.iter().enumerate() {
                    if let Some(k) = k {
                        at[*k] = p + 1;
                    }
                }
                for (k, (rule, anchor)) in plan.insert.iter().enumerate() {
                    let l = line(rule, place, n, self.family);
                    match anchor {
                        Anchor::Append => {
                            let _ = writeln!(t, "{l}");
                        }
                        Anchor::Before(_) => {
                            let head = format!("-I {own} {}", at[k]);
                            let _ = writeln!(t, "{}", respec(&l, &head));
                        }
                    }
                }
            }
            for place in PLACES.iter().copied().filter(|p| p.table() == table) {
                let i = place.index();
                let plan = &changes.jumps[i];
                let jump_line = line(&place.jump(n), place, n, self.family);
                let specs: Vec<Option<String>> = state.parents[i]
                    .iter()
                    .map(|s| {
                        (s.rule == ParentRule::Jump { exact: true }).then(|| jump_line.clone())
                    })
                    .collect();
                Self::delete_lines(&mut t, place.parent(), plan, &specs);
                for (_, anchor) in &plan.insert {
                    match anchor {
                        Anchor::Append => {
                            let _ = writeln!(t, "{jump_line}");
                        }
                        Anchor::Before(_) => {
                            let others = state.parents[i]
                                .iter()
                                .filter(|s| s.rule == ParentRule::Foreign)
                                .count();
                            let p = position::jump_position(place.requested(&self.jumps), others);
                            let head = format!("-I {} {p}", place.parent());
                            let _ = writeln!(t, "{}", respec(&jump_line, &head));
                        }
                    }
                }
            }
            for place in PLACES.iter().filter(|p| p.table() == table) {
                if changes.delete_own[place.index()] {
                    let _ = writeln!(t, "-X {}", place.own(n));
                }
            }
            for place in PLACES.iter().filter(|p| p.table() == table) {
                if changes.delete_parent[place.index()] {
                    // iptables-restore cannot delete a built-in chain.
                    let _ = writeln!(
                        t,
                        "# delete the agent's empty base chain {}",
                        place.parent()
                    );
                }
            }
            if !t.is_empty() {
                let _ = write!(out, "*{table}\n{t}COMMIT\n");
            }
        }
        out
    }
}
