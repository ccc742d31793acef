//! Flavor `iptables` (the default, as in the Go version): the agent's rules
//! live in iptables-nft's own tables — `<PREFIX>_PRE`/`<PREFIX>_POST` in
//! `ip nat`, `<PREFIX>_FORWARD` in `ip filter` (with `-localaccess`
//! `<PREFIX>_OUTPUT` in `ip nat`, with `-iptablescounters` the counting
//! chains in `ip mangle`) — reached by one jump each from their base
//! chains, every rule encoded exactly as iptables-nft 1.8.9 encodes it, so
//! `iptables-nft -S`/`-save` list them and kube-proxy or CNI plugins keep
//! working beside them. Nothing else in those tables is touched.

pub mod position;
pub(crate) mod rules;
pub(crate) mod xt;

mod changes;
mod kernel;
mod place;
mod render;
#[cfg(test)]
mod tests;
mod traffic;

pub use self::traffic::read_traffic;

use std::collections::HashMap;
use std::fmt::Write;

use rustables::{Chain, MsgType, Table};

use self::changes::*;
pub(crate) use self::changes::{Changes, Inserted};
use self::place::{places, table_index, Place, FILTER, N_PLACES, PLACES, TABLES};
use self::position::{apply_plan, plan_chain, plan_jump, Anchor, ChainPlan, ParentRule};
use self::render::line;
use self::rules::{decode, jump_target, parse_exprs, rule_attrs, AgentRule};
use super::families::PerFamily;
use crate::config::JumpPositions;
use crate::firewall::engine::applier::{Applier, Effect, Flavor, Planned};
use crate::firewall::engine::coexist::OwnForward;
use crate::firewall::engine::monitor::{Interest, TableInterest};
use crate::firewall::names::{internal_returns, Names};
use crate::firewall::sources::{Admission, KeyView};
use crate::firewall::wire::netlink::{
    attr_be64, attr_str, find_attr, protocol_family, sys, Attrs, Echo, NetlinkError, NfSocket,
    NftBatch, NftMsg, Scope,
};
use crate::firewall::{view, FirewallError};
use crate::model::{Families, Family, Mapping, NatKey, RuleSet, SourceRule};
/// A rule as read back: its handle (`None` for a rule an earlier batch of
/// the agent's added without an echo of its handle, until the chain is read
/// again) and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot<T> {
    handle: Option<u64>,
    rule: T,
}

/// What the kernel holds of the agent's part of `ip nat`, `ip filter` and
/// `ip mangle`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptState {
    /// Whose tables these are: `ip` (iptables-nft) or `ip6` (ip6tables-nft).
    family: Family,
    /// `-localaccess`: the name of `<PREFIX>_PRE`, which `<PREFIX>_OUTPUT`
    /// jumps to; `None`: the Go version's three places only.
    local: Option<String>,
    /// `-iptablescounters`: the name of `<PREFIX>_COUNT` (the counting
    /// chain in `ip mangle`, `<PREFIX>_COUNTIN`'s jump target).
    counting: Option<String>,
    /// Per table (`TABLES`: nat, filter, mangle): it exists.
    table_present: [bool; 3],
    /// Per table: made (and marked) by the agent.
    table_marked: [bool; 3],
    /// Per place (`PLACES`); all are read where their chain exists (so
    /// `cleanup` finds an OUTPUT or counting chain left from a run with
    /// local access or counters), the managed ones planned.
    parent_exists: [bool; N_PLACES],
    /// The base chain carries the agent's mark: the agent made it.
    parent_marked: [bool; N_PLACES],
    /// Unmarked, as made, and holding only the agent's jumps: an earlier
    /// version made it (adopted at the next apply, removed by `cleanup`).
    parent_earlier: [bool; N_PLACES],
    own_exists: [bool; N_PLACES],
    /// The agent's chain carries its mark.
    own_marked: [bool; N_PLACES],
    /// Parent chains: which rules jump to the agent's chain.
    parents: [Vec<Slot<ParentRule>>; N_PLACES],
    /// The agent's chains: `None` for a rule that is not its encoding.
    own: [Vec<Slot<Option<AgentRule>>>; N_PLACES],
    /// Everything exists, each of the agent's chains holds exactly its
    /// rules in sorted order, and the jumps are where they are asked to be:
    /// a change can then be planned by binary search (`Changes::delta`).
    settled: bool,
}

impl IptState {
    fn table_exists(&self, table: &str) -> bool {
        self.table_present[table_index(table)]
    }

    /// The chain named as the agent's chain of place `i` is someone else's:
    /// unmarked, and holding a rule that is not the agent's.
    fn own_foreign(&self, i: usize) -> bool {
        self.own_exists[i] && !self.own_marked[i] && self.own[i].iter().any(|s| s.rule.is_none())
    }

    /// The agent's chain of place `i` exists and is the agent's (marked, or
    /// an earlier version's holding only the agent's rules).
    fn own_owned(&self, i: usize) -> bool {
        self.own_exists[i] && !self.own_foreign(i)
    }

    /// The first managed place whose chain is someone else's.
    fn foreign_place(&self) -> Option<Place> {
        self.places()
            .iter()
            .copied()
            .find(|p| self.own_foreign(p.index()))
    }

    /// What an earlier version made without marks and the next apply makes
    /// anew, marked, in the same batch (the kernel keeps the userdata a
    /// table or chain was created with): `None` when nothing is unmarked.
    fn adoption(&self) -> Option<Adoption> {
        let managed = self.places().iter().map(|p| p.index());
        let unmarked_own = managed
            .clone()
            .any(|i| self.own_owned(i) && !self.own_marked[i]);
        let parents: Vec<usize> = managed.filter(|&i| self.parent_earlier[i]).collect();
        if !unmarked_own && parents.is_empty() {
            return None;
        }
        // Every chain of the agent's is made anew (`<PREFIX>_OUTPUT` jumps
        // to `<PREFIX>_PRE`: one cannot go without the other).
        let own = (0..PLACES.len()).filter(|&i| self.own_owned(i)).collect();
        Some(Adoption { own, parents })
    }

    /// The state once `a`'s deletes are done: its chains gone, and with
    /// them every jump to them.
    fn without(&self, a: &Adoption) -> IptState {
        let mut st = self.clone();
        for &i in &a.own {
            st.own_exists[i] = false;
            st.own_marked[i] = false;
            st.own[i].clear();
            st.parents[i].retain(|s| s.rule == ParentRule::Foreign);
        }
        for &i in &a.parents {
            st.parent_exists[i] = false;
            st.parent_earlier[i] = false;
            st.parents[i].clear();
        }
        st.settled = false;
        st
    }

    /// The places managed (see `places`).
    fn places(&self) -> &'static [Place] {
        places(self.local.is_some(), self.counting.is_some())
    }

    /// Whether the place with index `i` is managed.
    fn manages(&self, i: usize) -> bool {
        self.places().iter().any(|p| p.index() == i)
    }

    /// Every table and chain exists and each own chain is exactly its
    /// desired content in sorted order (what `delta` needs besides jumps).
    fn own_sorted(&self) -> bool {
        let managed = self.places().iter().map(|p| p.index());
        let exist = self.places().iter().all(|p| self.table_exists(p.table()))
            && managed
                .clone()
                .all(|i| self.parent_exists[i] && self.own_exists[i]);
        exist && {
            let want = desired_chains(
                &self.rules(),
                self.family,
                self.local.as_deref(),
                self.counting.as_deref(),
            );
            managed.into_iter().all(|i| {
                self.own[i].len() == want[i].len()
                    && self.own[i]
                        .iter()
                        .zip(&want[i])
                        .all(|(s, w)| s.rule.as_ref() == Some(w))
            })
        }
    }

    /// The agent's rules decoded from its chains (each in its own chain).
    pub fn rules(&self) -> RuleSet {
        let mut r = RuleSet::default();
        for (place, chain) in PLACES.iter().zip(&self.own) {
            for s in chain {
                match (place, &s.rule) {
                    (Place::Pre, Some(AgentRule::Dnat(m, source))) => {
                        r.dnat.push(m.clone());
                        if let Some(source) = source {
                            r.allow.push(SourceRule {
                                key: m.key,
                                span: m.span,
                                source: *source,
                                owner: m.owner.clone(),
                            });
                        }
                    }
                    (Place::Pre, Some(AgentRule::Mark(l))) => r.local.push(l.clone()),
                    (Place::Post, Some(AgentRule::Snat(x))) => r.snat.push(x.clone()),
                    (Place::Forward, Some(AgentRule::Forward(f))) => r.forward.push(f.clone()),
                    _ => {}
                }
            }
        }
        r.normalize();
        r
    }
}

/// Chains an earlier version made without the agent's mark, made anew by
/// the next apply (indices of `PLACES`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Adoption {
    /// The agent's chains (flushed, deleted, made again marked).
    own: Vec<usize>,
    /// Base chains holding only the agent's jumps.
    parents: Vec<usize>,
}

/// The iptables flavor: the agent's chains and jumps in iptables-nft's
/// tables. Pure but for `read`/`teardown`, which dump through the
/// applier's socket.
pub struct Iptables {
    names: Names,
    jumps: JumpPositions,
    family: Family,
    /// `-localaccess`: nat OUTPUT, the hairpin marks and masquerade.
    local: bool,
    /// `-iptablescounters`: the counting chains in mangle.
    counters: bool,
}

/// The iptables flavor, in iptables-nft's tables and (with IPv6 enabled)
/// ip6tables-nft's, with the applier around it.
pub type IptablesBackend = Applier<PerFamily<Iptables>>;

impl IptablesBackend {
    pub fn new(names: Names, jumps: JumpPositions) -> IptablesBackend {
        Self::for_families(names, jumps, Families::default())
    }

    pub fn for_families(names: Names, jumps: JumpPositions, families: Families) -> IptablesBackend {
        Self::with_options(names, jumps, families, false)
    }

    /// `local`: `-localaccess` (node-local DNAT and hairpin).
    pub fn with_options(
        names: Names,
        jumps: JumpPositions,
        families: Families,
        local: bool,
    ) -> IptablesBackend {
        Applier::with_flavor(PerFamily::new(families, |family| Iptables {
            names: names.clone(),
            jumps,
            family,
            local,
            counters: false,
        }))
    }

    /// Counts every packet of each mapping (`-iptablescounters`): the
    /// counting chains in mangle, read at scrape time.
    pub fn with_counters(mut self, on: bool) -> IptablesBackend {
        for (_, part) in self.flavor.parts_mut() {
            part.counters = on;
        }
        self
    }

    /// The agent's rules in the backend's families, read once; `None` when
    /// none of its chains exists (marked, or an earlier version's).
    pub fn owned_rules(&mut self) -> Result<Option<RuleSet>, crate::firewall::FirewallError> {
        let state = self.state()?;
        let owns = state
            .iter()
            .any(|s| (0..PLACES.len()).any(|i| s.own_owned(i)));
        Ok(owns.then(|| self.flavor.rules(&state)))
    }

    /// Changes the jump positions (the next apply moves the jumps).
    pub fn set_jump_positions(&mut self, jumps: JumpPositions) {
        for (_, part) in self.flavor.parts_mut() {
            part.jumps = jumps;
        }
        // The remembered state was settled for the old positions.
        crate::firewall::Backend::forget(self);
    }
}

impl Flavor for Iptables {
    type State = IptState;
    type Plan = Changes;
    /// The sequence number of each new rule's message.
    type Sent = Vec<(u32, Inserted)>;

    fn name(&self) -> &'static str {
        "iptables"
    }

    fn read(&self, sock: &mut NfSocket) -> Result<IptState, NetlinkError> {
        self.read_state(sock)
    }

    fn empty(&self) -> IptState {
        self.empty_state()
    }

    fn rules(&self, state: &IptState) -> RuleSet {
        state.rules()
    }

    fn plan(&self, state: &IptState, desired: &RuleSet) -> Planned<Changes> {
        if let Some(place) = state.foreign_place() {
            return Planned::Refused(FirewallError::NotOurs(format!(
                "chain {} in table {} {} exists and is not the agent's: it has no \"{}\" \
                 comment and holds rules the agent did not write; remove it or choose \
                 another -resourceprefix",
                place.own(&self.names),
                view::nft_family(self.family),
                place.table(),
                self.names.mark()
            )));
        }
        let adopt = state.adoption();
        let changes = match adopt {
            None => Changes::plan(state, desired, &self.jumps),
            Some(a) => {
                let mut c = Changes::plan(&state.without(&a), desired, &self.jumps);
                // Reported against what the kernel holds, not the state
                // with the agent's chains gone.
                (c.added_dnat, c.removed_dnat) = c.dnat_changes(state, desired);
                // An earlier version's mapping (the Go version publishes every
                // entry open) restricted now: its other sources' connections
                // go too.
                c.admission = Admission::between(&state.rules(), desired);
                c.adopt = Some(a);
                c
            }
        };
        if changes.is_empty() {
            Planned::Nothing
        } else if !changes.handles_known(state) {
            Planned::NeedsRead
        } else {
            Planned::Change(changes)
        }
    }

    fn plan_changes(
        &self,
        state: &IptState,
        changes: crate::firewall::Changes,
    ) -> Option<Planned<Changes>> {
        let plan = Changes::delta(state, &changes)?;
        Some(if plan.is_empty() {
            Planned::Nothing
        } else if !plan.handles_known(state) {
            Planned::NeedsRead
        } else {
            Planned::Change(plan)
        })
    }

    fn encode(
        &self,
        batch: &mut NftBatch,
        state: &IptState,
        plan: &Changes,
    ) -> Vec<(u32, Inserted)> {
        match &plan.adopt {
            None => self.build(batch, state, plan),
            Some(a) => {
                self.encode_adoption(batch, state, a);
                self.build(batch, &state.without(a), plan)
            }
        }
    }

    fn describe(&self, plan: &Changes, sent: &Vec<(u32, Inserted)>, seq: u32) -> Option<String> {
        let at = sent.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        let (rule, place) = match sent[at].1 {
            Inserted::Own(i, k) => (plan.own[i].insert[k].0.clone(), PLACES[i]),
            Inserted::Jump(i, _) => (PLACES[i].jump(&self.names), PLACES[i]),
        };
        Some(format!(
            "add rule {}",
            line(&rule, place, &self.names, self.family)
        ))
    }

    fn after(
        &self,
        state: IptState,
        plan: Changes,
        sent: Vec<(u32, Inserted)>,
        echoes: &[Echo],
    ) -> IptState {
        let state = match &plan.adopt {
            None => state,
            Some(a) => state.without(a),
        };
        plan.after(state, &echoed_handles(&sent, echoes))
    }

    fn effect(&self, _state: &IptState, plan: &Changes) -> Effect {
        Effect {
            rebuilt: plan.creates(),
            added_dnat: plan.added_dnat.clone(),
            removed_dnat: plan.removed_dnat.clone(),
            admission: plan.admission.clone(),
        }
    }

    fn render(&self, state: &IptState, plan: &Changes) -> String {
        match &plan.adopt {
            None => self.render_changes(state, plan),
            Some(a) => {
                self.render_adoption(state, a) + &self.render_changes(&state.without(a), plan)
            }
        }
    }

    /// Jumps first (a chain still referenced cannot be deleted), from
    /// wherever they are in the agent's tables, then the agent's chains, then
    /// the base chains and tables the agent made that nothing else uses.
    /// A chain named like the agent's but not its own stays, with its jumps.
    fn teardown(
        &self,
        sock: &mut NfSocket,
        state: &IptState,
        batch: &mut NftBatch,
    ) -> Result<Vec<String>, NetlinkError> {
        let names = &self.names;
        let (af, fam) = (self.family.nfproto(), view::nft_family(self.family));
        let owned: Vec<Place> = PLACES
            .into_iter()
            .filter(|p| state.own_owned(p.index()))
            .collect();
        let mut jumps = 0;
        let mut chains = Vec::new();
        let mut bases = Vec::new();
        let mut tables = Vec::new();
        for (t, table) in TABLES.into_iter().enumerate() {
            if !state.table_exists(table) {
                continue;
            }
            let own: Vec<&str> = owned
                .iter()
                .filter(|p| p.table() == table)
                .map(|p| p.own(names))
                .collect();
            let scope = Scope::table(af, table);
            for m in sock.dump_scoped(sys::NFT_MSG_GETRULE, &scope)? {
                let chain = attr_str(&m, sys::NFTA_RULE_CHAIN).unwrap_or_default();
                let exprs = parse_exprs(find_attr(&m, sys::NFTA_RULE_EXPRESSIONS).unwrap_or(&[]));
                let (Some(target), Some(handle)) =
                    (jump_target(&exprs), attr_be64(&m, sys::NFTA_RULE_HANDLE))
                else {
                    continue;
                };
                if own.contains(&target) && !own.contains(&chain.as_str()) {
                    let mut a = Attrs::new();
                    a.str(sys::NFTA_RULE_TABLE, table)
                        .str(sys::NFTA_RULE_CHAIN, &chain)
                        .be64(sys::NFTA_RULE_HANDLE, handle);
                    batch.add(
                        NftMsg::new(sys::NFT_MSG_DELRULE, 0, a).in_family(self.family),
                        format!(
                            "delete the jump to {target} in chain {chain} of table {fam} {table}"
                        ),
                    );
                    jumps += 1;
                }
            }
            // Every chain flushed before any is deleted: `<PREFIX>_OUTPUT`
            // jumps to `<PREFIX>_PRE`, and a referenced chain cannot go.
            let here: Vec<Place> = owned
                .iter()
                .copied()
                .filter(|p| p.table() == table)
                .collect();
            for place in &here {
                self.flush_chain(batch, *place);
            }
            let mut gone: Vec<String> = Vec::new();
            for place in &here {
                self.delete_chain(batch, *place);
                chains.push(format!("{table} {}", place.own(names)));
                gone.push(place.own(names).to_string());
            }
            // A base chain the agent made (or an earlier version's holding
            // only its jumps) goes once nothing but the agent's jumps to
            // chains that go were in it.
            for place in PLACES.into_iter().filter(|p| p.table() == table) {
                let i = place.index();
                let ours = state.parent_marked[i] || state.parent_earlier[i];
                // Only jumps to the agent's chain (which all go), or nothing.
                let emptied = state.parents[i].is_empty()
                    || (state.own_owned(i)
                        && state.parents[i]
                            .iter()
                            .all(|s| s.rule != ParentRule::Foreign));
                if state.parent_exists[i] && ours && emptied {
                    self.delete_base_chain(batch, place);
                    bases.push(format!("{table} {}", place.parent()));
                    gone.push(place.parent().to_string());
                }
            }
            // A table the agent made goes once every chain in it goes.
            if state.table_marked[t] {
                let rest = sock
                    .dump_scoped(sys::NFT_MSG_GETCHAIN, &scope)?
                    .iter()
                    .filter_map(|c| attr_str(c, sys::NFTA_CHAIN_NAME))
                    .filter(|c| !gone.contains(c))
                    .count();
                let sets = sock.dump_scoped(sys::NFT_MSG_GETSET, &scope)?.len();
                if rest == 0 && sets == 0 {
                    let mut a = Attrs::new();
                    a.str(sys::NFTA_TABLE_NAME, table);
                    batch.add(
                        NftMsg::new(sys::NFT_MSG_DELTABLE, 0, a).in_family(self.family),
                        format!("delete table {fam} {table}"),
                    );
                    tables.push(table.to_string());
                }
            }
        }
        let mut lines = Vec::new();
        let head = format!("{fam} iptables:");
        if jumps > 0 {
            lines.push(format!("{head} {jumps} jump rule(s)"));
        }
        for (kind, list) in [
            ("chains", chains),
            ("base chains", bases),
            ("tables", tables),
        ] {
            if !list.is_empty() {
                lines.push(format!("{head} {kind} {}", list.join(", ")));
            }
        }
        Ok(lines)
    }

    fn interest(&self) -> Interest {
        let tables = TABLES
            .into_iter()
            .filter(|table| {
                places(self.local, self.counters)
                    .iter()
                    .any(|p| p.table() == *table)
            })
            .map(|table| {
                let here = places(self.local, self.counters)
                    .iter()
                    .filter(|p| p.table() == table);
                TableInterest {
                    family: self.family.nfproto(),
                    table: table.to_string(),
                    whole: false,
                    chains: here
                        .clone()
                        .map(|p| p.own(&self.names).to_string())
                        .collect(),
                    parents: here.map(|p| p.parent().to_string()).collect(),
                }
            })
            .collect();
        Interest { tables }
    }

    /// The accept is a rule of iptables-nft's FORWARD, ahead of its policy.
    fn own_forward(&self) -> Vec<OwnForward<'_>> {
        vec![OwnForward {
            family: self.family.nfproto(),
            table: FILTER,
            chain: Place::Forward.parent(),
        }]
    }

    fn view(&self, rules: &RuleSet) -> String {
        view::iptables_save_counted(rules, &self.names, self.family, self.local, self.counters)
    }
}
