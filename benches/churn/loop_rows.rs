//! The loop rows of `benches/churn`: the same work as the apply rows, driven
//! through the real reconcile loop (`Reconciler`, the firewall thread, the
//! incremental planner, events to the log, status and metrics) with an
//! in-process pod store fed as the watcher feeds it — no apiserver. Timed
//! from the store's change to the loop's end of that reconcile (the kernel
//! holds the batch then); debounce 0, so the rows show what the loop costs,
//! not how long it waits for a burst to end (benches/latency does that).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use podnat_controller::config::JumpPositions;
use podnat_controller::firewall::flavors::iptables::IptablesBackend;
use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::{Backend, Names};
use podnat_controller::kube::events::EventSink;
use podnat_controller::kube::store::PodStore;
use podnat_controller::kube::watch::{ChangeLog, FeedState, PodFeed};
use podnat_controller::plan::PlanConfig;
use podnat_controller::reconcile::{
    fixed_address, AgentStatus, BackendWorker, ReconcileConfig, Reconciler,
};
use tokio::sync::watch;

use crate::netns::Netns;
use crate::{median, pod_ip, settle, PUBLIC, REPS};

const KEY: &str = "bln.space/podnat";

/// Pod `i` of the bench table: one port, 10000 + i → 80.
fn pod(i: u32) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("p-{i}"), "namespace": "bench", "uid": format!("uid-{i}"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": { KEY: format!(r#"{{"entries":[{{"srcPort":{},"dstPort":80}}]}}"#, 10000 + i) }
        },
        "spec": { "nodeName": "node1", "containers": [] },
        "status": { "phase": "Running", "podIP": pod_ip(i).to_string(),
                    "conditions": [{ "type": "Ready", "status": "True" }] }
    }))
    .expect("a pod")
}

/// The loop on a runtime of its own; the test side feeds the store.
struct Loop {
    rt: Option<tokio::runtime::Runtime>,
    writer: PodStore,
    feed: watch::Sender<FeedState>,
    changes: ChangeLog,
    status: Arc<AgentStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Loop {
    fn start(backend: Box<dyn Backend>) -> Loop {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let writer = PodStore::new(KEY);
        let store = writer.clone();
        let (feed_tx, feed_rx) = watch::channel(FeedState {
            reachable: true,
            ..FeedState::default()
        });
        let changes = ChangeLog::default();
        let status = Arc::new(AgentStatus::new(Arc::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = ReconcileConfig {
            plan: PlanConfig {
                node_id: "node1".into(),
                restricted_ports: BTreeSet::new(),
                families: Default::default(),
                local_access: false,
                source_ranges: true,
            },
            resync: None,
            dry_run: false,
            debounce: Duration::ZERO,
            max_delay: Duration::ZERO,
            // As the agent runs: the node's sockets read before each plan.
            guard_node_ports: true,
        };
        let (st, log) = (Arc::clone(&status), changes.clone());
        rt.spawn(async move {
            let (_fixed, address) = fixed_address(podnat_controller::model::DualStack::v4(PUBLIC));
            let worker = BackendWorker::spawn(backend).unwrap();
            let feed = PodFeed {
                store,
                state: feed_rx,
                changes: log,
            };
            Reconciler::new(cfg, feed, address, worker, EventSink::log_only(), st)
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
        Loop {
            rt: Some(rt),
            writer,
            feed: feed_tx,
            changes,
            status,
            stop: Some(stop_tx),
        }
    }

    fn reconciled(&self) -> u64 {
        self.status.counters.reconciled.load(Ordering::Acquire)
    }

    /// Waits (spinning, yielding the core) for the reconcile after `seen`.
    fn wait_after(&self, seen: u64) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.reconciled() <= seen {
            assert!(Instant::now() < deadline, "the loop did not reconcile");
            std::thread::yield_now();
        }
        Instant::now()
    }

    /// One watch event as the watcher hands it over: store, log, revision.
    fn event(&mut self, e: Event<Pod>) {
        self.writer.apply_watcher_event(&e);
        self.changes.record(&e);
        if matches!(e, Event::Apply(_) | Event::Delete(_) | Event::InitDone) {
            self.feed.send_modify(|s| {
                s.listed |= matches!(e, Event::InitDone);
                s.revision += 1;
            });
        }
    }

    /// The first full list of `pods`; returns the time to the first sync.
    fn list(&mut self, pods: Vec<Pod>) -> Duration {
        let seen = self.reconciled();
        let t = Instant::now();
        self.event(Event::Init);
        for p in pods {
            self.event(Event::InitApply(p));
        }
        self.event(Event::InitDone);
        self.wait_after(seen) - t
    }

    fn timed(&mut self, e: Event<Pod>) -> Duration {
        let seen = self.reconciled();
        let t = Instant::now();
        self.event(e);
        self.wait_after(seen) - t
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Install n, add 1, delete 1 through the loop, for one backend; medians.
fn rows(make: impl Fn() -> Box<dyn Backend>, n: u32) -> [Duration; 3] {
    let (mut install, mut add, mut del) = (vec![], vec![], vec![]);
    let mut last_add = None;
    for _ in 0..REPS {
        let mut be = make();
        be.cleanup().unwrap();
        let mut l = Loop::start(be);
        settle();
        install.push(l.list((0..n).map(pod).collect()));
        // Warm-up pair, then the measured ones.
        l.timed(Event::Apply(pod(n)));
        l.timed(Event::Delete(pod(n)));
        for _ in 0..REPS {
            settle();
            add.push(l.timed(Event::Apply(pod(n))));
            last_add = l.status.last().report;
            settle();
            del.push(l.timed(Event::Delete(pod(n))));
        }
    }
    // What the last add sent: one batch of its own rules, from the cache.
    if let Some(r) = last_add {
        eprintln!(
            "loop add 1 at {n}: {} messages, {} bytes, cache hit {}, retries {}",
            r.messages, r.bytes, r.cache_hit, r.retries
        );
    }
    [median(install), median(add), median(del)]
}

/// Loop rows of both flavors at size n, each in fresh namespaces:
/// `[(nftables, iptables); 3]` for install, add 1, delete 1.
pub fn loop_rows(n: u32) -> [(Duration, Duration); 3] {
    let nft = Netns::new("bl")
        .run(move || rows(|| Box::new(NftablesBackend::new(Names::new("podnat"))), n));
    let ipt = Netns::new("bk").run(move || {
        rows(
            || {
                Box::new(IptablesBackend::new(
                    Names::new("podnat"),
                    JumpPositions::default(),
                ))
            },
            n,
        )
    });
    [(nft[0], ipt[0]), (nft[1], ipt[1]), (nft[2], ipt[2])]
}
