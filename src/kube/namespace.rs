//! The namespace watch: each namespace's labels (for `-namespaceselector`)
//! and the admin's ports annotation (`<annotationkey>-ports`), turned into
//! the `NamespacePolicy` the planner applies to that namespace's pods. A
//! metadata-only watch of every namespace; a change of policy names the
//! namespace so that the loop re-plans its pods alone (O(change)).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::watch::WatchBackoff;
use crate::plan::admission::PortAllotment;
use crate::plan::selector::NamespaceSelector;
use crate::plan::NamespacePolicy;

/// How namespace metadata becomes a policy (from the flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceRules {
    pub selector: NamespaceSelector,
    /// `<annotationkey>-ports`.
    pub ports_key: String,
}

impl NamespaceRules {
    pub fn new(selector: NamespaceSelector, annotation_key: &str) -> NamespaceRules {
        NamespaceRules {
            selector,
            ports_key: format!("{annotation_key}-ports"),
        }
    }

    /// The policy of a namespace with these labels and annotations. A
    /// malformed ports annotation makes the namespace publish nothing: an
    /// admin who meant to limit it did not mean to open it.
    pub fn policy(
        &self,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> NamespacePolicy {
        if !self.selector.matches(labels) {
            return NamespacePolicy::NotSelected;
        }
        match annotations.get(&self.ports_key) {
            None => NamespacePolicy::Open,
            Some(text) => match PortAllotment::parse(text) {
                Ok(a) => NamespacePolicy::Ports(a),
                Err(e) => NamespacePolicy::Invalid(format!("{}: {e}", self.ports_key)),
            },
        }
    }
}

/// What the loop needs to know about the namespace watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceState {
    /// Bumped whenever a namespace's policy changed.
    pub revision: u64,
    /// The full list is in.
    pub listed: bool,
    /// The apiserver forbids the agent to list namespaces (an old
    /// ClusterRole), kept until the list is in.
    pub forbidden: Option<String>,
}

impl NamespaceState {
    /// The first sync may go ahead: the list is in, or the apiserver
    /// forbids it (an agent without the namespaces permission must not hold
    /// NAT back; see `NamespaceFeed::policy` for what it decides then). A
    /// transient failure (the apiserver not answering yet) is waited out, as
    /// for the pods: deciding without the list would withdraw and restore
    /// working NAT.
    pub fn settled(&self) -> bool {
        self.listed || self.forbidden.is_some()
    }
}

/// The apiserver's 403 for the namespace list or watch.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

#[derive(Debug, Default)]
struct Policies {
    by_name: HashMap<String, NamespacePolicy>,
    /// Namespaces whose policy changed since the loop last took them.
    changed: BTreeSet<String>,
    /// Every namespace may have changed (the list came in after errors).
    all_changed: bool,
}

/// The policies, shared by the watch task (writer) and the loop (reader).
#[derive(Clone, Debug)]
pub struct NamespaceFeed {
    rules: NamespaceRules,
    policies: Arc<Mutex<Policies>>,
    pub state: watch::Receiver<NamespaceState>,
}

/// Namespaces the loop must look at again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceChanges {
    pub names: BTreeSet<String>,
    pub all: bool,
}

impl NamespaceFeed {
    /// The policy of namespace `ns`. Before the list is in (the watch
    /// failed): with a selector, nothing can be decided and the namespace
    /// publishes nothing; without one, everything is open as before.
    pub fn policy(&self, ns: &str) -> NamespacePolicy {
        let known = lock(&self.policies).by_name.get(ns).cloned();
        match known {
            Some(p) => p,
            None if self.state.borrow().listed => {
                // A pod in a namespace the list does not know (a race with
                // its creation): as if it had no labels.
                self.rules.policy(&BTreeMap::new(), &BTreeMap::new())
            }
            None if self.rules.selector.selects_all() => NamespacePolicy::Open,
            None => {
                NamespacePolicy::Invalid(format!(
                "the agent cannot read namespaces ({}), so -namespaceselector cannot be checked",
                self.state.borrow().forbidden.as_deref().unwrap_or("not listed yet")
            ))
            }
        }
    }

    /// The namespaces whose policy changed since the last call.
    pub fn take_changes(&self) -> NamespaceChanges {
        let mut p = lock(&self.policies);
        NamespaceChanges {
            names: std::mem::take(&mut p.changed),
            all: std::mem::take(&mut p.all_changed),
        }
    }
}

fn lock(p: &Mutex<Policies>) -> std::sync::MutexGuard<'_, Policies> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn policy_of(rules: &NamespaceRules, ns: &PartialObjectMeta<Namespace>) -> NamespacePolicy {
    let empty = BTreeMap::new();
    rules.policy(
        ns.metadata.labels.as_ref().unwrap_or(&empty),
        ns.metadata.annotations.as_ref().unwrap_or(&empty),
    )
}

/// Starts the namespace watch. It runs until the handle is aborted or every
/// receiver of the feed is dropped.
pub fn spawn_namespace_watcher(
    client: Client,
    rules: NamespaceRules,
) -> (NamespaceFeed, JoinHandle<()>) {
    // Metadata only: labels and annotations are all the agent reads.
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let (tx, rx) = watch::channel(NamespaceState::default());
    let policies = Arc::new(Mutex::new(Policies::default()));
    let feed = NamespaceFeed {
        rules: rules.clone(),
        policies: Arc::clone(&policies),
        state: rx,
    };
    let stream = watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // The list being read (between Init and InitDone).
        let mut listing: HashMap<String, NamespacePolicy> = HashMap::new();
        loop {
            let item = tokio::select! {
                () = tx.closed() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => on_event(&rules, &policies, &tx, &mut listing, event),
                Some(Err(e)) if forbidden(&e) => {
                    tx.send_if_modified(|s| {
                        let first = s.forbidden.is_none();
                        if first {
                            tracing::error!(error = %e, "the apiserver forbids the agent to list namespaces: the ClusterRole needs namespaces get/list/watch (the chart grants it); namespace policies are not applied until then");
                        }
                        s.forbidden = Some(e.to_string());
                        first && !s.listed
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "namespace watch failed; retrying"),
                None => {
                    tracing::error!("the namespace watch stream ended");
                    return;
                }
            }
        }
    });
    (feed, task)
}

fn on_event(
    rules: &NamespaceRules,
    policies: &Mutex<Policies>,
    tx: &watch::Sender<NamespaceState>,
    listing: &mut HashMap<String, NamespacePolicy>,
    event: watcher::Event<PartialObjectMeta<Namespace>>,
) {
    let name = |ns: &PartialObjectMeta<Namespace>| ns.metadata.name.clone().unwrap_or_default();
    let mut p = lock(policies);
    let changed = match event {
        watcher::Event::Init => {
            listing.clear();
            false
        }
        watcher::Event::InitApply(ns) => {
            listing.insert(name(&ns), policy_of(rules, &ns));
            false
        }
        watcher::Event::InitDone => {
            let fresh = std::mem::take(listing);
            let mut changed: BTreeSet<String> = BTreeSet::new();
            for (n, pol) in &fresh {
                if p.by_name.get(n) != Some(pol) {
                    changed.insert(n.clone());
                }
            }
            changed.extend(
                p.by_name
                    .keys()
                    .filter(|n| !fresh.contains_key(*n))
                    .cloned(),
            );
            p.by_name = fresh;
            // The first list after a failed start: what was decided without
            // it may differ for any namespace.
            let after_errors = !tx.borrow().listed && tx.borrow().forbidden.is_some();
            p.all_changed |= after_errors;
            p.changed.extend(changed);
            true
        }
        watcher::Event::Apply(ns) => {
            let (n, pol) = (name(&ns), policy_of(rules, &ns));
            if p.by_name.get(&n) == Some(&pol) {
                false
            } else {
                tracing::info!(namespace = %n, policy = ?pol, "namespace policy changed");
                p.by_name.insert(n.clone(), pol);
                p.changed.insert(n);
                true
            }
        }
        watcher::Event::Delete(ns) => {
            let n = name(&ns);
            p.by_name.remove(&n).is_some() && p.changed.insert(n)
        }
    };
    drop(p);
    if changed {
        tx.send_modify(|s| {
            if !s.listed {
                tracing::info!("namespace list received");
            }
            s.listed = true;
            s.forbidden = None;
            s.revision += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_and_the_ports_annotation_make_the_policy() {
        let rules = NamespaceRules::new(
            NamespaceSelector::parse("podnat=allowed").unwrap(),
            "bln.space/podnat",
        );
        let yes = map(&[("podnat", "allowed")]);
        assert_eq!(
            rules.policy(&map(&[]), &map(&[])),
            NamespacePolicy::NotSelected
        );
        assert_eq!(rules.policy(&yes, &map(&[])), NamespacePolicy::Open);
        assert_eq!(
            rules.policy(&yes, &map(&[("bln.space/podnat-ports", "25,587")])),
            NamespacePolicy::Ports(PortAllotment::parse("25,587").unwrap())
        );
        let NamespacePolicy::Invalid(e) =
            rules.policy(&yes, &map(&[("bln.space/podnat-ports", "25,smtp")]))
        else {
            panic!("a malformed annotation publishes nothing")
        };
        assert!(e.starts_with("bln.space/podnat-ports: \"smtp\""), "{e}");
        // No selector: every namespace is selected.
        let open = NamespaceRules::new(NamespaceSelector::default(), "bln.space/podnat");
        assert_eq!(open.policy(&map(&[]), &map(&[])), NamespacePolicy::Open);
    }
}
