//! The agent loop. Triggers (pod store changes, public address changes, the
//! periodic resync, a retry after a failed apply, the apiserver coming back)
//! are coalesced, then: snapshot the store → facts → plan → one apply on the
//! firewall thread → events and status. The edges (pod feed, address channel,
//! event sink, backend) are handed in; this module decides when, not how.
//!
//! Kernel rules are left alone until the first full pod list is in: an empty
//! store at start must not read as "no pods" and flush working NAT.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::config::Config;
use crate::firewall::monitor::{Blocker, Tracker};
use crate::firewall::netlink::NetlinkError;
use crate::firewall::{coexist, ApplyReport, Backend, FirewallError};
use crate::kube::events::{self, EventSink, EventStats, PodEvent, Reason};
use crate::kube::pod;
use crate::kube::watch::{FeedState, PodFeed};
use crate::metrics::Metrics;
use crate::model::{PodRef, RuleSet};
use crate::net::address::Choice;
use crate::plan::{self, NatTable, PlanConfig};
use crate::state::{Recorder, StateStats};

/// Errors that stop the loop (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot start the firewall thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the firewall thread is gone (it panicked); restart the agent")]
    BackendGone,
    #[error("the pod watcher stopped; restart the agent")]
    WatcherStopped,
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

impl ReconcileError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Spawn(_) => "spawn",
            ReconcileError::BackendGone => "backend_gone",
            ReconcileError::WatcherStopped => "watcher_stopped",
            ReconcileError::Firewall(e) => e.metric_label(),
        }
    }
}

/// Loop settings (a slice of `Config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconcileConfig {
    pub plan: PlanConfig,
    pub annotation_key: String,
    /// Full reconcile (and kernel check) this often; `None`: never.
    pub resync: Option<Duration>,
    /// Print the diff instead of applying it; publish no events.
    pub dry_run: bool,
    /// Quiet time that ends a burst of triggers.
    pub debounce: Duration,
    /// Longest a trigger waits under a constant stream of others.
    pub max_delay: Duration,
}

impl ReconcileConfig {
    pub fn new(config: &Config, node_id: &str) -> ReconcileConfig {
        ReconcileConfig {
            plan: PlanConfig {
                node_id: node_id.to_string(),
                restricted_ports: config.restricted_ports.clone(),
            },
            annotation_key: config.annotation_key.clone(),
            resync: (config.informer_resync_secs > 0)
                .then(|| Duration::from_secs(config.informer_resync_secs)),
            dry_run: config.dry_run,
            debounce: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        }
    }
}

/// What the last reconcile produced.
#[derive(Clone, Debug, Default)]
pub struct LastReconcile {
    pub table: Option<NatTable>,
    /// The last apply that reached the kernel (none in dry run).
    pub report: Option<ApplyReport>,
    /// The last apply error, cleared by the next success.
    pub error: Option<String>,
    pub at: Option<SystemTime>,
    /// The public address choice the table was planned with (with the
    /// addresses passed over and why).
    pub address: Option<Choice>,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Counters {
    pub reconciles: AtomicU64,
    /// Applies that sent a batch (something changed).
    pub batches: AtomicU64,
    pub apply_errors: AtomicU64,
    pub watch_errors: AtomicU64,
    /// Watch events that changed the pod store (the feed's revision).
    pub watch_events: AtomicU64,
    /// Pods in the store at the last reconcile.
    pub pods: AtomicU64,
}

/// The agent's state for health, readiness and diagnostics (served over HTTP
/// by a later issue). Shared: the loop writes, readers take snapshots.
#[derive(Debug, Default)]
pub struct AgentStatus {
    first_sync_applied: AtomicBool,
    apiserver_reachable: AtomicBool,
    /// The state store's counters, once it runs (see `state_stats`).
    state: std::sync::OnceLock<Arc<StateStats>>,
    last: Mutex<LastReconcile>,
    pub counters: Counters,
    events: Mutex<Option<Arc<EventStats>>>,
    /// Prometheus metrics the loop records (see `metrics`).
    pub metrics: Metrics,
    /// When the loop last showed it is alive (liveness).
    heartbeat: Mutex<Option<std::time::Instant>>,
    /// Foreign forward-hook chains that drop what the agent accepts.
    forward_blocked: Mutex<Vec<Blocker>>,
}

impl AgentStatus {
    pub fn new(events: Arc<EventStats>) -> AgentStatus {
        AgentStatus {
            events: Mutex::new(Some(events)),
            ..AgentStatus::default()
        }
    }

    /// The state store's counters: writes, failures (`failures()`, each
    /// retry counts), last error, pending. `None` when no store runs (dry run).
    pub fn state_stats(&self) -> Option<Arc<StateStats>> {
        self.state.get().cloned()
    }

    /// Set once, by the wiring, when the state store starts.
    pub fn set_state_stats(&self, stats: Arc<StateStats>) {
        let _ = self.state.set(stats);
    }

    /// The first full pod list was planned and applied (ready).
    pub fn first_sync_applied(&self) -> bool {
        self.first_sync_applied.load(Ordering::Acquire)
    }

    pub fn apiserver_reachable(&self) -> bool {
        self.apiserver_reachable.load(Ordering::Acquire)
    }

    pub fn last(&self) -> LastReconcile {
        lock(&self.last).clone()
    }

    /// Foreign forward-hook base chains with policy drop, as last checked.
    pub fn forward_blocked(&self) -> Vec<Blocker> {
        lock(&self.forward_blocked).clone()
    }

    pub fn event_stats(&self) -> Option<Arc<EventStats>> {
        lock(&self.events).clone()
    }

    /// Time since the loop last beat (`None`: it has not started). It beats
    /// every `HEARTBEAT` while waiting and after each reconcile, so a large
    /// age means it is stuck (e.g. in an apply that never returns).
    pub fn heartbeat_age(&self) -> Option<Duration> {
        lock(&self.heartbeat).map(|t| t.elapsed())
    }

    fn beat(&self) {
        *lock(&self.heartbeat) = Some(std::time::Instant::now());
    }

    fn follow_feed(&self, feed: &FeedState) {
        self.apiserver_reachable
            .store(feed.reachable, Ordering::Release);
        self.counters
            .watch_errors
            .store(feed.errors, Ordering::Relaxed);
        self.counters
            .watch_events
            .store(feed.revision, Ordering::Relaxed);
    }
}

/// A poisoned lock only means a reader panicked mid-clone; the data is whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Job {
    /// `true`: read the kernel even if the remembered state looks valid.
    Apply(
        RuleSet,
        bool,
        oneshot::Sender<Result<ApplyReport, FirewallError>>,
    ),
    DryRun(RuleSet, oneshot::Sender<Result<String, FirewallError>>),
    ForwardBlockers(oneshot::Sender<Result<Vec<Blocker>, FirewallError>>),
}

/// The backend on a dedicated thread: its netlink work blocks, and must not
/// stall the runtime. The thread lives in the network namespace of the
/// process, where the rules belong.
pub struct BackendWorker {
    jobs: std::sync::mpsc::Sender<Job>,
    name: &'static str,
}

impl BackendWorker {
    pub fn spawn(mut backend: Box<dyn Backend>) -> Result<BackendWorker, ReconcileError> {
        let name = backend.name();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("podnat-firewall".into())
            .spawn(move || {
                // Ends when the worker is dropped; a reply nobody waits for
                // any more is not an error.
                for job in rx {
                    match job {
                        Job::Apply(rules, fresh, reply) => {
                            if fresh {
                                backend.forget();
                            }
                            let mut result = backend.apply(&rules);
                            if let Ok(report) = &mut result {
                                crate::firewall::flush_stale_udp(report);
                            }
                            let _ = reply.send(result);
                        }
                        Job::DryRun(rules, reply) => {
                            let _ = reply.send(dry_run(backend.as_mut(), &rules));
                        }
                        Job::ForwardBlockers(reply) => {
                            let _ = reply.send(backend.forward_blockers());
                        }
                    }
                }
            })
            .map_err(ReconcileError::Spawn)?;
        Ok(BackendWorker { jobs: tx, name })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// One batch of the difference between the kernel and `rules`;
    /// `fresh`: against a new read of the kernel, not the remembered state.
    pub async fn apply(&self, rules: RuleSet, fresh: bool) -> Result<ApplyReport, ReconcileError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Apply(rules, fresh, tx))
            .map_err(|_| ReconcileError::BackendGone)?;
        Ok(rx.await.map_err(|_| ReconcileError::BackendGone)??)
    }

    /// Foreign forward-hook chains with policy drop (read only).
    pub async fn forward_blockers(&self) -> Result<Vec<Blocker>, ReconcileError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::ForwardBlockers(tx))
            .map_err(|_| ReconcileError::BackendGone)?;
        Ok(rx.await.map_err(|_| ReconcileError::BackendGone)??)
    }

    /// The changes `apply` would make, as text; touches nothing.
    pub async fn dry_run(&self, rules: RuleSet) -> Result<String, ReconcileError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::DryRun(rules, tx))
            .map_err(|_| ReconcileError::BackendGone)?;
        Ok(rx.await.map_err(|_| ReconcileError::BackendGone)??)
    }
}

/// The backend's dry run; without CAP_NET_ADMIN the kernel cannot be read,
/// so the diff is against an empty kernel (said in the first line).
pub fn dry_run(backend: &mut dyn Backend, rules: &RuleSet) -> Result<String, FirewallError> {
    match backend.dry_run(rules, false) {
        Err(FirewallError::Netlink(
            NetlinkError::Refused { errno, .. } | NetlinkError::Socket(errno),
        )) if errno == nix::errno::Errno::EPERM => {
            let text = backend.dry_run(rules, true)?;
            Ok(format!(
                "# no CAP_NET_ADMIN: the kernel state cannot be read; assuming it is empty\n{text}"
            ))
        }
        r => r,
    }
}

/// When a burst of triggers is over: `debounce` after the last one, but never
/// later than `max_delay` after the first, so constant churn cannot starve
/// the loop.
#[derive(Clone, Copy, Debug)]
pub struct Coalescer {
    debounce: Duration,
    max_delay: Duration,
    first: Instant,
    last: Instant,
}

impl Coalescer {
    pub fn new(now: Instant, debounce: Duration, max_delay: Duration) -> Coalescer {
        Coalescer {
            debounce,
            max_delay,
            first: now,
            last: now,
        }
    }

    pub fn poke(&mut self, now: Instant) {
        self.last = now;
    }

    pub fn deadline(&self) -> Instant {
        (self.last + self.debounce).min(self.first + self.max_delay)
    }
}

/// What was last published about one pod, so that events go out on change
/// only, never on every resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Published {
    applied: String,
    conflict: String,
    invalid: String,
}

impl Published {
    fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.conflict.is_empty() && self.invalid.is_empty()
    }
}

/// Per-pod memory of published events.
#[derive(Debug, Default)]
pub struct EventLedger {
    pods: BTreeMap<PodRef, (Published, ObjectReference)>,
}

impl EventLedger {
    /// The events that tell what changed for each pod since the last call.
    /// `reference` finds a pod still in the store; a pod that is gone is
    /// told about through the reference remembered for it.
    pub fn observe(
        &mut self,
        table: &NatTable,
        reference: impl Fn(&PodRef) -> Option<ObjectReference>,
    ) -> Vec<PodEvent> {
        let mut now: BTreeMap<PodRef, Published> = BTreeMap::new();
        for m in &table.rules.dnat {
            let text = &mut now.entry(m.owner.clone()).or_default().applied;
            if !text.is_empty() {
                text.push_str(", ");
            }
            text.push_str(&format!("{} → {}:{}", m.key, m.pod_ip, m.pod_port));
        }
        for c in &table.conflicts {
            let text = &mut now.entry(c.loser.clone()).or_default().conflict;
            if !text.is_empty() {
                text.push_str("; ");
            }
            text.push_str(&format!(
                "{} is taken by {} (a Ready pod beats a not-ready one, then the newer pod wins)",
                c.key, c.winner
            ));
        }
        for r in &table.rejected {
            now.entry(r.pod.clone()).or_default().invalid =
                format!("annotation rejected, no NAT for this pod: {}", r.error);
        }

        let mut pods: Vec<PodRef> = now.keys().cloned().collect();
        pods.extend(self.pods.keys().filter(|p| !now.contains_key(p)).cloned());
        let mut out = Vec::new();
        for pod in pods {
            let old = self.pods.remove(&pod);
            let new = now.remove(&pod).unwrap_or_default();
            let (old, regarding) = match (old, reference(&pod)) {
                // The same name for a new pod (a StatefulSet's replacement):
                // nothing was published about this one yet.
                (Some((_, was)), Some(r)) if was.uid != r.uid => (Published::default(), r),
                (Some((p, _)), Some(r)) => (p, r),
                (Some((p, was)), None) => (p, was),
                (None, Some(r)) => (Published::default(), r),
                (None, None) => continue,
            };
            let mut emit = |reason, note: String| {
                out.push(PodEvent {
                    regarding: regarding.clone(),
                    reason,
                    note,
                })
            };
            if new.applied != old.applied {
                if new.applied.is_empty() {
                    emit(Reason::NatRemoved, format!("removed {}", old.applied));
                } else {
                    emit(Reason::NatApplied, new.applied.clone());
                }
            }
            if new.conflict != old.conflict && !new.conflict.is_empty() {
                emit(Reason::NatConflict, new.conflict.clone());
            }
            if new.invalid != old.invalid && !new.invalid.is_empty() {
                emit(Reason::InvalidAnnotation, new.invalid.clone());
            }
            if !new.is_empty() {
                self.pods.insert(pod, (new, regarding));
            }
        }
        out
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
    /// The rules the kernel holds since our last successful apply.
    applied: Option<RuleSet>,
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
            applied: None,
            last_dry_run: None,
            state: None,
            drift: None,
            blockers: Vec::new(),
            seen_revision: 0,
            seen_reachable: false,
            changed_since: None,
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
            if state.listed {
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
            loop {
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

    async fn reconcile(
        &mut self,
        force: bool,
        fresh: bool,
        (why, trigger): (&str, &str),
    ) -> Result<(), ReconcileError> {
        let _timer = self.status.metrics.reconcile_timer(trigger);
        let pods = self.feed.store.state();
        let facts: Vec<_> = pods
            .iter()
            .map(|p| pod::facts(p, &self.cfg.annotation_key))
            .collect();
        let choice = self.address.borrow().clone();
        let table = plan::plan(&facts, choice.chosen, &self.cfg.plan);
        let counters = &self.status.counters;
        counters.reconciles.fetch_add(1, Ordering::Relaxed);
        counters.pods.store(pods.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            why,
            force,
            pods = pods.len(),
            mappings = table.rules.dnat.len(),
            "reconcile"
        );
        if !table.pending.is_empty() {
            tracing::debug!(
                entries = table.pending.len(),
                "no public address known; auto-address entries wait"
            );
        }

        let report = if self.cfg.dry_run {
            let text = self.backend.dry_run(table.rules.clone()).await;
            match text {
                Ok(text) => {
                    if self.last_dry_run.as_deref() != Some(&text) {
                        if text.is_empty() {
                            println!("# no changes: the kernel already holds this NAT table");
                        } else {
                            print!("{text}");
                        }
                        self.last_dry_run = Some(text);
                    }
                }
                Err(ReconcileError::Firewall(e)) => {
                    self.apply_failed(&e);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            None
        } else if force || self.applied.as_ref() != Some(&table.rules) {
            match self.backend.apply(table.rules.clone(), fresh).await {
                Ok(report) => {
                    self.applied = Some(table.rules.clone());
                    self.failures = 0;
                    self.retry_at = None;
                    log_apply(&report, &table, why);
                    // Network programming: the oldest pod change this batch
                    // carries, from when the watch announced it.
                    if let Some(since) = self.changed_since.take() {
                        if report.messages > 0 {
                            self.status
                                .metrics
                                .network_programming_duration
                                .observe(since.elapsed().as_secs_f64());
                        }
                    }
                    self.status.metrics.observe_batch(&report);
                    if report.messages > 0 {
                        counters.batches.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(report)
                }
                Err(ReconcileError::Firewall(e)) => {
                    self.apply_failed(&e);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };

        if !self.status.first_sync_applied.swap(true, Ordering::AcqRel) {
            tracing::info!(
                mappings = table.rules.dnat.len(),
                pods = pods.len(),
                "first sync applied"
            );
        }

        // The kernel holds this table now: hand it to the state store, whose
        // task writes it if it changed, without holding this loop up.
        if let Some(recorder) = self.state.as_ref().filter(|_| !self.cfg.dry_run) {
            recorder.record(&table.rules.dnat);
        }

        // Events only once the kernel holds what they describe.
        let index: HashMap<PodRef, usize> = facts
            .iter()
            .enumerate()
            .map(|(i, f)| (f.pod.clone(), i))
            .collect();
        let notes = self.ledger.observe(&table, |p| {
            index.get(p).map(|&i| events::reference(&pods[i]))
        });
        for ev in notes {
            self.events.publish(ev);
        }

        self.status.metrics.observe_table(&table, !self.cfg.dry_run);
        let mut last = lock(&self.status.last);
        if report.is_some() {
            last.report = report;
        }
        last.error = None;
        last.table = Some(table);
        last.address = Some(choice);
        last.at = Some(SystemTime::now());
        drop(last);
        self.status.beat();
        Ok(())
    }

    fn apply_failed(&mut self, e: &FirewallError) {
        // What the kernel holds is unknown now: the next plan is applied
        // even if it equals the last one.
        self.applied = None;
        self.failures = self.failures.saturating_add(1);
        let delay = RETRY_MIN
            .saturating_mul(1u32 << self.failures.min(6).saturating_sub(1))
            .min(RETRY_MAX);
        self.retry_at = Some(Instant::now() + delay);
        self.status
            .counters
            .apply_errors
            .fetch_add(1, Ordering::Relaxed);
        self.status.metrics.apply_failed(e.metric_label());
        lock(&self.status.last).error = Some(e.to_string());
        tracing::error!(error = %e, retry_in = ?delay, "cannot program the NAT table; the kernel keeps its previous rules");
    }
}

fn log_apply(report: &ApplyReport, table: &NatTable, why: &str) {
    if report.messages == 0 {
        tracing::debug!(why, "kernel already up to date");
        return;
    }
    tracing::info!(
        why,
        added = report.added_dnat.len(),
        removed = report.removed_dnat.len(),
        mappings = table.rules.dnat.len(),
        messages = report.messages,
        bytes = report.bytes,
        retries = report.retries,
        rebuilt = report.rebuilt,
        "applied one batch"
    );
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
pub fn fixed_address(address: Ipv4Addr) -> (watch::Sender<Choice>, watch::Receiver<Choice>) {
    watch::channel(Choice {
        chosen: Some(address),
        skipped: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotation;
    use crate::model::{Mapping, NatKey, Proto};
    use crate::plan::{Conflict, Rejection};

    fn mapping(owner: &PodRef, port: u16, pod_ip: [u8; 4]) -> Mapping {
        Mapping {
            key: NatKey {
                public_ip: Ipv4Addr::new(203, 0, 113, 7),
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip: pod_ip.into(),
            pod_port: port,
            owner: owner.clone(),
        }
    }

    fn reference_of(p: &PodRef, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            uid: Some(uid.into()),
            ..ObjectReference::default()
        }
    }

    fn reasons(evs: &[PodEvent]) -> Vec<(String, Reason)> {
        evs.iter()
            .map(|e| (e.regarding.name.clone().unwrap_or_default(), e.reason))
            .collect()
    }

    #[test]
    fn events_go_out_on_change_only() {
        let a = PodRef::new("mail", "a");
        let b = PodRef::new("mail", "b");
        let bad = PodRef::new("mail", "bad");
        let mut ledger = EventLedger::default();
        let in_store = |p: &PodRef| Some(reference_of(p, "u1"));

        let mut t = NatTable::default();
        t.rules.dnat.push(mapping(&a, 25, [10, 1, 0, 5]));
        t.rejected.push(Rejection {
            pod: bad.clone(),
            error: annotation::parse("{", &Default::default()).unwrap_err(),
        });
        let evs = ledger.observe(&t, in_store);
        assert_eq!(
            reasons(&evs),
            vec![
                ("a".into(), Reason::NatApplied),
                ("bad".into(), Reason::InvalidAnnotation)
            ]
        );
        assert_eq!(evs[0].note, "203.0.113.7:25/tcp → 10.1.0.5:25");
        assert!(
            evs[1].note.contains("annotation rejected"),
            "{}",
            evs[1].note
        );

        // A resync with the same table says nothing.
        assert!(ledger.observe(&t, in_store).is_empty());

        // b wins port 25, a loses it: a's mapping is removed and a is told why.
        let mut t2 = t.clone();
        t2.rules.dnat = vec![mapping(&b, 25, [10, 1, 1, 5])];
        t2.conflicts.push(Conflict {
            key: t.rules.dnat[0].key,
            loser: a.clone(),
            winner: b.clone(),
        });
        let evs = ledger.observe(&t2, in_store);
        assert_eq!(
            reasons(&evs),
            vec![
                ("a".into(), Reason::NatRemoved),
                ("a".into(), Reason::NatConflict),
                ("b".into(), Reason::NatApplied),
            ]
        );
        assert!(
            evs[1].note.contains("is taken by mail:b"),
            "{}",
            evs[1].note
        );
        assert!(ledger.observe(&t2, in_store).is_empty());

        // b is deleted (gone from the store): a takes over, b's removal is
        // published with the reference remembered for it.
        let evs = ledger.observe(&t, |p| (p != &b).then(|| reference_of(p, "u1")));
        assert_eq!(
            reasons(&evs),
            vec![
                ("a".into(), Reason::NatApplied),
                ("b".into(), Reason::NatRemoved)
            ]
        );
        assert_eq!(evs[1].regarding.uid.as_deref(), Some("u1"));
    }

    #[test]
    fn a_replacement_pod_with_the_same_name_is_told_again() {
        let a = PodRef::new("mail", "a");
        let mut ledger = EventLedger::default();
        let mut t = NatTable::default();
        t.rules.dnat.push(mapping(&a, 25, [10, 1, 0, 5]));
        assert_eq!(ledger.observe(&t, |p| Some(reference_of(p, "u1"))).len(), 1);
        let evs = ledger.observe(&t, |p| Some(reference_of(p, "u2")));
        assert_eq!(reasons(&evs), vec![("a".into(), Reason::NatApplied)]);
        assert_eq!(evs[0].regarding.uid.as_deref(), Some("u2"));
    }

    #[test]
    fn coalescer_waits_for_quiet_but_never_past_the_bound() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Coalescer::new(t0, ms(20), ms(200));
        assert_eq!(c.deadline(), t0 + ms(20));
        c.poke(t0 + ms(15));
        assert_eq!(c.deadline(), t0 + ms(35));
        // A trigger every 10 ms forever: the burst still ends at 200 ms.
        for i in 0..100 {
            c.poke(t0 + ms(10 * i));
            assert!(c.deadline() <= t0 + ms(200));
        }
        assert_eq!(c.deadline(), t0 + ms(200));
    }

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
