//! What the agent last told Kubernetes about each pod, so that events go out
//! on change only — never again on every resync — and a pod that is gone is
//! still told about (NATRemoved) through the reference remembered for it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;

use super::events::{PodEvent, Reason};
use crate::model::PodRef;
use crate::plan::NatTable;

/// What was last published about one pod, so that events go out on change
/// only, never on every resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Published {
    applied: String,
    conflict: String,
    invalid: String,
    /// Each refused entry: its metric label and its message.
    refused: BTreeSet<(&'static str, String)>,
}

impl Published {
    fn is_empty(&self) -> bool {
        self.applied.is_empty()
            && self.conflict.is_empty()
            && self.invalid.is_empty()
            && self.refused.is_empty()
    }
}

/// Per-pod memory of published events.
#[derive(Debug, Default)]
pub struct EventLedger {
    pods: BTreeMap<PodRef, (Published, ObjectReference)>,
    /// Reasons of refusals that appeared since `take_refusals` (one per
    /// newly refused entry), for the refusal counter.
    refusals: Vec<&'static str>,
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
            add_mapping(&mut now.entry(m.owner.clone()).or_default().applied, m);
        }
        for c in &table.conflicts {
            add_conflict(&mut now.entry(c.loser.clone()).or_default().conflict, c);
        }
        for r in &table.rejected {
            now.entry(r.pod.clone()).or_default().invalid = invalid(r);
        }
        for r in &table.refused {
            now.entry(r.pod.clone())
                .or_default()
                .refused
                .insert(refused(r));
        }
        let mut pods: Vec<PodRef> = now.keys().cloned().collect();
        pods.extend(self.pods.keys().filter(|p| !now.contains_key(p)).cloned());
        self.compare(pods, |p| now.remove(p).unwrap_or_default(), reference)
    }

    /// Like `observe`, for the pods whose part of `table` may have changed
    /// (an incremental plan's `TableChange::pods`); the others are not
    /// looked at. `mappings_of` gives a pod's winning mappings in key order.
    pub fn observe_pods<'a, M>(
        &mut self,
        table: &NatTable,
        pods: impl IntoIterator<Item = &'a PodRef>,
        mappings_of: impl Fn(&PodRef) -> M,
        reference: impl Fn(&PodRef) -> Option<ObjectReference>,
    ) -> Vec<PodEvent>
    where
        M: IntoIterator<Item = &'a crate::model::Mapping>,
    {
        let published = |pod: &PodRef| {
            let mut p = Published::default();
            for m in mappings_of(pod) {
                add_mapping(&mut p.applied, m);
            }
            for c in table.conflicts.iter().filter(|c| &c.loser == pod) {
                add_conflict(&mut p.conflict, c);
            }
            if let Some(r) = table.rejected.iter().find(|r| &r.pod == pod) {
                p.invalid = invalid(r);
            }
            let at = table.refused.partition_point(|r| &r.pod < pod);
            for r in table.refused[at..].iter().take_while(|r| &r.pod == pod) {
                p.refused.insert(refused(r));
            }
            p
        };
        self.compare(pods.into_iter().cloned().collect(), published, reference)
    }

    /// The reasons of the refusals that appeared since the last call.
    pub fn take_refusals(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.refusals)
    }

    /// Events for `pods`, comparing what `now` says of each with what was
    /// published before.
    fn compare(
        &mut self,
        pods: Vec<PodRef>,
        mut now: impl FnMut(&PodRef) -> Published,
        reference: impl Fn(&PodRef) -> Option<ObjectReference>,
    ) -> Vec<PodEvent> {
        let mut out = Vec::new();
        for pod in pods {
            let old = self.pods.remove(&pod);
            let new = now(&pod);
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
            if new.refused != old.refused && !new.refused.is_empty() {
                let texts: Vec<&str> = new.refused.iter().map(|(_, t)| t.as_str()).collect();
                emit(
                    Reason::NatRefused,
                    format!("not published: {}", texts.join("; ")),
                );
                self.refusals.extend(
                    new.refused
                        .difference(&old.refused)
                        .map(|(label, _)| *label),
                );
            }
            if !new.is_empty() {
                self.pods.insert(pod, (new, regarding));
            }
        }
        out
    }
}

fn add_mapping(text: &mut String, m: &crate::model::Mapping) {
    use std::fmt::Write as _;
    if !text.is_empty() {
        text.push_str(", ");
    }
    let _ = write!(
        text,
        "{} → {}",
        m.key,
        crate::model::host_port(m.pod_ip, m.pod_port)
    );
}

fn add_conflict(text: &mut String, c: &crate::plan::Conflict) {
    use std::fmt::Write as _;
    if !text.is_empty() {
        text.push_str("; ");
    }
    let _ = write!(
        text,
        "{} is taken by {} (a Ready pod beats a not-ready one, then the newer pod wins)",
        c.ports(),
        c.winner
    );
}

fn refused(r: &crate::plan::Refusal) -> (&'static str, String) {
    (r.reason.metric_label(), r.to_string())
}

fn invalid(r: &crate::plan::Rejection) -> String {
    r.rejected.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::annotation;
    use crate::model::{Mapping, NatKey, Proto};
    use crate::plan::{Conflict, Rejection};

    fn mapping(owner: &PodRef, port: u16, pod_ip: [u8; 4]) -> Mapping {
        Mapping {
            key: NatKey {
                public_ip: Ipv4Addr::new(203, 0, 113, 7).into(),
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip: pod_ip.into(),
            pod_port: port,
            owner: owner.clone(),
            span: 0,
        }
    }

    fn reference_of(p: &PodRef, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.name.to_string()),
            namespace: Some(p.namespace.to_string()),
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
            rejected: crate::plan::Rejected::Annotation(
                annotation::parse("{", &Default::default(), Default::default()).unwrap_err(),
            ),
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
            span: 0,
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
}
