//! The reconcile loop itself, without root: the real `Reconciler` with the
//! in-memory flavor (`firewall::flavors::memory`) as its kernel, a reflector store fed
//! by the test as the pod watcher would feed it, a fixed public address and
//! events that only log. What it proves is the loop's logic: the first full
//! pod list gates the first apply, bursts coalesce, a failed apply keeps the
//! last good state and is retried with backoff, the resync re-reads and
//! repairs. The flavors themselves are proven against the kernel elsewhere.
//! Waits poll with deadlines; nothing asserts on timing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use podnat_controller::firewall::flavors::memory::{MemoryBackend, MemoryKernel};
use podnat_controller::firewall::Names;
use podnat_controller::kube::events::EventSink;
use podnat_controller::kube::store::PodStore;
use podnat_controller::kube::watch::{ChangeLog, FeedState, PodFeed};
use podnat_controller::plan::PlanConfig;
use podnat_controller::reconcile::{
    fixed_address, AgentStatus, BackendWorker, ReconcileConfig, Reconciler,
};
use tokio::sync::watch;

const KEY: &str = "bln.space/podnat";

fn pod(name: &str, ip: &str, ports: &[u16]) -> Pod {
    let entries: Vec<String> = ports
        .iter()
        .map(|p| format!(r#"{{"srcPort":{p},"dstPort":{p}}}"#))
        .collect();
    pod_with(name, ip, &entries.join(","))
}

/// A pod whose annotation lists `entries` (JSON objects, comma-separated).
fn pod_with(name: &str, ip: &str, entries: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name, "namespace": "mail", "uid": format!("uid-{name}"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": { KEY: format!(r#"{{"entries":[{entries}]}}"#) }
        },
        "spec": { "nodeName": "node1", "containers": [] },
        "status": { "phase": "Running", "podIP": ip,
                    "conditions": [{ "type": "Ready", "status": "True" }] }
    }))
    .unwrap()
}

/// The loop on a runtime of its own, the store and feed the test drives,
/// and the in-memory kernel.
struct Harness {
    rt: tokio::runtime::Runtime,
    writer: PodStore,
    /// The pods the watcher has handed over and not deleted (what a relist
    /// lists again).
    pods: BTreeMap<String, Pod>,
    feed: watch::Sender<FeedState>,
    changes: ChangeLog,
    kernel: Arc<Mutex<MemoryKernel>>,
    status: Arc<AgentStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    fn start(resync: Option<Duration>, debounce: Duration) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let writer = PodStore::new(KEY);
        let loop_store = writer.clone();
        let (feed_tx, feed_rx) = watch::channel(FeedState {
            reachable: true,
            ..FeedState::default()
        });
        let (backend, kernel) = MemoryBackend::new(Names::new("podnat"));
        let changes = ChangeLog::default();
        let log = changes.clone();
        let status = Arc::new(AgentStatus::new(Arc::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = ReconcileConfig {
            plan: PlanConfig {
                node_id: "node1".into(),
                restricted_ports: BTreeSet::from([22, 53, 6443]),
                families: Default::default(),
                local_access: false,
                source_ranges: true,
            },
            resync,
            dry_run: false,
            debounce,
            max_delay: Duration::from_secs(2),
            // The host's own sockets are not this in-memory node's.
            guard_node_ports: false,
        };
        let st = Arc::clone(&status);
        let task = rt.spawn(async move {
            let (_fixed, address) = fixed_address(podnat_controller::model::DualStack::v4(
                "203.0.113.7".parse().unwrap(),
            ));
            let worker = BackendWorker::spawn(Box::new(backend)).unwrap();
            let feed = PodFeed {
                store: loop_store,
                state: feed_rx,
                changes: log,
            };
            let reconciler = Reconciler::new(cfg, feed, address, worker, EventSink::log_only(), st);
            reconciler
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
        Harness {
            rt,
            writer,
            pods: BTreeMap::new(),
            feed: feed_tx,
            changes,
            kernel,
            status,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Pods into the store as the watcher puts them, then one revision bump
    /// each (what the watcher announces per event).
    fn upsert(&mut self, pods: &[Pod]) {
        for p in pods {
            let event = Event::Apply(p.clone());
            self.writer.apply_watcher_event(&event);
            self.pods
                .insert(p.metadata.name.clone().unwrap(), p.clone());
            self.changes.record(&event);
            self.feed.send_modify(|s| s.revision += 1);
        }
    }

    fn delete(&mut self, pods: &[Pod]) {
        for p in pods {
            let event = Event::Delete(p.clone());
            self.writer.apply_watcher_event(&event);
            self.pods.remove(p.metadata.name.as_deref().unwrap());
            self.changes.record(&event);
            self.feed.send_modify(|s| s.revision += 1);
        }
    }

    /// The watcher's first full list: what the store holds so far, relisted.
    fn list_done(&mut self) {
        let listed: Vec<Pod> = self.pods.values().cloned().collect();
        self.writer.apply_watcher_event(&Event::<Pod>::Init);
        for p in listed {
            self.writer.apply_watcher_event(&Event::InitApply(p));
        }
        self.writer.apply_watcher_event(&Event::<Pod>::InitDone);
        self.changes.record(&Event::<Pod>::InitDone);
        self.feed.send_modify(|s| {
            s.listed = true;
            s.revision += 1;
        });
    }

    fn kernel<T>(&self, f: impl FnOnce(&mut MemoryKernel) -> T) -> T {
        f(&mut self.kernel.lock().unwrap())
    }

    fn dnat_ports(&self) -> BTreeSet<u16> {
        self.kernel(|k| k.rules.dnat.iter().map(|m| m.key.public_port).collect())
    }

    fn wait(&self, what: &str, mut ok: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One series of the agent's /metrics, as Prometheus text has it.
    fn metric(&self, series: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(
            &mut text,
            &podnat_controller::status::registry(&self.status),
        )
        .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    /// Lets the loop run for a while (to show that nothing more happens).
    fn idle(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r = self.rt.block_on(t);
            if !std::thread::panicking() {
                r.unwrap();
            }
        }
    }
}

#[test]
fn the_first_full_list_gates_the_first_apply() {
    let mut h = Harness::start(None, Duration::from_millis(20));
    h.upsert(&[pod("a", "10.1.0.5", &[25])]);
    h.idle(Duration::from_millis(300));
    assert_eq!(h.kernel(|k| k.applies), 0, "nothing before the full list");
    assert!(!h.status.first_sync_applied());
    h.upsert(&[pod("b", "10.1.0.6", &[587])]);
    h.list_done();
    h.wait("the first sync", |h| h.status.first_sync_applied());
    assert_eq!(h.dnat_ports(), BTreeSet::from([25, 587]));
    assert_eq!(h.kernel(|k| (k.applies, k.batches)), (1, 1));
}

#[test]
fn a_burst_of_pod_changes_is_one_batch() {
    let mut h = Harness::start(None, Duration::from_millis(300));
    h.list_done();
    h.wait("the first sync", |h| h.status.first_sync_applied());
    let pods: Vec<Pod> = (0..20u16)
        .map(|i| pod(&format!("p{i}"), &format!("10.1.0.{}", 10 + i), &[1000 + i]))
        .collect();
    h.upsert(&pods);
    h.wait("all 20 mappings", |h| h.dnat_ports().len() == 20);
    h.idle(Duration::from_millis(500));
    let (applies, batches) = h.kernel(|k| (k.applies, k.batches));
    assert_eq!(batches, 1, "one batch for the burst ({applies} applies)");
    assert_eq!(h.metric("podnat_batch_messages_count"), 1.0);
}

#[test]
fn a_failed_apply_keeps_the_last_good_state_and_is_retried_with_backoff() {
    let mut h = Harness::start(None, Duration::from_millis(20));
    h.upsert(&[pod("a", "10.1.0.5", &[25])]);
    h.list_done();
    h.wait("the first sync", |h| h.dnat_ports() == BTreeSet::from([25]));
    h.kernel(|k| k.fail_next = 2);
    h.upsert(&[pod("a", "10.1.0.5", &[25, 587])]);
    h.wait("two failed applies", |h| h.kernel(|k| k.applies) >= 3);
    assert_eq!(
        h.dnat_ports(),
        BTreeSet::from([25]),
        "the kernel kept its rules"
    );
    assert!(h
        .status
        .last()
        .error
        .unwrap_or_default()
        .contains("injected"));
    h.wait("the retry that works", |h| {
        h.dnat_ports() == BTreeSet::from([25, 587])
    });
    assert_eq!(
        h.kernel(|k| k.applies),
        4,
        "first sync, two failures, one success"
    );
    // The kernel holds it before the loop has read the answer.
    h.wait("the error cleared by the success", |h| {
        h.status.last().error.is_none()
    });
    assert_eq!(
        h.metric(r#"podnat_apply_errors_total{error="refused"}"#),
        2.0
    );
}

#[test]
fn the_resync_reads_the_kernel_again_and_repairs_drift() {
    let mut h = Harness::start(Some(Duration::from_millis(400)), Duration::from_millis(20));
    h.upsert(&[pod("a", "10.1.0.5", &[25, 587])]);
    h.list_done();
    h.wait("the first sync", |h| h.dnat_ports().len() == 2);
    // Someone deletes a mapping behind the agent's back; no notification
    // (this kernel has none): only the resync can find it.
    h.kernel(|k| {
        k.rules.dnat.retain(|m| m.key.public_port != 25);
    });
    let forgets = h.kernel(|k| k.forgets);
    h.wait("the resync's repair", |h| h.dnat_ports().len() == 2);
    assert!(
        h.kernel(|k| k.forgets) > forgets,
        "the resync read the kernel again"
    );
}

#[test]
fn a_pod_event_applies_its_own_changes_and_nothing_of_the_rest() {
    let mut h = Harness::start(None, Duration::from_millis(20));
    let pods: Vec<Pod> = (0..50u16)
        .map(|i| pod(&format!("p{i}"), &format!("10.1.0.{}", 10 + i), &[1000 + i]))
        .collect();
    h.upsert(&pods);
    h.list_done();
    h.wait("the first sync", |h| h.dnat_ports().len() == 50);
    assert_eq!(h.kernel(|k| k.delta_applies), 0, "the first sync is whole");
    let reads = h.kernel(|k| k.reads);
    // One pod gains a port, another goes: each a change on top of the last.
    h.upsert(&[pod("p3", "10.1.0.13", &[1003, 2003])]);
    h.wait("p3's new port", |h| h.dnat_ports().contains(&2003));
    h.delete(&[pods[7].clone()]);
    h.wait("p7 gone", |h| !h.dnat_ports().contains(&1007));
    assert_eq!(h.dnat_ports().len(), 50);
    assert_eq!(
        h.kernel(|k| k.delta_applies),
        2,
        "two changes, no whole table"
    );
    assert_eq!(h.kernel(|k| k.reads), reads, "nothing read back");
    // The status follows (published after the kernel has the change): p3
    // shows both ports, p7 none.
    let p3 = podnat_controller::model::PodRef::new("mail", "p3");
    let p7 = podnat_controller::model::PodRef::new("mail", "p7");
    h.wait("the status of p7's deletion", |h| {
        h.status
            .last()
            .table
            .is_some_and(|t| t.mappings_of(&p7).count() == 0)
    });
    let last = h.status.last();
    let table = last.table.expect("a table");
    assert_eq!(table.mappings_of(&p3).count(), 2);
    assert_eq!(table.mappings_of(&p7).count(), 0);
    assert_eq!(table.rules.dnat.len(), 50);
    // An unchanged pod seen again (a resync of the watch) sends nothing.
    let batches = h.kernel(|k| k.batches);
    h.upsert(&[pods[1].clone()]);
    h.idle(Duration::from_millis(200));
    assert_eq!(h.kernel(|k| k.batches), batches);
}

#[test]
fn a_change_of_source_ranges_alone_is_a_change_of_its_allow_rules() {
    let mut h = Harness::start(None, Duration::from_millis(20));
    let ranged = |ranges: &str| {
        pod_with(
            "imap",
            "10.1.0.9",
            &format!(r#"{{"srcPort":993,"dstPort":993,"sourceRanges":[{ranges}]}}"#),
        )
    };
    let allowed = |h: &Harness| -> Vec<String> {
        h.kernel(|k| k.rules.allow.iter().map(|a| a.source.to_string()).collect())
    };
    h.upsert(&[
        ranged(r#""198.51.100.0/24""#),
        pod("web", "10.1.0.10", &[80]),
    ]);
    h.list_done();
    h.wait("the first sync", |h| h.dnat_ports().len() == 2);
    assert_eq!(allowed(&h), ["198.51.100.0/24"]);
    let dnat = h.kernel(|k| k.rules.dnat.clone());
    // The office moves: only the allow-list changes, as one change.
    h.upsert(&[ranged(r#""192.0.2.0/25","192.0.2.128/25""#)]);
    h.wait("the new range", |h| allowed(h) == ["192.0.2.0/24"]);
    assert_eq!(h.kernel(|k| k.rules.dnat.clone()), dnat);
    assert_eq!(
        h.kernel(|k| k.delta_applies),
        1,
        "one change, no whole table"
    );
    // The field goes: the key is open again (no allow rule left).
    h.upsert(&[pod("imap", "10.1.0.9", &[993])]);
    h.wait("no ranges", |h| allowed(h).is_empty());
    assert_eq!(h.kernel(|k| k.rules.dnat.clone()), dnat);
}

#[test]
fn a_relist_replans_the_whole_store() {
    let mut h = Harness::start(None, Duration::from_millis(20));
    h.upsert(&[pod("a", "10.1.0.5", &[25])]);
    h.list_done();
    h.wait("the first sync", |h| h.dnat_ports() == BTreeSet::from([25]));
    // The watch comes back after an outage and lists again: what changed
    // meanwhile (a new pod, a deleted one) arrives as one list.
    h.writer.apply_watcher_event(&Event::<Pod>::Init);
    h.writer
        .apply_watcher_event(&Event::InitApply(pod("b", "10.1.0.6", &[587])));
    h.writer.apply_watcher_event(&Event::<Pod>::InitDone);
    h.changes.record(&Event::<Pod>::InitDone);
    h.feed.send_modify(|s| s.revision += 1);
    h.wait("the relisted table", |h| {
        h.dnat_ports() == BTreeSet::from([587])
    });
    assert_eq!(h.kernel(|k| k.delta_applies), 0);
}
