//! The pod watcher: a kube watcher on this node's pods (field selector
//! `spec.nodeName=<node>`), with backoff, feeding the pod store. The
//! reconcile loop reads the store and follows a [`FeedState`] channel that
//! says when the store changed, whether the first full list is in, and
//! whether the apiserver answers.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::store::PodStore;
use crate::model::PodRef;

/// The field selector for the pods of `node`. The selector matches the node
/// name exactly; the Go version's short-name matching (`node1` for
/// `node1.example.org`) cannot be expressed in a field selector, and a
/// cluster-wide watch on every node would cost the apiserver too much, so the
/// node id must be the node's exact name (the chart sets NODE_NAME from the
/// downward API, which is).
pub fn field_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}

/// What the reconcile loop needs to know about the watch besides the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedState {
    /// Bumped whenever the store's content changed.
    pub revision: u64,
    /// The first full pod list is in the store (the watcher's first
    /// `InitDone`). Until then the store is empty or partial and must not be
    /// taken for "no pods".
    pub listed: bool,
    /// The last request to the apiserver succeeded.
    pub reachable: bool,
    /// Watch errors since start.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The pod store and the channel that announces its changes.
pub struct PodFeed {
    pub store: PodStore,
    pub state: watch::Receiver<FeedState>,
    /// Which pods changed since the loop last looked.
    pub changes: ChangeLog,
}

/// What changed in the store since the loop last took it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Pods added, changed or deleted (look them up in the store).
    pub pods: BTreeSet<PodRef>,
    /// The whole store was listed again: look at every pod.
    pub relisted: bool,
}

/// The watcher's record of changed pods, shared with the loop, so that one
/// pod event costs one pod's re-planning, not the whole store's. Recorded
/// after the store applied the event and before the feed announces it.
#[derive(Clone, Debug, Default)]
pub struct ChangeLog(Arc<Mutex<Changed>>);

impl ChangeLog {
    pub fn record(&self, event: &watcher::Event<Pod>) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                c.pods.insert(pod_ref(p));
            }
            watcher::Event::InitDone => {
                c.relisted = true;
                c.pods.clear();
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// Everything recorded so far; the log is empty afterwards.
    pub fn take(&self) -> Changed {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The pod's name as the planner knows it (see `kube::pod::facts`).
pub fn pod_ref(p: &Pod) -> PodRef {
    PodRef::new(
        p.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// Settings of the pod watcher.
#[derive(Clone, Debug)]
pub struct PodWatchConfig {
    /// The node whose pods are watched.
    pub node: String,
    /// `node` is the node's exact name: watch with a field selector.
    /// Otherwise watch all pods; the planner keeps those whose node matches
    /// by short name (`node1` ~ `node1.example.org`), as the Go version did.
    pub exact: bool,
    /// The podnat annotation: the only one the store keeps.
    pub annotation_key: String,
}

/// While the apiserver does not answer, how often to ask whether it is back
/// (the watcher itself retries on its own backoff; this only keeps
/// [`FeedState::reachable`] honest when the resumed watch brings no event).
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Starts the watcher task. It runs until the returned handle is aborted or
/// every receiver of the feed is dropped.
pub fn spawn_pod_watcher(client: Client, cfg: PodWatchConfig) -> (PodFeed, JoinHandle<()>) {
    let selector = if cfg.exact {
        let s = field_selector(&cfg.node);
        tracing::info!(selector = %s, "watching this node's pods");
        s
    } else {
        tracing::warn!(
            node = %cfg.node,
            "only a short node id is known (-nodeid or HOSTNAME, no NODE_NAME): watching pods \
             cluster-wide and matching nodes by short name, as the Go version did; set NODE_NAME \
             from the downward API (the chart does) to watch only this node's pods"
        );
        String::new()
    };
    let api: Api<Pod> = Api::all(client.clone());
    let store = PodStore::new(&cfg.annotation_key);
    let writer = store.clone();
    let (tx, rx) = watch::channel(FeedState::default());
    let changes = ChangeLog::default();
    let log = changes.clone();
    let stream =
        watcher(api, watcher::Config::default().fields(&selector)).backoff(WatchBackoff::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let unreachable = !tx.borrow().reachable && tx.borrow().errors > 0;
            tokio::select! {
                () = tx.closed() => return,
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        writer.apply_watcher_event(&event);
                        log.record(&event);
                        on_event(&tx, &event);
                    }
                    Some(Err(e)) => on_error(&tx, &e),
                    None => {
                        tracing::error!("the pod watch stream ended");
                        return;
                    }
                },
                _ = probe.tick(), if unreachable => {
                    let answer = tokio::time::timeout(PROBE_EVERY, client.apiserver_version()).await;
                    if matches!(answer, Ok(Ok(_))) {
                        set_reachable(&tx, true);
                    }
                }
            }
        }
    });
    (
        PodFeed {
            store,
            state: rx,
            changes,
        },
        task,
    )
}

fn on_event(tx: &watch::Sender<FeedState>, event: &watcher::Event<Pod>) {
    tx.send_if_modified(|s| {
        let was_reachable = s.reachable;
        s.reachable = true;
        if !was_reachable && s.errors > 0 {
            tracing::info!("the apiserver answers again");
        }
        match event {
            // The store swaps in the new list only at InitDone, so nothing
            // changed for readers before it.
            watcher::Event::Init | watcher::Event::InitApply(_) => !was_reachable,
            watcher::Event::InitDone => {
                if !s.listed {
                    tracing::info!("first full pod list received");
                }
                s.listed = true;
                s.revision += 1;
                true
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                s.revision += 1;
                true
            }
        }
    });
}

fn on_error(tx: &watch::Sender<FeedState>, e: &watcher::Error) {
    tx.send_if_modified(|s| {
        let was_reachable = s.reachable || s.errors == 0;
        s.errors += 1;
        s.last_error = Some(e.to_string());
        if was_reachable {
            // Rules stay as they are; the watcher retries with backoff.
            tracing::warn!(error = %e, "pod watch failed; keeping the current rules and retrying");
        } else {
            tracing::debug!(error = %e, "pod watch still failing");
        }
        let changed = s.reachable;
        s.reachable = false;
        changed
    });
}

fn set_reachable(tx: &watch::Sender<FeedState>, reachable: bool) {
    tx.send_if_modified(|s| {
        let changed = s.reachable != reachable;
        if changed && reachable {
            tracing::info!("the apiserver answers again");
        }
        s.reachable = reachable;
        changed
    });
}

/// Exponential backoff for the watcher, 0.5 s doubling up to 10 s, with up to
/// 25 % jitter so that the agents of many nodes do not retry in step after an
/// apiserver outage. (kube's own default waits up to 30 s, which would hold
/// changes back that long after the apiserver is back.)
pub struct WatchBackoff {
    next: Duration,
    seed: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Default for WatchBackoff {
    fn default() -> Self {
        // Jitter needs no quality: the clock and the pid differ per node.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        WatchBackoff {
            next: BACKOFF_MIN,
            seed: u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let jitter = base.mul_f64((self.seed % 1000) as f64 / 4000.0);
        Some(base + jitter)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_names_the_node_exactly() {
        assert_eq!(field_selector("node1"), "spec.nodeName=node1");
        assert_eq!(
            field_selector("node1.example.org"),
            "spec.nodeName=node1.example.org"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let first = b.next().unwrap();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN.mul_f64(1.25));
        let late: Vec<Duration> = (0..10).filter_map(|_| b.next()).collect();
        assert!(late
            .iter()
            .all(|d| *d >= BACKOFF_MIN && *d <= BACKOFF_MAX.mul_f64(1.25)));
        assert!(late[9] >= BACKOFF_MAX);
        b.reset();
        assert!(b.next().unwrap() <= BACKOFF_MIN.mul_f64(1.25));
    }
}
