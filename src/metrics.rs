//! Prometheus metrics (prometheus-client, in the style of kube-rs'
//! controller-rs): the reconcile loop records what happens — reconciles and
//! their duration, batch sizes, apply errors by kind, what the last plan
//! holds — into [`Metrics`]. Counters that other parts already keep (the pod
//! watch, Kubernetes events, the state store, readiness) are read from the
//! status at scrape time (`status::StatusCollector`), so they are never kept
//! twice. This module depends on nothing of the agent's above it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::firewall::engine::monitor::Blocker;
use crate::firewall::ApplyReport;
use crate::plan::NatTable;

/// Prefix of every metric name.
pub const PREFIX: &str = "podnat";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `FirewallError::metric_label` (refused, socket, netlink, retries, ...).
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// ipv4 or ipv6.
    pub family: String,
    /// dnat, snat or forward.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// What woke the loop: first_sync, pods, address, resync, retry,
    /// reconnected or ruleset.
    pub trigger: String,
}

/// 1 ms .. ~16 s: a small change takes milliseconds, a first sync of
/// thousands of rules up to seconds.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockerLabels {
    /// ip or inet.
    pub family: String,
    pub table: String,
    pub chain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    pub address: String,
    pub family: String,
}

/// What the loop records. Cloning shares the metrics (prometheus-client
/// handles are reference-counted), so the loop and the registry hold the
/// same values.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_duration: Family<TriggerLabels, Histogram, fn() -> Histogram>,
    /// A pod change seen by the watch → its batch committed.
    pub network_programming_duration: Histogram,
    pub batch_messages: Histogram,
    pub batch_bytes: Histogram,
    pub apply_errors: Family<ErrorLabels, Counter>,
    pub rules_owned: Family<KindLabels, Gauge>,
    pub conflicts: Gauge,
    pub invalid_annotations: Gauge,
    /// Entries rejected alone (a bad `sourceRanges` / `srcPortEnd`).
    pub rejected_entries: Gauge,
    pub pending_entries: Gauge,
    pub public_address: Family<AddressLabels, Gauge>,
    pub forward_blocked: Family<BlockerLabels, Gauge>,
    /// Entries refused (namespace policy, node services), counted when a
    /// refusal first appears.
    pub entries_refused: Family<ReasonLabels, Counter>,
    /// Entries refused in the last plan, by reason.
    pub refused_entries: Family<ReasonLabels, Gauge>,
    /// Mappings a node service started on after they were programmed.
    pub node_service_shadowed: Gauge,
    /// The address `public_address` shows.
    shown_address: Arc<Mutex<crate::model::DualStack>>,
}

/// `FirewallError::metric_label` values, exposed at 0 from the start so
/// that rates and alerts see a series before the first error.
const APPLY_ERROR_KINDS: [&str; 4] = ["refused", "socket", "netlink", "retries"];

impl Default for Metrics {
    fn default() -> Self {
        let apply_errors = Family::<ErrorLabels, Counter>::default();
        for kind in APPLY_ERROR_KINDS {
            apply_errors.get_or_create_owned(&ErrorLabels {
                error: kind.to_string(),
            });
        }
        let entries_refused = Family::<ReasonLabels, Counter>::default();
        let refused_entries = Family::<ReasonLabels, Gauge>::default();
        for reason in crate::plan::RefusalReason::LABELS {
            let labels = ReasonLabels {
                reason: reason.to_string(),
            };
            entries_refused.get_or_create_owned(&labels);
            refused_entries.get_or_create_owned(&labels);
        }
        Metrics {
            entries_refused,
            refused_entries,
            node_service_shadowed: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_duration: Family::new_with_constructor(duration_histogram),
            network_programming_duration: duration_histogram(),
            // 1 .. 16384 netlink messages; 256 B .. 64 MiB per batch.
            batch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            batch_bytes: Histogram::new(exponential_buckets(256.0, 4.0, 10)),
            apply_errors,
            rules_owned: Family::default(),
            conflicts: Gauge::default(),
            invalid_annotations: Gauge::default(),
            rejected_entries: Gauge::default(),
            pending_entries: Gauge::default(),
            public_address: Family::default(),
            forward_blocked: Family::default(),
            shown_address: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers these metrics (shared, not copied) under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "reconciles",
            "Reconciles run (plan, and apply when something changed or a resync is due)",
            self.reconciles.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of one reconcile: plan, diff, apply and events, by what woke the loop",
            Unit::Seconds,
            self.reconcile_duration.clone(),
        );
        registry.register_with_unit(
            "network_programming_duration",
            "From a pod change seen by the watch to the nf_tables batch that programs it committed (kube-proxy's name for the same idea)",
            Unit::Seconds,
            self.network_programming_duration.clone(),
        );
        registry.register(
            "batch_messages",
            "Netlink messages in each nf_tables batch sent to the kernel",
            self.batch_messages.clone(),
        );
        registry.register_with_unit(
            "batch",
            "Size of each nf_tables batch sent to the kernel",
            Unit::Bytes,
            self.batch_bytes.clone(),
        );
        registry.register(
            "apply_errors",
            "Applies the kernel refused or that failed, by kind of error",
            self.apply_errors.clone(),
        );
        registry.register(
            "rules_owned",
            "Rules (iptables flavor) or map/set elements (nftables flavor) the agent holds in the kernel, by kind",
            self.rules_owned.clone(),
        );
        registry.register(
            "conflicts",
            "Entries that lost their public address:port/proto to another pod in the last plan",
            self.conflicts.clone(),
        );
        registry.register(
            "invalid_annotations",
            "Pods on this node whose whole annotation was rejected in the last plan",
            self.invalid_annotations.clone(),
        );
        registry.register(
            "rejected_entries",
            "Entries rejected alone (a bad sourceRanges or srcPortEnd; the pod's other entries go on) in the last plan",
            self.rejected_entries.clone(),
        );
        registry.register(
            "pending_entries",
            "Auto-address entries waiting for a public address to be detected",
            self.pending_entries.clone(),
        );
        registry.register(
            "forward_blocked",
            "Foreign base chains at the forward hook whose policy drops what the agent accepts (value 1 each; never touched)",
            self.forward_blocked.clone(),
        );
        registry.register(
            "entries_refused",
            "Annotation entries refused (the namespace may not publish them, or the node itself serves the port), counted when the refusal first appears, by reason",
            self.entries_refused.clone(),
        );
        registry.register(
            "refused_entries",
            "Annotation entries refused in the last plan, by reason",
            self.refused_entries.clone(),
        );
        registry.register(
            "node_service_shadowed",
            "Mappings on a port a node service started to serve after the mapping was programmed (kept, see the pod's events)",
            self.node_service_shadowed.clone(),
        );
        registry.register(
            "public_address_info",
            "The public IPv4 address in use (value 1; no series while none is known)",
            self.public_address.clone(),
        );
    }

    /// Counts a reconcile and records its duration, under `trigger`, when
    /// dropped.
    pub fn reconcile_timer(&self, trigger: &str) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self
                .reconcile_duration
                .get_or_create(&TriggerLabels {
                    trigger: trigger.to_string(),
                })
                .clone(),
        }
    }

    /// A batch that reached the kernel (nothing is recorded when nothing
    /// changed and no batch was sent).
    pub fn observe_batch(&self, report: &ApplyReport) {
        if report.messages > 0 {
            self.batch_messages.observe(report.messages as f64);
            self.batch_bytes.observe(report.bytes as f64);
        }
    }

    /// An apply that failed; `label` is `FirewallError::metric_label`.
    pub fn apply_failed(&self, label: &str) {
        self.apply_errors
            .get_or_create(&ErrorLabels {
                error: label.to_string(),
            })
            .inc();
    }

    /// One entry refused for the first time (`RefusalReason::metric_label`).
    pub fn entry_refused(&self, reason: &str) {
        self.entries_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn observe_shadowed(&self, n: usize) {
        self.node_service_shadowed.set(n as i64);
    }

    /// What the last plan says; `in_kernel`: its rules are what the kernel
    /// holds now (false in dry run, where the agent owns nothing).
    /// The forward-hook blockers found by the last check.
    pub fn observe_blockers(&self, blockers: &[Blocker]) {
        self.forward_blocked.clear();
        for b in blockers {
            self.forward_blocked
                .get_or_create(&BlockerLabels {
                    family: b.family_name().to_string(),
                    table: b.table.clone(),
                    chain: b.chain.clone(),
                })
                .set(1);
        }
    }

    pub fn observe_table(&self, table: &NatTable, in_kernel: bool) {
        let rules = &table.rules;
        let per_family = rules
            .counts()
            .into_iter()
            .flat_map(|(kind, [v4, v6])| [(kind, ("ipv4", v4)), (kind, ("ipv6", v6))]);
        for (kind, (family, n)) in per_family {
            let n = if in_kernel { n as i64 } else { 0 };
            self.rules_owned
                .get_or_create(&KindLabels {
                    family: family.to_string(),
                    kind: kind.to_string(),
                })
                .set(n);
        }
        self.conflicts.set(table.conflicts.len() as i64);
        let (mut whole, mut alone) = (0, 0);
        for r in &table.rejected {
            match &r.rejected {
                crate::plan::Rejected::Annotation(_) => whole += 1,
                crate::plan::Rejected::Entries { errors, .. } => alone += errors.len() as i64,
            }
        }
        self.invalid_annotations.set(whole);
        self.rejected_entries.set(alone);
        self.pending_entries.set(table.pending.len() as i64);
        for reason in crate::plan::RefusalReason::LABELS {
            let n = table
                .refused
                .iter()
                .filter(|r| r.reason.metric_label() == reason)
                .count();
            self.refused_entries
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .set(n as i64);
        }
        // Only on change: a scrape between clear and set would see no address.
        let mut shown = self.shown_address.lock().unwrap_or_else(|e| e.into_inner());
        if *shown != table.public_address {
            self.public_address.clear();
            for a in table.public_address.iter() {
                self.public_address
                    .get_or_create(&AddressLabels {
                        address: a.to_string(),
                        family: crate::model::Family::of(a).name().to_string(),
                    })
                    .set(1);
            }
            *shown = table.public_address;
        }
    }
}

/// Records the time since it was made into the reconcile histogram when
/// dropped (also on an early return).
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
