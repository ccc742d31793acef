//! The agent's state as HTTP and metrics read it: readiness, liveness, the
//! last reconcile, counters, the forward-hook blockers. The loop writes,
//! readers take snapshots; nothing here depends on the loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::firewall::engine::monitor::Blocker;
use crate::firewall::ApplyReport;
use crate::kube::events::EventStats;
use crate::kube::watch::FeedState;
use crate::metrics::{Metrics, PREFIX};
use crate::net::address::Choice;
use crate::plan::NatTable;
use crate::state::StateStats;

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
    pub watch_errors: AtomicU64,
    /// Watch events that changed the pod store (the feed's revision).
    pub watch_events: AtomicU64,
    /// Pods in the store at the last reconcile.
    pub pods: AtomicU64,
    /// Reconciles finished with the kernel holding their table (a failed
    /// apply does not count): what a benchmark or test waits for.
    pub reconciled: AtomicU64,
}

/// The agent's state for health, readiness and diagnostics (served over HTTP
/// by a later issue). Shared: the loop writes, readers take snapshots.
#[derive(Debug, Default)]
pub struct AgentStatus {
    pub(crate) first_sync_applied: AtomicBool,
    apiserver_reachable: AtomicBool,
    /// The state store's counters, once it runs (see `state_stats`).
    state: std::sync::OnceLock<Arc<StateStats>>,
    pub(crate) last: Mutex<LastReconcile>,
    pub counters: Counters,
    events: Mutex<Option<Arc<EventStats>>>,
    /// Prometheus metrics the loop records (see `metrics`).
    pub metrics: Metrics,
    /// When the loop last showed it is alive (liveness).
    heartbeat: Mutex<Option<std::time::Instant>>,
    /// Foreign forward-hook chains that drop what the agent accepts.
    pub(crate) forward_blocked: Mutex<Vec<Blocker>>,
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

    /// `f` of the last reconcile, without a copy of its table (a scrape
    /// reads it for every mapping).
    pub fn with_last<T>(&self, f: impl FnOnce(&LastReconcile) -> T) -> T {
        f(&lock(&self.last))
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

    pub(crate) fn beat(&self) {
        *lock(&self.heartbeat) = Some(std::time::Instant::now());
    }

    pub(crate) fn follow_feed(&self, feed: &FeedState) {
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
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads, at each scrape, the counters the rest of the agent keeps in
/// [`AgentStatus`]: the pod watch, Kubernetes events, the state store, readiness.
#[derive(Debug)]
pub struct StatusCollector(pub Arc<AgentStatus>);

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = &self.0;
        let c = &status.counters;
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let m = ConstCounter::new(v);
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)
        };
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let m = ConstGauge::new(v);
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)
        };
        counter(
            &mut encoder,
            "watch_events",
            "Pod watch events that changed the agent's pod store (added, modified, deleted pods and completed lists).",
            c.watch_events.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "watch_errors",
            "Pod watch requests that failed (the watch retries with backoff).",
            c.watch_errors.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "apiserver_reachable",
            "1 while the last request to the Kubernetes API server succeeded.",
            status.apiserver_reachable().into(),
        )?;
        gauge(
            &mut encoder,
            "first_sync_applied",
            "1 once the first full pod list was planned and applied.",
            status.first_sync_applied().into(),
        )?;
        gauge(
            &mut encoder,
            "pods",
            "Pods of this node in the agent's store at the last reconcile.",
            c.pods.load(Ordering::Relaxed) as i64,
        )?;
        if let Some(state) = status.state_stats() {
            let flavor = state.flavor();
            labelled_counters(
                &mut encoder,
                "state_store_failures",
                "Reads and writes of the state store that failed, each retry counted (NAT never waits for the store).",
                &[
                    ([("operation", "read"), ("flavor", flavor)], &state.read_errors),
                    ([("operation", "write"), ("flavor", flavor)], &state.write_errors),
                ],
            )?;
            counter(
                &mut encoder,
                "state_store_writes",
                "State records written.",
                state.writes.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut encoder,
                "state_store_pending",
                "1 while a changed table waits to be written (the store is failing or busy).",
                state.pending().into(),
            )?;
        }
        if let Some(events) = status.event_stats() {
            labelled_counters(
                &mut encoder,
                "kube_events",
                "Kubernetes events about pods, by outcome (published, failed, or dropped while the API server was slow or away).",
                &[
                    ([("result", "published")], &events.published),
                    ([("result", "failed")], &events.failed),
                    ([("result", "dropped")], &events.dropped),
                ],
            )?;
        }
        Ok(())
    }
}

/// One counter family read from atomics: a series per label set.
fn labelled_counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[([(&str, &str); N], &AtomicU64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v.load(Ordering::Relaxed)).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// The agent's whole registry: [`Metrics`] plus the status collector, all
/// under the `podnat_` prefix.
pub fn registry(status: &Arc<AgentStatus>) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    status.metrics.register(&mut registry);
    registry.register_collector(Box::new(StatusCollector(status.clone())));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DualStack;
    use crate::model::{Mapping, NatKey, PodRef, Proto};
    use std::net::Ipv4Addr;

    fn text(status: &Arc<AgentStatus>) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry(status))
            .expect("encode");
        out
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn loop_metrics_and_status_counters_are_exposed() {
        let status = Arc::new(AgentStatus::new(Arc::new(EventStats::default())));
        let m = &status.metrics;
        drop(m.reconcile_timer("pods"));
        m.observe_batch(&ApplyReport {
            messages: 7,
            bytes: 1200,
            ..ApplyReport::default()
        });
        m.observe_batch(&ApplyReport::default()); // nothing sent: not a batch
        m.apply_failed("refused");
        m.apply_failed("refused");
        let mut table = NatTable {
            public_address: DualStack::v4(Ipv4Addr::new(203, 0, 113, 7)),
            ..NatTable::default()
        };
        table.rules.dnat.push(Mapping {
            key: NatKey {
                public_ip: Ipv4Addr::new(203, 0, 113, 7).into(),
                public_port: 25,
                proto: Proto::Tcp,
            },
            pod_ip: Ipv4Addr::new(10, 1, 0, 5).into(),
            pod_port: 25,
            owner: PodRef::new("mail", "mx"),
            span: 0,
        });
        m.observe_table(&table, true);
        status.counters.watch_events.store(5, Ordering::Relaxed);

        let t = text(&status);
        assert_eq!(sample(&t, "podnat_reconciles_total"), Some(1.0), "{t}");
        assert_eq!(
            sample(
                &t,
                "podnat_reconcile_duration_seconds_count{trigger=\"pods\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&t, "podnat_batch_messages_count"), Some(1.0));
        assert_eq!(sample(&t, "podnat_batch_messages_sum"), Some(7.0));
        assert_eq!(sample(&t, "podnat_batch_bytes_sum"), Some(1200.0));
        assert_eq!(
            sample(&t, "podnat_apply_errors_total{error=\"refused\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "podnat_rules_owned{family=\"ipv4\",kind=\"dnat\"}"),
            Some(1.0),
            "{t}"
        );
        assert_eq!(
            sample(&t, "podnat_rules_owned{family=\"ipv6\",kind=\"dnat\"}"),
            Some(0.0),
            "{t}"
        );
        // The hairpin sources (`-localaccess`) are counted too.
        assert_eq!(
            sample(&t, "podnat_rules_owned{family=\"ipv4\",kind=\"hairpin\"}"),
            Some(0.0),
            "{t}"
        );
        assert_eq!(
            sample(
                &t,
                "podnat_public_address_info{address=\"203.0.113.7\",family=\"ipv4\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&t, "podnat_watch_events_total"), Some(5.0));
        assert_eq!(
            sample(&t, "podnat_kube_events_total{result=\"published\"}"),
            Some(0.0),
            "{t}"
        );
        assert_eq!(sample(&t, "podnat_first_sync_applied"), Some(0.0));

        // A new address replaces the old series; none known: no series.
        table.public_address = DualStack::v4(Ipv4Addr::new(203, 0, 113, 8));
        m.observe_table(&table, true);
        let t = text(&status);
        assert!(!t.contains("203.0.113.7"), "{t}");
        assert!(t.contains("address=\"203.0.113.8\""));
        table.public_address = DualStack::default();
        m.observe_table(&table, false);
        let t = text(&status);
        assert!(!t.contains("podnat_public_address_info{"), "{t}");
        assert_eq!(
            sample(&t, "podnat_rules_owned{family=\"ipv4\",kind=\"dnat\"}"),
            Some(0.0)
        );
    }
}
