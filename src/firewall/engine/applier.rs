//! The one applier, for every flavor: it owns the netlink socket, the
//! ruleset generation, the cache of the last committed state, the retries
//! when another writer commits between our read and our batch, the echoes
//! that carry new rules' handles, and the report. A flavor (`Flavor`) only
//! reads what it owns, plans a change against it and encodes that change;
//! it never decides what should exist (the planner does) and never sends.

use std::sync::Arc;

use super::cache::GenerationCache;
use super::coexist::{self, OwnForward};
use super::monitor::{Blocker, Interest, Tracker};
use crate::firewall::wire::netlink::{
    BatchBuffers, Echo, FinalBatch, NetlinkError, NfSocket, NftBatch,
};
use crate::firewall::{canonical, Admission, ApplyReport, Backend, Changes, FirewallError};
use crate::model::{Mapping, RuleSet};

/// How many times a batch is rebuilt when another writer committed between
/// our read and our commit (the kernel refuses it with ERESTART).
pub const MAX_RETRIES: u32 = 16;

/// What a flavor's plan says about a kernel state.
pub enum Planned<P> {
    /// The kernel already holds the desired rules.
    Nothing,
    Change(P),
    /// The plan would need what the state does not know (a rule handle the
    /// kernel did not echo): read the kernel again.
    NeedsRead,
    /// Nothing is sent, and the error says why and what to do: an object
    /// with the agent's name is not the agent's (no mark, not its layout),
    /// or the rules ask for what this kernel's layout cannot enforce.
    Refused(FirewallError),
}

/// What a change does, for the report and the UDP conntrack flush.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The layout (tables, chains, sets) is created or rebuilt.
    pub rebuilt: bool,
    pub added_dnat: Vec<Mapping>,
    pub removed_dnat: Vec<Mapping>,
    /// Keys whose allowed sources shrink while their mapping stays.
    pub admission: Vec<Admission>,
}

/// One flavor's layout in the kernel. Everything but `read` and `teardown`
/// is pure; those two only dump through the socket they are handed.
pub trait Flavor: Send + 'static {
    /// What the kernel holds of the agent's objects.
    type State: Send;
    /// One change, planned against one state.
    type Plan;
    /// What `encode` remembers for `after` (e.g. which message adds which rule).
    type Sent;

    fn name(&self) -> &'static str;
    /// Reads back what the agent owns (scoped dumps only).
    fn read(&self, sock: &mut NfSocket) -> Result<Self::State, NetlinkError>;
    /// The state of a kernel that holds nothing of ours (dry run without
    /// CAP_NET_ADMIN).
    fn empty(&self) -> Self::State;
    /// The agent's rules in `state`.
    fn rules(&self, state: &Self::State) -> RuleSet;
    /// A plan carries what `encode`, `after`, `effect` and `render` need
    /// (a rebuild: the whole desired table).
    fn plan(&self, state: &Self::State, desired: &RuleSet) -> Planned<Self::Plan>;
    /// The plan for `changes` on top of `state`, when `state` is the table
    /// they were computed against (the last commit) and the layout needs no
    /// repair; `None` otherwise (the applier then wants the whole table).
    /// O(change): never walks the whole state.
    fn plan_changes(&self, state: &Self::State, changes: Changes) -> Option<Planned<Self::Plan>>;
    /// Appends the plan's messages to `batch` (begin/end are the applier's;
    /// a dual-stack change puts both families' messages in one batch).
    fn encode(&self, batch: &mut NftBatch, state: &Self::State, plan: &Self::Plan) -> Self::Sent;
    /// What message `seq` of the batch `encode` built does, for one the
    /// kernel refused that was added without a description.
    fn describe(&self, _plan: &Self::Plan, _sent: &Self::Sent, _seq: u32) -> Option<String> {
        None
    }
    /// The state once the batch is committed (`echoes`: what the kernel
    /// echoed for it).
    fn after(
        &self,
        state: Self::State,
        plan: Self::Plan,
        sent: Self::Sent,
        echoes: &[Echo],
    ) -> Self::State;
    fn effect(&self, state: &Self::State, plan: &Self::Plan) -> Effect;
    /// The plan in the rule view's syntax (the dry run).
    fn render(&self, state: &Self::State, plan: &Self::Plan) -> String;
    /// Appends the messages that remove everything the agent owns (none if
    /// there is nothing); returns what they remove, a line per object kind
    /// and family.
    fn teardown(
        &self,
        sock: &mut NfSocket,
        state: &Self::State,
        batch: &mut NftBatch,
    ) -> Result<Vec<String>, NetlinkError>;
    fn interest(&self) -> Interest;
    /// The base chains holding the flavor's forward accepts.
    fn own_forward(&self) -> Vec<OwnForward<'_>>;
    fn view(&self, rules: &RuleSet) -> String;
}

/// A flavor with the applier's socket, generation and cache around it.
pub struct Applier<F: Flavor> {
    pub(crate) flavor: F,
    sock: Option<NfSocket>,
    cache: GenerationCache<F::State>,
    /// The last sent batch's buffers, for the next one.
    spare: Option<BatchBuffers>,
}

impl<F: Flavor> Applier<F> {
    pub fn with_flavor(flavor: F) -> Applier<F> {
        Applier {
            flavor,
            sock: None,
            cache: GenerationCache::default(),
            spare: None,
        }
    }

    fn sock(&mut self) -> Result<&mut NfSocket, NetlinkError> {
        if self.sock.is_none() {
            self.sock = Some(NfSocket::open()?);
        }
        Ok(self.sock.as_mut().expect("socket just opened"))
    }

    /// What the kernel holds of the agent's, in the flavor's terms.
    pub(crate) fn state(&mut self) -> Result<F::State, FirewallError> {
        Ok(self.read_state()?)
    }

    fn read_state(&mut self) -> Result<F::State, NetlinkError> {
        let Applier { flavor, sock, .. } = self;
        if sock.is_none() {
            *sock = Some(NfSocket::open()?);
        }
        flavor.read(sock.as_mut().expect("socket just opened"))
    }

    /// The state to plan against at `generation` and its plan: the cache
    /// when it is still valid and enough for the plan, else a fresh read.
    fn state_for(
        &mut self,
        generation: u32,
        desired: &RuleSet,
        report: &mut ApplyReport,
    ) -> Result<(F::State, Planned<F::Plan>), NetlinkError> {
        if let Some(s) = self.cache.take(generation) {
            match self.flavor.plan(&s, desired) {
                Planned::NeedsRead => {}
                p => {
                    report.cache_hit = true;
                    return Ok((s, p));
                }
            }
        }
        report.cache_hit = false;
        let s = self.read_state()?;
        let p = self.flavor.plan(&s, desired);
        Ok((s, p))
    }

    /// Reads the kernel and encodes the batch `apply` would send, without
    /// sending it (benchmarks time `send_prepared` alone: the kernel's floor).
    pub fn prepare(&mut self, desired: &RuleSet) -> Result<Option<FinalBatch>, FirewallError> {
        self.cache.clear();
        let desired = canonical(desired);
        let generation = self.sock()?.generation()?;
        let state = self.read_state()?;
        let Planned::Change(plan) = self.flavor.plan(&state, &desired) else {
            return Ok(None);
        };
        let mut batch = NftBatch::new();
        self.flavor.encode(&mut batch, &state, &plan);
        Ok((!batch.is_empty()).then(|| batch.finalize(Some(generation))))
    }

    /// Like `prepare`, for `changes` on top of what the kernel holds (the
    /// batch `apply_changes` would send). `None`: they do not fit.
    pub fn prepare_changes(
        &mut self,
        changes: &Changes,
    ) -> Result<Option<FinalBatch>, FirewallError> {
        self.cache.clear();
        let changes = changes.canonical().into_owned();
        let generation = self.sock()?.generation()?;
        let state = self.read_state()?;
        let Some(Planned::Change(plan)) = self.flavor.plan_changes(&state, changes) else {
            return Ok(None);
        };
        let mut batch = NftBatch::new();
        self.flavor.encode(&mut batch, &state, &plan);
        Ok((!batch.is_empty()).then(|| batch.finalize(Some(generation))))
    }

    /// Encodes, sends and reports one planned change against `state` at
    /// `generation`; the cache holds the state after it on success.
    fn send_plan(
        &mut self,
        generation: u32,
        epoch: u64,
        state: F::State,
        plan: F::Plan,
        report: &mut ApplyReport,
    ) -> Result<(), NetlinkError> {
        let mut batch = match self.spare.take() {
            Some(b) => NftBatch::reusing(b),
            None => NftBatch::new(),
        };
        let sent = self.flavor.encode(&mut batch, &state, &plan);
        let effect = self.flavor.effect(&state, &plan);
        report.rebuilt = effect.rebuilt;
        report.messages = batch.len();
        report.bytes = batch.byte_len();
        report.added_dnat = effect.added_dnat;
        report.removed_dnat = effect.removed_dnat;
        report.admission = effect.admission;
        let own = self.cache.sending(generation);
        let batch = batch.finalize(Some(generation));
        let sent_batch = self.sock()?.send_batch_echo(&batch);
        self.spare = batch.into_buffers().keep();
        match sent_batch {
            Ok(echoes) => {
                // The batch carried the generation it was built on, so its
                // commit is `own`, and the kernel state is known there.
                let after = self.flavor.after(state, plan, sent, &echoes);
                self.cache.set(own, epoch, after);
                Ok(())
            }
            Err(NetlinkError::Undescribed { seq, errno }) => {
                self.cache.refused(own);
                let what = self
                    .flavor
                    .describe(&plan, &sent, seq)
                    .unwrap_or_else(|| format!("message {seq} of the batch"));
                Err(NetlinkError::Refused { what, errno })
            }
            Err(e) => {
                self.cache.refused(own);
                Err(e)
            }
        }
    }

    /// Removes (`send`) or lists what `cleanup` removes: the flavor's
    /// teardown in one batch at the generation it was read at.
    fn teardown(&mut self, send: bool) -> Result<Vec<String>, FirewallError> {
        self.cache.clear();
        for attempt in 0..=MAX_RETRIES {
            let generation = self.sock()?.generation()?;
            let state = self.read_state()?;
            let Applier { flavor, sock, .. } = self;
            let sock = sock.as_mut().expect("socket opened by read_state");
            let mut batch = NftBatch::new();
            let removed = flavor.teardown(sock, &state, &mut batch)?;
            if batch.is_empty() || !send {
                return Ok(removed);
            }
            match sock.send_batch(batch.finalize(Some(generation))) {
                Ok(()) => return Ok(removed),
                Err(NetlinkError::GenerationChanged { .. }) if attempt < MAX_RETRIES => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FirewallError::TooManyRetries(MAX_RETRIES))
    }

    pub fn send_prepared(&mut self, batch: FinalBatch) -> Result<(), FirewallError> {
        Ok(self.sock()?.send_batch(batch)?)
    }
}

impl<F: Flavor> Backend for Applier<F> {
    fn name(&self) -> &'static str {
        self.flavor.name()
    }

    /// Also remembers what it read for the next apply.
    fn read(&mut self) -> Result<RuleSet, FirewallError> {
        let epoch = self.cache.epoch();
        let generation = self.sock()?.generation()?;
        let state = self.read_state()?;
        let rules = self.flavor.rules(&state);
        // Changed between the two reads: then the generation moved on and
        // this entry is never used.
        self.cache.set(generation, epoch, state);
        Ok(rules)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(flavor = self.flavor.name()))]
    fn apply(&mut self, desired: &RuleSet) -> Result<ApplyReport, FirewallError> {
        let desired = canonical(desired);
        let desired: &RuleSet = &desired;
        let mut report = ApplyReport::default();
        for attempt in 0..=MAX_RETRIES {
            let epoch = self.cache.epoch();
            let generation = self.sock()?.generation()?;
            let (state, planned) = self.state_for(generation, desired, &mut report)?;
            let plan = match planned {
                Planned::Change(p) => p,
                Planned::Refused(e) => return Err(e),
                // NeedsRead after a fresh read cannot happen: the read
                // knows every handle.
                Planned::Nothing | Planned::NeedsRead => {
                    self.cache.set(generation, epoch, state);
                    return Ok(report);
                }
            };
            match self.send_plan(generation, epoch, state, plan, &mut report) {
                Ok(()) => return Ok(report),
                Err(NetlinkError::GenerationChanged { .. }) if attempt < MAX_RETRIES => {
                    report.retries += 1;
                    tracing::debug!(
                        attempt,
                        "ruleset changed under the batch; re-reading and retrying"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(FirewallError::TooManyRetries(MAX_RETRIES))
    }

    /// No generation query: the batch carries the generation the cached
    /// state holds at (the last commit, or the newest one the tracker read
    /// without anything of ours changing), and the kernel refuses it if
    /// another commit came first — then nothing was changed and the caller
    /// applies the whole table.
    // No span of its own: on the path of every pod change, and its report
    // is logged by the pass.
    fn apply_changes(&mut self, changes: Changes) -> Result<Option<ApplyReport>, FirewallError> {
        let changes = changes.into_canonical();
        let epoch = self.cache.epoch();
        let Some((generation, state)) = self.cache.take_current(epoch) else {
            return Ok(None);
        };
        let mut report = ApplyReport {
            cache_hit: true,
            ..ApplyReport::default()
        };
        let plan = match self.flavor.plan_changes(&state, changes) {
            Some(Planned::Change(p)) => p,
            Some(Planned::Nothing) => {
                self.cache.set(generation, epoch, state);
                return Ok(Some(report));
            }
            None | Some(Planned::NeedsRead) | Some(Planned::Refused(_)) => {
                self.cache.set(generation, epoch, state);
                return Ok(None);
            }
        };
        match self.send_plan(generation, epoch, state, plan, &mut report) {
            Ok(()) => Ok(Some(report)),
            Err(NetlinkError::GenerationChanged { .. }) => {
                tracing::debug!("ruleset changed under the change batch; applying the whole table");
                Ok(None)
            }
            // Something the change adds is there already (a flavor may
            // leave that check to the kernel's NLM_F_EXCL): the batch
            // changed nothing, and the whole table, read afresh, follows.
            Err(NetlinkError::Refused {
                errno: nix::errno::Errno::EEXIST,
                what,
            }) => {
                tracing::debug!(%what, "an added object exists already; applying the whole table");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn dry_run(&mut self, desired: &RuleSet, assume_empty: bool) -> Result<String, FirewallError> {
        let desired = canonical(desired);
        let state = if assume_empty {
            self.flavor.empty()
        } else {
            self.read_state()?
        };
        Ok(match self.flavor.plan(&state, &desired) {
            Planned::Change(p) => self.flavor.render(&state, &p),
            Planned::Refused(e) => return Err(e),
            Planned::Nothing | Planned::NeedsRead => String::new(),
        })
    }

    fn cleanup(&mut self) -> Result<Vec<String>, FirewallError> {
        self.teardown(true)
    }

    fn cleanup_dry_run(&mut self) -> Result<Vec<String>, FirewallError> {
        self.teardown(false)
    }

    fn view(&self, rules: &RuleSet) -> String {
        self.flavor.view(&canonical(rules))
    }

    fn forget(&mut self) {
        self.cache.clear();
    }

    fn interest(&self) -> Interest {
        self.flavor.interest()
    }

    fn attach_tracker(&mut self, tracker: Arc<Tracker>) {
        self.cache.attach(tracker);
    }

    fn forward_blockers(&mut self) -> Result<Vec<Blocker>, FirewallError> {
        let Applier { flavor, sock, .. } = self;
        if sock.is_none() {
            *sock = Some(NfSocket::open()?);
        }
        let sock = sock.as_mut().expect("socket just opened");
        Ok(coexist::forward_blockers(sock, &flavor.own_forward())?)
    }
}
