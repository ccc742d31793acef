//! The agent loop. Triggers (pod store changes, public address changes, the
//! periodic resync, a retry after a failed apply, the apiserver coming back)
//! are coalesced, then: snapshot the store → facts → plan → one apply on the
//! firewall thread → events and status. The edges (pod feed, address channel,
//! event sink, backend) are handed in; this module decides when, not how.
//!
//! Kernel rules are left alone until the first full pod list is in: an empty
//! store at start must not read as "no pods" and flush working NAT.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

mod pass;

pub use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::firewall::engine::coexist;
use crate::firewall::engine::monitor::{Blocker, Tracker};
pub use crate::firewall::engine::worker::BackendWorker;
use crate::firewall::engine::worker::WorkerError;
use crate::firewall::{ApplyReport, FirewallError};
use crate::kube::events::{self, EventSink};
use crate::kube::ledger::EventLedger;
use crate::kube::namespace::NamespaceFeed;
use crate::kube::store::PodEntry;
use crate::kube::watch::PodFeed;
use crate::model::{DualStack, PodRef};
use crate::net::address::Choice;
use crate::plan::incremental::{follow, IncrementalPlan};
use crate::plan::{NatTable, PlanConfig};
use crate::state::Recorder;
use crate::status::lock;
pub use crate::status::{AgentStatus, Counters, LastReconcile};

/// Errors that stop the loop (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Worker(WorkerError),
    #[error("the pod watcher stopped; restart the agent")]
    WatcherStopped,
    #[error("the namespace watcher stopped; restart the agent")]
    NamespaceWatcherStopped,
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

impl From<WorkerError> for ReconcileError {
    fn from(e: WorkerError) -> ReconcileError {
        match e {
            WorkerError::Firewall(f) => ReconcileError::Firewall(f),
            e => ReconcileError::Worker(e),
        }
    }
}

impl ReconcileError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Worker(WorkerError::Spawn(_)) => "spawn",
            ReconcileError::Worker(WorkerError::Gone) => "backend_gone",
            ReconcileError::Worker(WorkerError::Firewall(e)) => e.metric_label(),
            ReconcileError::WatcherStopped => "watcher_stopped",
            ReconcileError::NamespaceWatcherStopped => "namespace_watcher_stopped",
            ReconcileError::Firewall(e) => e.metric_label(),
        }
    }
}

/// Loop settings (a slice of `Config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconcileConfig {
    pub plan: PlanConfig,
    /// Full reconcile (and kernel check) this often; `None`: never.
    pub resync: Option<Duration>,
    /// Print the diff instead of applying it; publish no events.
    pub dry_run: bool,
    /// Quiet time that ends a burst of triggers.
    pub debounce: Duration,
    /// Longest a trigger waits under a constant stream of others.
    pub max_delay: Duration,
    /// `-guardnodeports`: read the node's sockets before each plan.
    pub guard_node_ports: bool,
}

impl ReconcileConfig {
    pub fn new(config: &Config, node_id: &str) -> ReconcileConfig {
        ReconcileConfig {
            plan: PlanConfig {
                node_id: node_id.to_string(),
                restricted_ports: config.restricted_ports.clone(),
                families: config.families,
                local_access: config.local_access,
                source_ranges: crate::firewall::enforces_source_ranges(config.flavor),
            },
            resync: (config.informer_resync_secs > 0)
                .then(|| Duration::from_secs(config.informer_resync_secs)),
            dry_run: config.dry_run,
            // One pod's change costs the loop well under a millisecond
            // now (benches/churn, loop rows), so the quiet time only needs
            // to catch the watch events of one API change (a pod's status
            // and its IP come as a few updates within milliseconds); longer
            // bursts are bounded by `max_delay`. benches/latency measures
            // the event → kernel time with it.
            debounce: Duration::from_millis(5),
            max_delay: Duration::from_millis(200),
            guard_node_ports: config.guard_node_ports,
        }
    }
}

/// Why the loop woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    Pods,
    Address,
    Resync,
    Retry,
    /// The apiserver answers again after an outage.
    Reconnected,
    /// The kernel's ruleset changed (maybe someone else's hand on ours).
    Ruleset,
}

impl Wake {
    /// Wakes that check the kernel even when the plan did not change (a
    /// ruleset wake does when the tracker says a foreign commit touched ours).
    fn forces_apply(self) -> bool {
        matches!(self, Wake::Resync | Wake::Retry | Wake::Reconnected)
    }
}

/// What the wakes of one burst ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Due {
    reconcile: bool,
    /// Apply even if the plan did not change (the kernel may have).
    force: bool,
    /// Read the kernel again even if no notification said it changed (the
    /// periodic resync: the safety net under the monitor).
    fresh: bool,
    /// Look again for foreign forward-hook chains that drop.
    forward: bool,
}

impl Due {
    const ALL: Due = Due {
        reconcile: true,
        force: true,
        fresh: true,
        forward: true,
    };

    fn merge(&mut self, o: Due) {
        self.reconcile |= o.reconcile;
        self.force |= o.force;
        self.fresh |= o.fresh;
        self.forward |= o.forward;
    }
}

/// The nf_tables monitor's side of the loop: its bell rings only for foreign
/// commits that concern the agent; the tracker says why.
#[derive(Clone)]
pub struct Drift {
    pub bell: Arc<tokio::sync::Notify>,
    pub tracker: Arc<Tracker>,
}

/// Resolves when the drift bell rings; never without one.
async fn rung(drift: &Option<Drift>) {
    match drift {
        Some(d) => d.bell.notified().await,
        None => std::future::pending().await,
    }
}

const RETRY_MIN: Duration = Duration::from_secs(1);
/// How often the waiting loop beats (see `AgentStatus::heartbeat_age`).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The loop's inputs and memory.
pub struct Reconciler {
    cfg: ReconcileConfig,
    feed: PodFeed,
    address: watch::Receiver<Choice>,
    address_open: bool,
    backend: BackendWorker,
    events: EventSink,
    status: Arc<AgentStatus>,
    ledger: EventLedger,
    resync: Option<Interval>,
    heartbeat: Option<Interval>,
    retry_at: Option<Instant>,
    failures: u32,
    /// The planner's state between events (`None` until the first sync).
    inc: Option<IncrementalPlan>,
    /// The kernel holds `inc`'s table (the last apply succeeded): the next
    /// event's changes alone can be applied.
    synced: bool,
    /// The state store holds a whole table to apply changes to.
    recorded: bool,
    /// The status and the event ledger hold the table of the last
    /// successful reconcile (so a change alone brings them up to date).
    shown: bool,
    last_dry_run: Option<String>,
    /// Hands each table the kernel holds to the state store (never waits).
    state: Option<Recorder>,
    /// Rung by the nf_tables monitor on foreign changes to what the agent
    /// owns (drift repair) or to forward-hook policies.
    drift: Option<Drift>,
    /// The blockers last reported (warned once per change).
    blockers: Vec<Blocker>,
    seen_revision: u64,
    seen_reachable: bool,
    /// When the oldest pod change not yet programmed was seen.
    changed_since: Option<Instant>,
    /// Mappings a node service started on after they were programmed (kept,
    /// reported once).
    shadowed: std::collections::BTreeSet<crate::model::NatKey>,
    /// The node's sockets could not be read last time (warned once).
    sockets_failed: bool,
    /// The namespaces' policies (selector, ports annotation).
    namespaces: Option<NamespaceFeed>,
    seen_ns_revision: u64,
}

impl Reconciler {
    pub fn new(
        cfg: ReconcileConfig,
        feed: PodFeed,
        address: watch::Receiver<Choice>,
        backend: BackendWorker,
        events: EventSink,
        status: Arc<AgentStatus>,
    ) -> Reconciler {
        Reconciler {
            cfg,
            feed,
            address,
            address_open: true,
            backend,
            events,
            status,
            ledger: EventLedger::default(),
            resync: None,
            heartbeat: None,
            retry_at: None,
            failures: 0,
            inc: None,
            synced: false,
            recorded: false,
            shown: false,
            last_dry_run: None,
            state: None,
            drift: None,
            blockers: Vec::new(),
            seen_revision: 0,
            seen_reachable: false,
            changed_since: None,
            shadowed: Default::default(),
            sockets_failed: false,
            namespaces: None,
            seen_ns_revision: 0,
        }
    }

    /// Records every table the kernel holds in the state store (`None`: no
    /// store, as in a dry run).
    pub fn with_state(mut self, recorder: Option<Recorder>) -> Reconciler {
        self.state = recorder;
        self
    }

    /// Reconciles (and so repairs drift) when the nf_tables monitor rings
    /// for a foreign commit that touched what the agent owns; re-checks the
    /// forward hook when one changed a forward-hook policy. The agent's own
    /// commits and commits elsewhere (kube-proxy's) never ring.
    pub fn with_drift(mut self, drift: Option<Drift>) -> Reconciler {
        self.drift = drift;
        self
    }

    /// Plans with the namespaces' policies from `feed` (the watch of
    /// namespace labels and ports annotations); without one every namespace
    /// is open. The first sync waits for its list, like for the pods'.
    pub fn with_namespaces(mut self, feed: Option<NamespaceFeed>) -> Reconciler {
        self.namespaces = feed;
        self
    }

    /// What wake `w` asks for.
    fn due(&self, w: Wake) -> Due {
        match w {
            Wake::Ruleset => {
                let r = self
                    .drift
                    .as_ref()
                    .map(|d| d.tracker.take_reasons())
                    .unwrap_or_default();
                Due {
                    reconcile: r.ours,
                    force: r.ours,
                    fresh: false,
                    forward: r.forward_hook,
                }
            }
            Wake::Resync => Due::ALL,
            w => Due {
                reconcile: true,
                force: w.forces_apply(),
                fresh: false,
                forward: false,
            },
        }
    }

    /// Looks for foreign forward-hook chains with policy drop and says so
    /// once per change: log, status (/entries/list), metric. Never touches
    /// them.
    async fn check_forward(&mut self) {
        let found = match self.backend.forward_blockers().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot look for foreign forward-hook drop policies: {e}");
                return;
            }
        };
        if found == self.blockers {
            return;
        }
        for b in found.iter().filter(|b| !self.blockers.contains(b)) {
            tracing::warn!(
                family = b.family_name(),
                table = %b.table,
                chain = %b.chain,
                "{}",
                coexist::advice(self.backend.name(), b)
            );
        }
        for b in self.blockers.iter().filter(|b| !found.contains(b)) {
            tracing::info!(family = b.family_name(), table = %b.table, chain = %b.chain,
                "the forward-hook chain no longer drops by policy (or is gone)");
        }
        if let Some(d) = &self.drift {
            d.tracker.set_blockers(&found);
        }
        self.status.metrics.observe_blockers(&found);
        *lock(&self.status.forward_blocked) = found.clone();
        self.blockers = found;
    }

    /// Runs until `shutdown` resolves (a batch in flight is finished first;
    /// the rules stay) or a fatal error.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ReconcileError> {
        let mut shutdown = std::pin::pin!(shutdown);
        self.status.beat();
        self.heartbeat = Some(tokio::time::interval(HEARTBEAT));
        tracing::info!(
            flavor = self.backend.name(),
            dry_run = self.cfg.dry_run,
            resync = ?self.cfg.resync,
            "waiting for the first full pod list; existing kernel rules stay as they are until then"
        );
        loop {
            let state = self.feed.state.borrow_and_update().clone();
            self.status.follow_feed(&state);
            let ns_settled = match self.namespaces.as_mut() {
                Some(ns) => {
                    let s = ns.state.borrow_and_update();
                    self.seen_ns_revision = s.revision;
                    s.settled()
                }
                None => true,
            };
            if state.listed && ns_settled {
                self.seen_revision = state.revision;
                self.seen_reachable = state.reachable;
                break;
            }
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutting down before the first sync; rules left as they were");
                    return Ok(());
                }
                r = self.feed.state.changed() => r.map_err(|_| ReconcileError::WatcherStopped)?,
                r = ns_changed(&mut self.namespaces) => r?,
                () = tick(&mut self.heartbeat) => self.status.beat(),
            }
        }
        self.resync = self.cfg.resync.map(|period| {
            let mut i = tokio::time::interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });

        let mut due = Due::ALL;
        let mut why = ("first pod list", "first_sync");
        loop {
            if due.reconcile {
                self.reconcile(due.force, due.fresh, why).await?;
            }
            if due.forward {
                self.check_forward().await;
            }
            // Wait for the next trigger...
            let first = tokio::select! {
                biased;
                () = &mut shutdown => break,
                w = self.next_wake() => w?,
            };
            // ...and for the burst it starts to end.
            due = self.due(first);
            why = (wake_name(first), wake_label(first));
            let mut burst = Coalescer::new(Instant::now(), self.cfg.debounce, self.cfg.max_delay);
            // No debounce: no timer either (tokio's would round up to its
            // next millisecond tick).
            while !self.cfg.debounce.is_zero() {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return self.stopped(),
                    () = tokio::time::sleep_until(burst.deadline()) => break,
                    w = self.next_wake() => {
                        let w = w?;
                        due.merge(self.due(w));
                        burst.poke(Instant::now());
                    }
                }
            }
        }
        self.stopped()
    }

    fn stopped(&self) -> Result<(), ReconcileError> {
        tracing::info!("shutting down; the rules stay in the kernel");
        Ok(())
    }

    /// The next trigger that calls for a reconcile.
    async fn next_wake(&mut self) -> Result<Wake, ReconcileError> {
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                r = self.feed.state.changed() => {
                    r.map_err(|_| ReconcileError::WatcherStopped)?;
                    let state = self.feed.state.borrow_and_update().clone();
                    self.status.follow_feed(&state);
                    let reconnected = state.reachable && !self.seen_reachable;
                    self.seen_reachable = state.reachable;
                    if reconnected {
                        self.seen_revision = state.revision;
                        return Ok(Wake::Reconnected);
                    }
                    if state.revision != self.seen_revision {
                        self.seen_revision = state.revision;
                        self.changed_since.get_or_insert_with(Instant::now);
                        return Ok(Wake::Pods);
                    }
                }
                r = self.address.changed(), if self.address_open => {
                    if r.is_err() {
                        self.address_open = false;
                        tracing::error!(
                            public_address = ?self.address.borrow().chosen,
                            "public address detection stopped; keeping the last address"
                        );
                        continue;
                    }
                    return Ok(Wake::Address);
                }
                r = ns_changed(&mut self.namespaces) => {
                    r?;
                    let revision = self.namespaces.as_mut().map_or(0, |ns| ns.state.borrow_and_update().revision);
                    if revision != self.seen_ns_revision {
                        self.seen_ns_revision = revision;
                        self.changed_since.get_or_insert_with(Instant::now);
                        return Ok(Wake::Pods);
                    }
                }
                () = tick(&mut self.resync) => return Ok(Wake::Resync),
                () = rung(&self.drift) => return Ok(Wake::Ruleset),
                () = tick(&mut self.heartbeat) => self.status.beat(),
                () = sleep_until(retry_at) => {
                    self.retry_at = None;
                    return Ok(Wake::Retry);
                }
            }
        }
    }

    fn apply_failed(&mut self, e: &FirewallError) {
        // What the kernel holds is unknown now: the next apply sends the
        // whole table, even if it equals the last one.
        self.synced = false;
        // The planner moved on without them: the next success brings the
        // state store, the events and the status up to date in full.
        self.recorded = false;
        self.shown = false;
        self.failures = self.failures.saturating_add(1);
        let delay = RETRY_MIN
            .saturating_mul(1u32 << self.failures.min(6).saturating_sub(1))
            .min(RETRY_MAX);
        self.retry_at = Some(Instant::now() + delay);
        self.status.metrics.apply_failed(e.metric_label());
        lock(&self.status.last).error = Some(e.to_string());
        tracing::error!(error = %e, retry_in = ?delay, "cannot program the NAT table; the kernel keeps its previous rules");
    }
}

/// The metric label of a wake.
fn wake_label(w: Wake) -> &'static str {
    match w {
        Wake::Pods => "pods",
        Wake::Address => "address",
        Wake::Resync => "resync",
        Wake::Retry => "retry",
        Wake::Reconnected => "reconnected",
        Wake::Ruleset => "ruleset",
    }
}

fn wake_name(w: Wake) -> &'static str {
    match w {
        Wake::Pods => "pods changed",
        Wake::Address => "public address changed",
        Wake::Resync => "periodic resync",
        Wake::Retry => "retry after a failed apply",
        Wake::Reconnected => "apiserver reachable again",
        Wake::Ruleset => "ruleset changed in the kernel",
    }
}

/// A pod's facts, with its namespace's policy from `namespaces`.
fn facts_with(p: &PodEntry, namespaces: &Option<NamespaceFeed>) -> crate::plan::PodFacts {
    let mut f = p.facts.clone();
    if let Some(ns) = namespaces {
        f.namespace_policy = ns.policy(&f.pod.namespace);
    }
    f
}

/// Resolves when the namespace feed changes; never without one.
async fn ns_changed(feed: &mut Option<NamespaceFeed>) -> Result<(), ReconcileError> {
    match feed {
        Some(f) => f
            .state
            .changed()
            .await
            .map_err(|_| ReconcileError::NamespaceWatcherStopped),
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The public address from `--public-address`: a channel that never changes.
/// Keep the sender for as long as the receiver is used.
pub fn fixed_address(address: DualStack) -> (watch::Sender<Choice>, watch::Receiver<Choice>) {
    watch::channel(Choice {
        chosen: address,
        skipped: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_that_check_the_kernel() {
        assert!(Wake::Resync.forces_apply());
        assert!(Wake::Retry.forces_apply());
        assert!(Wake::Reconnected.forces_apply());
        assert!(
            !Wake::Ruleset.forces_apply(),
            "only when the tracker says ours"
        );
        assert!(!Wake::Pods.forces_apply());
        assert!(!Wake::Address.forces_apply());
    }
}
