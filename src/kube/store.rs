//! The pod store: what the agent keeps of each pod on its node — the
//! planner's facts and what an event needs to name the pod — filled from the
//! watcher's events with kube's reflector semantics. It keeps no `Pod`
//! objects: even a slimmed one holds ~3.5 KB of empty spec and status
//! fields, and a thousand of them were the largest part of the agent's heap.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::watcher;

use crate::model::PodRef;
use crate::plan::PodFacts;

/// One pod as the agent knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodEntry {
    /// Read from the pod; `namespace_policy` stays at its default (the
    /// namespace watch decides it when the loop plans).
    pub facts: PodFacts,
    uid: Option<String>,
}

impl PodEntry {
    pub fn new(pod: &Pod, annotation_key: &str) -> PodEntry {
        let mut facts = super::pod::facts(pod, annotation_key);
        // Read once per event; the store keeps it for good.
        if let Some(a) = facts.annotation.as_mut() {
            a.shrink_to_fit();
        }
        PodEntry {
            facts,
            uid: pod.metadata.uid.clone(),
        }
    }

    pub fn pod(&self) -> &PodRef {
        &self.facts.pod
    }

    /// The pod as an event's `regarding` names it (what `Resource::object_ref`
    /// gives for the whole object).
    pub fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(self.facts.pod.name.to_string()),
            namespace: Some(self.facts.pod.namespace.to_string()),
            uid: self.uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The pods of this node by name. Cloning it gives another handle on the
/// same store: the watcher writes, the loop reads.
#[derive(Clone)]
pub struct PodStore {
    inner: Arc<RwLock<Inner>>,
    annotation_key: Arc<str>,
}

#[derive(Default)]
struct Inner {
    pods: HashMap<PodRef, Arc<PodEntry>>,
    /// A full list being received (between `Init` and `InitDone`): readers
    /// keep seeing the previous one until it is complete.
    listing: Option<HashMap<PodRef, Arc<PodEntry>>>,
}

impl PodStore {
    /// An empty store that keeps the `annotation_key` annotation of each pod.
    pub fn new(annotation_key: &str) -> PodStore {
        PodStore {
            inner: Arc::default(),
            annotation_key: annotation_key.into(),
        }
    }

    /// Applies one watcher event, as kube's reflector does.
    pub fn apply_watcher_event(&self, event: &watcher::Event<Pod>) {
        let mut inner = self.write();
        match event {
            watcher::Event::Apply(p) => {
                let e = PodEntry::new(p, &self.annotation_key);
                inner.pods.insert(e.pod().clone(), Arc::new(e));
            }
            watcher::Event::Delete(p) => {
                inner.pods.remove(&super::watch::pod_ref(p));
            }
            watcher::Event::Init => inner.listing = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                let e = PodEntry::new(p, &self.annotation_key);
                inner
                    .listing
                    .get_or_insert_with(HashMap::new)
                    .insert(e.pod().clone(), Arc::new(e));
            }
            watcher::Event::InitDone => {
                if let Some(mut list) = inner.listing.take() {
                    list.shrink_to_fit();
                    inner.pods = list;
                }
            }
        }
    }

    pub fn get(&self, pod: &PodRef) -> Option<Arc<PodEntry>> {
        self.read().pods.get(pod).cloned()
    }

    /// Every pod, in no particular order.
    pub fn state(&self) -> Vec<Arc<PodEntry>> {
        self.read().pods.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means a holder panicked; the map is whole.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    fn pod(name: &str, ip: &str, annotation: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "mail", "uid": format!("uid-{name}"),
                         "resourceVersion": "42",
                         "annotations": annotation.map(|a| serde_json::json!({
                             "bln.space/podnat": a, "other": "x"}))},
            "spec": {"nodeName": "node1", "containers": []},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    #[test]
    fn events_fill_the_store_as_the_reflector_would() {
        let store = PodStore::new("bln.space/podnat");
        let a = pod("a", "10.1.0.5", Some("{\"entries\":[]}"));
        store.apply_watcher_event(&watcher::Event::Apply(a.clone()));
        let got = store.get(&PodRef::new("mail", "a")).unwrap();
        assert_eq!(got.facts, crate::kube::pod::facts(&a, "bln.space/podnat"));
        // The event names the pod exactly as the whole object would.
        assert_eq!(got.reference(), a.object_ref(&()));

        // A relist replaces the store only once it is complete.
        store.apply_watcher_event(&watcher::Event::Init);
        store.apply_watcher_event(&watcher::Event::InitApply(pod("b", "10.1.0.6", None)));
        assert_eq!(store.len(), 1);
        assert!(store.get(&PodRef::new("mail", "a")).is_some());
        store.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(store.len(), 1);
        assert!(store.get(&PodRef::new("mail", "a")).is_none());
        let b = store.get(&PodRef::new("mail", "b")).unwrap();
        assert_eq!(b.facts.annotation, None);

        store.apply_watcher_event(&watcher::Event::Delete(pod("b", "10.1.0.6", None)));
        assert!(store.is_empty());
        assert!(store.state().is_empty());
    }
}
