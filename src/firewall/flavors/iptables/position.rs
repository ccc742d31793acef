//! Where rules go, as pure functions over the order read back from the
//! kernel: the jump's position in a parent chain (`-iptablesJump`), and the
//! minimal deletes/inserts that turn one of the agent's chains into its
//! desired content (in rank order; rules of one rank in any order).

/// The 1-based position of the agent's jump in a parent chain that holds
/// `others` rules besides it, for the requested position `r`: with
/// m = others + 1, 0 → 1, 0 < r ≤ m → r, -m ≤ r < 0 → m + r + 1 (-1 is the
/// last rule), and |r| > m → m, as the Go version's rule-position function.
pub fn jump_position(r: i32, others: usize) -> usize {
    let m = others as i64 + 1;
    let r = i64::from(r);
    let p = if r == 0 {
        1
    } else if r.abs() > m {
        m
    } else if r > 0 {
        r
    } else {
        m + r + 1
    };
    p as usize
}

/// Where a new rule goes: immediately before the rule at this index of the
/// chain as read (NFTA_RULE_POSITION = its handle, no NLM_F_APPEND), or at
/// the end (NLM_F_APPEND, no position) — iptables-nft's `-I` and `-A`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    Before(usize),
    Append,
}

/// Changes to one chain: indexes (into the chain as read) to delete, then
/// rules to insert, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainPlan<T> {
    pub delete: Vec<usize>,
    pub insert: Vec<(T, Anchor)>,
}

impl<T> Default for ChainPlan<T> {
    fn default() -> Self {
        ChainPlan {
            delete: Vec::new(),
            insert: Vec::new(),
        }
    }
}

impl<T> ChainPlan<T> {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.insert.is_empty()
    }

    /// The indexes whose handles the plan needs (deleted or anchored to).
    pub fn referenced(&self) -> impl Iterator<Item = usize> + '_ {
        self.delete
            .iter()
            .copied()
            .chain(self.insert.iter().filter_map(|(_, a)| match a {
                Anchor::Before(i) => Some(*i),
                Anchor::Append => None,
            }))
    }
}

/// Plans one of the agent's own chains. `current` is the chain as read
/// (`None`: a rule that is not exactly one of the agent's encodings),
/// `desired` is sorted and free of duplicates; `rank` orders what must stay
/// in order (in `<PREFIX>_POST` the RETURNs before the SNATs) and must not
/// decrease along `desired`. Rules of one rank match disjoint packets, so
/// their order does not matter and is kept as read (rules another writer,
/// e.g. the Go version in its map order, put there stay with their
/// handles). The longest run of wanted rules whose ranks do not decrease
/// stays; everything else — undecodable, unwanted, duplicate or out-of-rank
/// rules — is deleted, and each missing rule goes before the first kept rule
/// that sorts after it. With `rank` the identity, the result is `desired` in
/// order; always it is `desired` with ranks in order, with the fewest deletes.
pub fn plan_chain<T: Ord + Clone, K: Ord>(
    current: &[Option<&T>],
    desired: &[T],
    rank: impl Fn(&T) -> K,
) -> ChainPlan<T> {
    let wanted: Vec<(usize, &T)> = current
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .filter(|(_, r)| desired.binary_search(r).is_ok())
        .collect();
    // Two candidates: the longest run already in sorted order (the best
    // choice among duplicates), and the longest run in rank order of each
    // rule's first copy (the order another writer left within a rank). The
    // longer one stays; on a tie the sorted one.
    let values: Vec<&T> = wanted.iter().map(|(_, r)| *r).collect();
    let sorted: Vec<(usize, &T)> = longest_run(&values, true)
        .into_iter()
        .map(|k| wanted[k])
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let firsts: Vec<(usize, &T)> = wanted
        .iter()
        .copied()
        .filter(|(_, r)| seen.insert(*r))
        .collect();
    let ranks: Vec<K> = firsts.iter().map(|(_, r)| rank(r)).collect();
    let ranked: Vec<(usize, &T)> = longest_run(&ranks, false)
        .into_iter()
        .map(|k| firsts[k])
        .collect();
    let kept = if ranked.len() > sorted.len() {
        ranked
    } else {
        sorted
    };
    let mut is_kept = vec![false; current.len()];
    for (i, _) in &kept {
        is_kept[*i] = true;
    }
    let kept_set: std::collections::BTreeSet<&T> = kept.iter().map(|(_, r)| *r).collect();
    // The largest kept rule up to each position: it does not decrease, so
    // the first kept rule after `d` is found by binary search.
    let mut running_max: Vec<&T> = Vec::with_capacity(kept.len());
    for (_, r) in &kept {
        let m = running_max.last().map_or(*r, |m| (*m).max(*r));
        running_max.push(m);
    }
    let delete = (0..current.len()).filter(|i| !is_kept[*i]).collect();
    let mut insert = Vec::new();
    for d in desired {
        if kept_set.contains(d) {
            continue;
        }
        let at = running_max.partition_point(|m| *m < d);
        let anchor = kept
            .get(at)
            .map_or(Anchor::Append, |(i, _)| Anchor::Before(*i));
        insert.push((d.clone(), anchor));
    }
    ChainPlan { delete, insert }
}

/// Indexes (into `v`) of a longest increasing (`strict`) or non-decreasing
/// subsequence, in order (patience sorting, O(n log n)).
fn longest_run<K: Ord>(v: &[K], strict: bool) -> Vec<usize> {
    // tails[l]: index of the smallest last value of a run of length l+1.
    let mut tails: Vec<usize> = Vec::new();
    let mut prev: Vec<Option<usize>> = vec![None; v.len()];
    for k in 0..v.len() {
        let l = tails.partition_point(|&t| v[t] < v[k] || (!strict && v[t] == v[k]));
        prev[k] = l.checked_sub(1).map(|p| tails[p]);
        if l == tails.len() {
            tails.push(k);
        } else {
            tails[l] = k;
        }
    }
    let mut out = Vec::with_capacity(tails.len());
    let mut at = tails.last().copied();
    while let Some(k) = at {
        out.push(k);
        at = prev[k];
    }
    out.reverse();
    out
}

/// A rule of a parent chain (PREROUTING, POSTROUTING, FORWARD), as far as
/// the jump is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentRule {
    /// Anybody else's rule: never touched.
    Foreign,
    /// A rule that jumps to the agent's chain; `exact` when it is the
    /// agent's own encoding (comment, counter, jump).
    Jump { exact: bool },
}

/// Plans the jump in a parent chain: exactly one exact jump at
/// `jump_position(requested, foreign rules)`. A jump already there stays;
/// other jumps to the agent's chain are deleted; a missing one is inserted
/// before the foreign rule that must follow it, or appended.
pub fn plan_jump(current: &[ParentRule], requested: i32) -> ChainPlan<()> {
    let foreign: Vec<usize> = current
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == ParentRule::Foreign)
        .map(|(i, _)| i)
        .collect();
    let p = jump_position(requested, foreign.len());
    let mut keep = None;
    let mut foreign_before = 0;
    for (i, r) in current.iter().enumerate() {
        match r {
            ParentRule::Foreign => foreign_before += 1,
            ParentRule::Jump { exact: true } if keep.is_none() && foreign_before == p - 1 => {
                keep = Some(i)
            }
            ParentRule::Jump { .. } => {}
        }
    }
    let delete = current
        .iter()
        .enumerate()
        .filter(|(i, r)| matches!(r, ParentRule::Jump { .. }) && Some(*i) != keep)
        .map(|(i, _)| i)
        .collect();
    let insert = if keep.is_some() {
        Vec::new()
    } else {
        let anchor = foreign
            .get(p - 1)
            .map_or(Anchor::Append, |i| Anchor::Before(*i));
        vec![((), anchor)]
    };
    ChainPlan { delete, insert }
}

/// The chain after `plan`, as the kernel orders it: a rule inserted before
/// an anchor lands right before it (after rules inserted there earlier in
/// the batch); appended rules go to the end in order. `new` makes the
/// element for an inserted rule from its index in `plan.insert`.
pub fn apply_plan<E, T>(
    current: Vec<E>,
    plan: &ChainPlan<T>,
    new: impl FnMut(usize, &T) -> E,
) -> Vec<E> {
    // A few changes (one pod's): in place, highest position first so the
    // lower ones stay valid — no walk over the whole chain.
    if plan.delete.len() + plan.insert.len() <= SMALL_PLAN {
        return apply_in_place(current, plan, new);
    }
    apply_rebuilt(current, plan, new)
}

/// `apply_plan` by building the chain anew (many changes).
fn apply_rebuilt<E, T>(
    current: Vec<E>,
    plan: &ChainPlan<T>,
    mut new: impl FnMut(usize, &T) -> E,
) -> Vec<E> {
    let mut before: std::collections::BTreeMap<usize, Vec<(usize, &T)>> = Default::default();
    let mut appended = Vec::new();
    for (k, (t, a)) in plan.insert.iter().enumerate() {
        match a {
            Anchor::Before(i) => before.entry(*i).or_default().push((k, t)),
            Anchor::Append => appended.push((k, t)),
        }
    }
    let deleted: std::collections::BTreeSet<usize> = plan.delete.iter().copied().collect();
    let mut out = Vec::with_capacity(current.len() + plan.insert.len());
    for (i, e) in current.into_iter().enumerate() {
        for (k, t) in before.get(&i).into_iter().flatten() {
            out.push(new(*k, t));
        }
        if !deleted.contains(&i) {
            out.push(e);
        }
    }
    for (k, t) in appended {
        out.push(new(k, t));
    }
    out
}

/// Up to this many deletes and inserts, `apply_plan` edits the chain in
/// place (each a move of the chain's tail) rather than rebuilding it.
const SMALL_PLAN: usize = 16;

fn apply_in_place<E, T>(
    mut current: Vec<E>,
    plan: &ChainPlan<T>,
    mut new: impl FnMut(usize, &T) -> E,
) -> Vec<E> {
    let appended: Vec<E> = plan
        .insert
        .iter()
        .enumerate()
        .filter(|(_, (_, a))| matches!(a, Anchor::Append))
        .map(|(k, (t, _))| new(k, t))
        .collect();
    // Positions with a delete or inserts before them, highest first.
    let mut at: Vec<usize> = plan
        .delete
        .iter()
        .copied()
        .chain(plan.insert.iter().filter_map(|(_, a)| match a {
            Anchor::Before(i) => Some(*i),
            Anchor::Append => None,
        }))
        .collect();
    at.sort_unstable();
    at.dedup();
    for &i in at.iter().rev() {
        if plan.delete.contains(&i) {
            current.remove(i);
        }
        let mut j = i;
        for (k, (t, a)) in plan.insert.iter().enumerate() {
            if matches!(a, Anchor::Before(b) if *b == i) {
                current.insert(j, new(k, t));
                j += 1;
            }
        }
    }
    current.extend(appended);
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn jump_position_follows_the_go_arithmetic() {
        // Empty chain: m = 1, every request lands at 1.
        for r in -3..=3 {
            assert_eq!(jump_position(r, 0), 1, "r={r}");
        }
        // Three foreign rules: m = 4.
        let table = [
            (0, 1),
            (1, 1),
            (2, 2),
            (4, 4),
            (5, 4),
            (-1, 4),
            (-2, 3),
            (-4, 1),
            (-5, 4),
            (i32::MIN, 4),
            (i32::MAX, 4),
        ];
        for (r, p) in table {
            assert_eq!(jump_position(r, 3), p, "r={r}");
        }
        // The default -2 with one foreign rule: the jump goes first.
        assert_eq!(jump_position(-2, 1), 1);
    }

    use ParentRule::{Foreign as F, Jump};
    const J: ParentRule = Jump { exact: true };

    /// Positions (1-based) of exact jumps after the plan.
    fn jumps_after(current: &[ParentRule], r: i32) -> (Vec<usize>, ChainPlan<()>) {
        let plan = plan_jump(current, r);
        let after = apply_plan(current.to_vec(), &plan, |_, _| J);
        let at = after
            .iter()
            .enumerate()
            .filter(|(_, x)| matches!(x, Jump { .. }))
            .map(|(i, _)| i + 1)
            .collect();
        (at, plan)
    }

    #[test]
    fn jump_in_place_is_left_alone() {
        let (at, plan) = jumps_after(&[F, J, F], -2);
        assert_eq!(at, vec![2]);
        assert!(plan.is_empty());
        let (_, plan) = jumps_after(&[J], -2);
        assert!(plan.is_empty());
    }

    #[test]
    fn jump_moves_and_duplicates_go() {
        let (at, plan) = jumps_after(&[J, F, F], -1);
        assert_eq!(at, vec![3]);
        assert_eq!(plan.delete, vec![0]);
        assert_eq!(plan.insert, vec![((), Anchor::Append)]);
        // Two jumps, the second already at the right place: only the first goes.
        let (at, plan) = jumps_after(&[J, F, J, F], 2);
        assert_eq!(at, vec![2]);
        assert_eq!(plan.delete, vec![0]);
        assert!(plan.insert.is_empty());
        // A jump that is not the agent's encoding is replaced.
        let (at, plan) = jumps_after(&[F, Jump { exact: false }], -1);
        assert_eq!(at, vec![2]);
        assert_eq!(plan.delete, vec![1]);
        // Insert before the foreign rule that must follow.
        let (at, plan) = jumps_after(&[F, F, F], 2);
        assert_eq!(at, vec![2]);
        assert_eq!(plan.insert, vec![((), Anchor::Before(1))]);
    }

    /// `plan_chain` over owned values, and the chain after the plan.
    fn plan_owned(cur: &[Option<i32>], want: &[i32]) -> (ChainPlan<i32>, Vec<i32>) {
        let refs: Vec<Option<&i32>> = cur.iter().map(Option::as_ref).collect();
        let plan = plan_chain(&refs, want, |x| *x);
        let after = apply_plan(cur.to_vec(), &plan, |_, t| Some(*t))
            .into_iter()
            .flatten()
            .collect();
        (plan, after)
    }

    #[test]
    fn chain_plan_keeps_sorted_survivors() {
        let cur = [Some(1), Some(3), None, Some(5), Some(9)];
        let (plan, after) = plan_owned(&cur, &[1, 2, 5, 6, 10]);
        assert_eq!(plan.delete, vec![1, 2, 4]);
        assert_eq!(
            plan.insert,
            vec![
                (2, Anchor::Before(3)),
                (6, Anchor::Append),
                (10, Anchor::Append)
            ]
        );
        assert_eq!(after, vec![1, 2, 5, 6, 10]);
        assert!(plan_owned(&[Some(1), Some(2)], &[1, 2]).0.is_empty());
    }

    #[test]
    fn chain_plan_repairs_order_and_duplicates() {
        let (plan, after) = plan_owned(&[Some(2), Some(1), Some(2), Some(3)], &[1, 2, 3]);
        assert_eq!(plan.delete, vec![0]);
        assert!(plan.insert.is_empty());
        assert_eq!(after, vec![1, 2, 3]);
        // A copy of a late rule at the head: only the copy goes.
        let (plan, after) = plan_owned(&[Some(9), Some(1), Some(5), Some(9)], &[1, 5, 9]);
        assert_eq!(plan.delete, vec![0]);
        assert_eq!(after, vec![1, 5, 9]);
    }

    #[test]
    fn rules_of_one_rank_stay_in_the_order_read() {
        // Rank = tens digit: 1x before 2x; within a rank any order.
        let refs = |v: &[i32]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let tens = |x: &i32| x / 10;
        let cur = refs(&[12, 11, 23, 21]);
        let r: Vec<Option<&i32>> = cur.iter().map(Option::as_ref).collect();
        assert!(plan_chain(&r, &[11, 12, 21, 23], tens).is_empty());
        // A new rule goes before the first kept one that sorts after it.
        let plan = plan_chain(&r, &[11, 12, 13, 21, 22, 23], tens);
        assert!(plan.delete.is_empty());
        assert_eq!(
            plan.insert,
            vec![(13, Anchor::Before(2)), (22, Anchor::Before(2))]
        );
        let after: Vec<i32> = apply_plan(cur.clone(), &plan, |_, t| Some(*t))
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(after, vec![12, 11, 13, 22, 23, 21]);
        // Out of rank: the fewest rules move.
        let cur = refs(&[21, 11, 12]);
        let r: Vec<Option<&i32>> = cur.iter().map(Option::as_ref).collect();
        let plan = plan_chain(&r, &[11, 12, 21], tens);
        assert_eq!(plan.delete, vec![0]);
        assert_eq!(plan.insert, vec![(21, Anchor::Append)]);
    }

    proptest! {
        #[test]
        fn any_chain_gets_its_rules_in_rank_order(
            cur in proptest::collection::vec(proptest::option::of(0u8..12), 0..14),
            want in proptest::collection::btree_set(0u8..12, 0..10),
        ) {
            let want: Vec<u8> = want.into_iter().collect();
            let rank = |x: &u8| x / 4;
            let refs: Vec<Option<&u8>> = cur.iter().map(Option::as_ref).collect();
            let plan = plan_chain(&refs, &want, rank);
            let after: Vec<u8> = apply_plan(cur.clone(), &plan, |_, t| Some(*t))
                .into_iter()
                .map(|x| x.expect("undecodable rules are deleted"))
                .collect();
            let mut sorted = after.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&sorted, &want);
            prop_assert!(after.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
            let refs: Vec<Option<&u8>> = after.iter().map(Some).collect();
            prop_assert!(plan_chain(&refs, &want, rank).is_empty());
            let kept = cur.len() - plan.delete.len();
            prop_assert_eq!(kept + plan.insert.len(), want.len());
        }

        #[test]
        fn any_chain_becomes_the_desired_one(
            cur in proptest::collection::vec(proptest::option::of(0u8..12), 0..14),
            want in proptest::collection::btree_set(0u8..12, 0..10),
        ) {
            let want: Vec<u8> = want.into_iter().collect();
            let refs: Vec<Option<&u8>> = cur.iter().map(Option::as_ref).collect();
            let plan = plan_chain(&refs, &want, |x| *x);
            for i in plan.referenced() {
                prop_assert!(i < cur.len());
            }
            // Anchors are never rules the same plan deletes.
            for (_, a) in &plan.insert {
                if let Anchor::Before(i) = a {
                    prop_assert!(!plan.delete.contains(i));
                }
            }
            let after: Vec<Option<u8>> = apply_plan(cur.clone(), &plan, |_, t| Some(*t));
            prop_assert_eq!(after.iter().flatten().copied().collect::<Vec<_>>(), want.clone());
            prop_assert!(after.iter().all(Option::is_some));
            // Idempotent: planning again changes nothing.
            let refs: Vec<Option<&u8>> = after.iter().map(Option::as_ref).collect();
            prop_assert!(plan_chain(&refs, &want, |x| *x).is_empty());
            // Fewest deletes: every wanted rule kept is one not re-inserted.
            let kept = cur.len() - plan.delete.len();
            prop_assert_eq!(kept + plan.insert.len(), want.len());
        }

        #[test]
        fn any_parent_chain_gets_one_jump_at_its_place(
            cur in proptest::collection::vec(0u8..4, 0..8),
            r in -6i32..6,
        ) {
            let cur: Vec<ParentRule> = cur
                .into_iter()
                .map(|k| match k {
                    0 | 1 => F,
                    2 => J,
                    _ => Jump { exact: false },
                })
                .collect();
            let others = cur.iter().filter(|x| **x == F).count();
            let plan = plan_jump(&cur, r);
            let after = apply_plan(cur.clone(), &plan, |_, _| J);
            let jumps: Vec<usize> = after
                .iter()
                .enumerate()
                .filter(|(_, x)| matches!(x, Jump { .. }))
                .map(|(i, _)| i + 1)
                .collect();
            prop_assert_eq!(jumps, vec![jump_position(r, others)]);
            prop_assert_eq!(after.iter().filter(|x| **x == F).count(), others);
            prop_assert!(plan_jump(&after, r).is_empty());
        }
    }

    proptest! {
        #[test]
        fn in_place_equals_rebuilt(
            len in 0usize..40,
            dels in proptest::collection::btree_set(0usize..40, 0..6),
            ins in proptest::collection::vec((0u8..100, proptest::option::of(0usize..40)), 0..6),
        ) {
            let cur: Vec<u8> = (0..len as u8).map(|x| x + 100).collect();
            let plan = ChainPlan {
                delete: dels.into_iter().filter(|d| *d < len).collect(),
                insert: ins
                    .into_iter()
                    .map(|(t, a)| (t, match a {
                        Some(i) if i < len => Anchor::Before(i),
                        _ => Anchor::Append,
                    }))
                    .collect(),
            };
            prop_assert_eq!(
                apply_in_place(cur.clone(), &plan, |_, t| *t),
                apply_rebuilt(cur, &plan, |_, t| *t)
            );
        }
    }
}
