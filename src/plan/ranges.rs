//! Claims on runs of public ports (issue 25: `srcPortEnd`): a range is one
//! claim, however many ports it has, and the winner is decided per port as
//! for single ports. `settle` turns the claims of one address into the parts
//! each claim wins and loses; the full planner and the incremental one both
//! call it, on whole groups of overlapping claims, so they agree.

/// One claim on ports `lo..=hi` of one public address and protocol; the
/// greatest `rank` wins a port.
#[derive(Clone, Debug)]
pub(crate) struct Claimed<R, I> {
    pub(crate) lo: u16,
    pub(crate) hi: u16,
    pub(crate) proto: crate::model::Proto,
    pub(crate) rank: R,
    pub(crate) id: I,
}

/// Ports `lo..=hi` of claim `winner`; with `loser`, the part that claim
/// lost to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Part<I> {
    pub(crate) lo: u16,
    pub(crate) hi: u16,
    pub(crate) proto: crate::model::Proto,
    pub(crate) winner: I,
    pub(crate) loser: Option<I>,
}

/// The parts every claim wins (`loser: None`) and loses, each as long as it
/// runs unbroken: per port, the greatest claim covering it wins. Cost: the
/// claims times the points where a claim starts or ends — one claim each
/// for the usual case, where nothing overlaps.
pub(crate) fn settle<R: Ord, I: Copy + Eq>(claims: &[Claimed<R, I>]) -> Vec<Part<I>> {
    let mut out: Vec<Part<I>> = Vec::new();
    for proto in [crate::model::Proto::Tcp, crate::model::Proto::Udp] {
        let mine = || claims.iter().filter(move |c| c.proto == proto);
        let Some(first) = mine().next() else { continue };
        // The usual case, one port (or one range) and its claims: one run,
        // decided without cutting it.
        if mine().all(|c| (c.lo, c.hi) == (first.lo, first.hi)) {
            let Some(win) = mine().max_by(|a, b| a.rank.cmp(&b.rank)) else {
                continue;
            };
            let losers = mine().filter(|c| c.id != win.id).map(|c| Some(c.id));
            for loser in std::iter::once(None).chain(losers) {
                out.push(Part {
                    lo: first.lo,
                    hi: first.hi,
                    proto,
                    winner: win.id,
                    loser,
                });
            }
            continue;
        }
        // Segment starts: every claim's first port and the one after its last.
        let mut cuts: Vec<u32> = mine()
            .flat_map(|c| [u32::from(c.lo), u32::from(c.hi) + 1])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let first = out.len();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
            let covering = mine().filter(|c| c.lo <= lo && hi <= c.hi);
            let Some(win) = covering.clone().max_by(|a, b| a.rank.cmp(&b.rank)) else {
                continue;
            };
            let parts = std::iter::once(None)
                .chain(covering.filter(|c| c.id != win.id).map(|c| Some(c.id)));
            for loser in parts {
                // Continue the part this claim had up to the port before.
                let open = out[first..]
                    .iter_mut()
                    .rev()
                    .find(|p| p.winner == win.id && p.loser == loser && p.hi.wrapping_add(1) == lo);
                match open {
                    Some(p) => p.hi = hi,
                    None => out.push(Part {
                        lo,
                        hi,
                        proto,
                        winner: win.id,
                        loser,
                    }),
                }
            }
        }
    }
    out
}

/// Splits claims (sorted by first port) into groups that overlap among
/// themselves and not with each other: the unit `settle` decides alone.
pub(crate) fn overlapping_groups<R, I>(sorted: &[Claimed<R, I>]) -> Vec<&[Claimed<R, I>]> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut reach: Option<u16> = None;
    for (i, c) in sorted.iter().enumerate() {
        if reach.is_some_and(|r| c.lo > r) {
            groups.push(&sorted[start..i]);
            start = i;
            reach = None;
        }
        reach = Some(reach.map_or(c.hi, |r| r.max(c.hi)));
    }
    if start < sorted.len() {
        groups.push(&sorted[start..]);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn claim(lo: u16, hi: u16, rank: u8) -> Claimed<u8, u8> {
        Claimed {
            lo,
            hi,
            proto: Proto::Udp,
            rank,
            id: rank,
        }
    }

    fn won(parts: &[Part<u8>]) -> Vec<(u16, u16, u8)> {
        parts
            .iter()
            .filter(|p| p.loser.is_none())
            .map(|p| (p.lo, p.hi, p.winner))
            .collect()
    }

    fn lost(parts: &[Part<u8>]) -> Vec<(u16, u16, u8, u8)> {
        parts
            .iter()
            .filter_map(|p| Some((p.lo, p.hi, p.loser?, p.winner)))
            .collect()
    }

    #[test]
    fn a_range_is_won_whole_when_nothing_overlaps() {
        let parts = settle(&[claim(10000, 10099, 1)]);
        assert_eq!(won(&parts), [(10000, 10099, 1)]);
        assert!(lost(&parts).is_empty());
    }

    #[test]
    fn a_greater_claim_inside_a_range_splits_it() {
        let parts = settle(&[claim(10000, 10099, 1), claim(10040, 10059, 2)]);
        assert_eq!(
            won(&parts),
            [(10000, 10039, 1), (10040, 10059, 2), (10060, 10099, 1)]
        );
        assert_eq!(lost(&parts), [(10040, 10059, 1, 2)]);
        // A lesser one inside loses all of it.
        let parts = settle(&[claim(10000, 10099, 2), claim(10040, 10059, 1)]);
        assert_eq!(won(&parts), [(10000, 10099, 2)]);
        assert_eq!(lost(&parts), [(10040, 10059, 1, 2)]);
    }

    #[test]
    fn overlapping_ranges_share_per_port() {
        let parts = settle(&[claim(100, 199, 1), claim(150, 249, 2), claim(240, 300, 3)]);
        assert_eq!(won(&parts), [(100, 149, 1), (150, 239, 2), (240, 300, 3)]);
        assert_eq!(lost(&parts), [(150, 199, 1, 2), (240, 249, 2, 3)]);
        // The order claims come in does not matter.
        let parts = settle(&[claim(240, 300, 3), claim(100, 199, 1), claim(150, 249, 2)]);
        assert_eq!(won(&parts), [(100, 149, 1), (150, 239, 2), (240, 300, 3)]);
    }

    #[test]
    fn single_ports_are_ranges_of_one() {
        let parts = settle(&[claim(25, 25, 1), claim(25, 25, 3), claim(25, 25, 2)]);
        assert_eq!(won(&parts), [(25, 25, 3)]);
        assert_eq!(lost(&parts), [(25, 25, 1, 3), (25, 25, 2, 3)]);
        // Two claims side by side stay two parts, of one pod or not.
        let parts = settle(&[claim(25, 25, 1), claim(26, 26, 2)]);
        assert_eq!(won(&parts), [(25, 25, 1), (26, 26, 2)]);
    }

    #[test]
    fn groups_split_where_no_claim_reaches() {
        let c = [
            claim(1, 5, 1),
            claim(3, 9, 2),
            claim(10, 10, 3),
            claim(12, 20, 4),
            claim(20, 20, 5),
        ];
        let sizes: Vec<usize> = overlapping_groups(&c).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, [2, 1, 2]);
    }
}
