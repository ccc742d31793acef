//! Dual-stack: one flavor instance per enabled family behind one `Flavor`,
//! so the one applier reads, plans and sends both families together. A
//! dual-stack change is one batch (both families' messages between one begin
//! and one end: all of it applies or none of it does), and with IPv4 alone
//! (the default) there is exactly one part: nothing of IPv6 is read or made.

use crate::firewall::engine::applier::{Effect, Flavor, Planned};
use crate::firewall::engine::coexist::OwnForward;
use crate::firewall::engine::monitor::Interest;
use crate::firewall::wire::netlink::{Echo, NetlinkError, NfSocket, NftBatch};
use crate::firewall::Changes;
use crate::model::{Families, Family, RuleSet};

/// The parts, IPv4 first (the order of a sorted rule list).
pub struct PerFamily<F> {
    parts: Vec<(Family, F)>,
}

impl<F> PerFamily<F> {
    pub fn new(families: Families, make: impl Fn(Family) -> F) -> PerFamily<F> {
        PerFamily {
            parts: families.iter().map(|f| (f, make(f))).collect(),
        }
    }

    pub fn parts_mut(&mut self) -> impl Iterator<Item = &mut (Family, F)> {
        self.parts.iter_mut()
    }
}

/// A change restricted to one family (O(change)).
fn changes_of(ch: &Changes, f: Family) -> Changes {
    Changes {
        add: ch.add.of_family(f),
        del: ch.del.of_family(f),
    }
}

impl<F: Flavor> Flavor for PerFamily<F> {
    type State = Vec<F::State>;
    /// Per part: `None` when that family has nothing to change.
    type Plan = Vec<Option<F::Plan>>;
    type Sent = Vec<Option<F::Sent>>;

    fn name(&self) -> &'static str {
        self.parts.first().map_or("none", |(_, p)| p.name())
    }

    fn read(&self, sock: &mut NfSocket) -> Result<Self::State, NetlinkError> {
        self.parts.iter().map(|(_, p)| p.read(sock)).collect()
    }

    fn empty(&self) -> Self::State {
        self.parts.iter().map(|(_, p)| p.empty()).collect()
    }

    /// The parts' rules, concatenated: each holds one family, IPv4 first,
    /// so every list stays sorted.
    fn rules(&self, state: &Self::State) -> RuleSet {
        let mut out = RuleSet::default();
        for ((_, p), s) in self.parts.iter().zip(state) {
            let r = p.rules(s);
            out.dnat.extend(r.dnat);
            out.snat.extend(r.snat);
            out.forward.extend(r.forward);
            out.local.extend(r.local);
            out.allow.extend(r.allow);
        }
        out
    }

    fn plan(&self, state: &Self::State, desired: &RuleSet) -> Planned<Self::Plan> {
        let mut plans = Vec::with_capacity(self.parts.len());
        for ((f, p), s) in self.parts.iter().zip(state) {
            let mine = if self.parts.len() == 1 {
                std::borrow::Cow::Borrowed(desired)
            } else {
                std::borrow::Cow::Owned(desired.of_family(*f))
            };
            plans.push(match p.plan(s, &mine) {
                Planned::NeedsRead => return Planned::NeedsRead,
                Planned::Refused(e) => return Planned::Refused(e),
                Planned::Nothing => None,
                Planned::Change(c) => Some(c),
            });
        }
        if plans.iter().all(Option::is_none) {
            Planned::Nothing
        } else {
            Planned::Change(plans)
        }
    }

    fn plan_changes(&self, state: &Self::State, changes: Changes) -> Option<Planned<Self::Plan>> {
        let mut plans = Vec::with_capacity(self.parts.len());
        let single = self.parts.len() == 1;
        let mut whole = Some(changes);
        for ((f, p), s) in self.parts.iter().zip(state) {
            // One family: the changes as they are; several: each its own.
            let mine = match &mut whole {
                w if single => w.take().unwrap_or_default(),
                w => changes_of(w.as_ref().expect("kept for every part"), *f),
            };
            // A family the change does not touch is left as it is (its
            // repair, if any, is the next full apply's).
            if mine.is_empty() && !single {
                plans.push(None);
                continue;
            }
            plans.push(match p.plan_changes(s, mine)? {
                Planned::NeedsRead => return Some(Planned::NeedsRead),
                Planned::Refused(e) => return Some(Planned::Refused(e)),
                Planned::Nothing => None,
                Planned::Change(c) => Some(c),
            });
        }
        Some(if plans.iter().all(Option::is_none) {
            Planned::Nothing
        } else {
            Planned::Change(plans)
        })
    }

    fn encode(&self, batch: &mut NftBatch, state: &Self::State, plan: &Self::Plan) -> Self::Sent {
        self.parts
            .iter()
            .zip(state)
            .zip(plan)
            .map(|(((_, p), s), pl)| pl.as_ref().map(|pl| p.encode(batch, s, pl)))
            .collect()
    }

    fn describe(&self, plan: &Self::Plan, sent: &Self::Sent, seq: u32) -> Option<String> {
        self.parts
            .iter()
            .zip(plan)
            .zip(sent)
            .find_map(|(((_, p), pl), se)| match (pl, se) {
                (Some(pl), Some(se)) => p.describe(pl, se, seq),
                _ => None,
            })
    }

    fn after(
        &self,
        state: Self::State,
        plan: Self::Plan,
        sent: Self::Sent,
        echoes: &[Echo],
    ) -> Self::State {
        self.parts
            .iter()
            .zip(state)
            .zip(plan.into_iter().zip(sent))
            .map(|(((_, p), s), pair)| match pair {
                (Some(pl), Some(se)) => p.after(s, pl, se, echoes),
                _ => s,
            })
            .collect()
    }

    fn effect(&self, state: &Self::State, plan: &Self::Plan) -> Effect {
        let mut out = Effect::default();
        for (((_, p), s), pl) in self.parts.iter().zip(state).zip(plan) {
            if let Some(pl) = pl {
                let e = p.effect(s, pl);
                out.rebuilt |= e.rebuilt;
                out.added_dnat.extend(e.added_dnat);
                out.removed_dnat.extend(e.removed_dnat);
                out.admission.extend(e.admission);
            }
        }
        out
    }

    fn render(&self, state: &Self::State, plan: &Self::Plan) -> String {
        let mut out = String::new();
        for (((f, p), s), pl) in self.parts.iter().zip(state).zip(plan) {
            if let Some(pl) = pl {
                if self.parts.len() > 1 {
                    out.push_str(&format!("# {f}\n"));
                }
                out.push_str(&p.render(s, pl));
            }
        }
        out
    }

    fn teardown(
        &self,
        sock: &mut NfSocket,
        state: &Self::State,
        batch: &mut NftBatch,
    ) -> Result<Vec<String>, NetlinkError> {
        let mut lines = Vec::new();
        for ((_, p), s) in self.parts.iter().zip(state) {
            lines.extend(p.teardown(sock, s, batch)?);
        }
        Ok(lines)
    }

    fn interest(&self) -> Interest {
        let mut out = Interest::default();
        for (_, p) in &self.parts {
            out.tables.extend(p.interest().tables);
        }
        out
    }

    fn own_forward(&self) -> Vec<OwnForward<'_>> {
        self.parts
            .iter()
            .flat_map(|(_, p)| p.own_forward())
            .collect()
    }

    /// Each family's view of its own rules, IPv4 first.
    fn view(&self, rules: &RuleSet) -> String {
        if let [(_, only)] = self.parts.as_slice() {
            return only.view(rules);
        }
        // A comment line heads each family's part (iptables-restore and nft
        // both read `#` lines as comments).
        self.parts
            .iter()
            .map(|(f, p)| format!("# {f}\n{}", p.view(&rules.of_family(*f))))
            .collect()
    }
}
