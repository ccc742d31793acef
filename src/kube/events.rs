//! Kubernetes Events (events.k8s.io) on pods: what the agent did for them.
//! Published by a task of their own through a bounded queue, so a slow or
//! absent apiserver never holds NAT back; a failure is logged and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Why an event is published; the `reason` field users filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Normal: the pod's mappings are in the kernel (the note lists them).
    NatApplied,
    /// Warning: another pod won a public port this pod claims.
    NatConflict,
    /// Warning: the annotation was rejected (the pod gets no NAT), or
    /// entries of it (the others are published).
    InvalidAnnotation,
    /// Normal: the pod's mappings were removed.
    NatRemoved,
    /// Warning: entries the namespace may not publish, or on a port the
    /// node itself serves, are not published.
    NatRefused,
    /// Warning: a node service started on a port this pod's mapping holds.
    NodeServiceShadowed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NatApplied => "NATApplied",
            Reason::NatConflict => "NATConflict",
            Reason::InvalidAnnotation => "InvalidAnnotation",
            Reason::NatRemoved => "NATRemoved",
            Reason::NatRefused => "NATRefused",
            Reason::NodeServiceShadowed => "NodeServiceShadowed",
        }
    }

    pub fn event_type(self) -> EventType {
        match self {
            Reason::NatApplied | Reason::NatRemoved => EventType::Normal,
            Reason::NatConflict
            | Reason::InvalidAnnotation
            | Reason::NatRefused
            | Reason::NodeServiceShadowed => EventType::Warning,
        }
    }

    /// The events.k8s.io `action` (what the agent did when it noticed).
    fn action(self) -> &'static str {
        match self {
            Reason::NatApplied | Reason::NatConflict => "ProgramNAT",
            Reason::InvalidAnnotation => "ParseAnnotation",
            Reason::NatRefused | Reason::NodeServiceShadowed => "AdmitNAT",
            Reason::NatRemoved => "RemoveNAT",
        }
    }
}

/// One event about one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodEvent {
    pub regarding: ObjectReference,
    pub reason: Reason,
    pub note: String,
}

/// Counters of the publisher, shared with the agent's status.
#[derive(Debug, Default)]
pub struct EventStats {
    pub published: AtomicU64,
    pub failed: AtomicU64,
    /// Not sent because the queue was full (the apiserver is slow or away).
    pub dropped: AtomicU64,
}

/// Hands events to the publishing task. Cloneable; never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<PodEvent>>,
    stats: Arc<EventStats>,
}

/// Events waiting for the apiserver; beyond this they are dropped (and
/// counted): they describe the state at a moment, and a later change sends
/// its own.
const QUEUE: usize = 1024;
/// One publish may take this long before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// The API limits a note to 1 kB.
pub const MAX_NOTE: usize = 1024;

impl EventSink {
    /// Starts the publishing task. `instance` identifies this agent in the
    /// events' `reportingInstance` (the node name).
    pub fn spawn(client: Client, instance: String) -> (EventSink, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<PodEvent>(QUEUE);
        let stats = Arc::new(EventStats::default());
        let task_stats = stats.clone();
        let reporter = Reporter {
            controller: "podnat-controller".into(),
            instance: Some(instance),
        };
        let task = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                // A recorder per event: kube's recorder folds events with the
                // same reason on the same pod into one series and keeps the
                // first note, but a changed mapping must show its new note.
                // This agent publishes only on change, so nothing is lost.
                let recorder = Recorder::new(client.clone(), reporter.clone());
                let event = Event {
                    type_: ev.reason.event_type(),
                    reason: ev.reason.as_str().into(),
                    note: Some(truncate_note(&ev.note)),
                    action: ev.reason.action().into(),
                    secondary: None,
                };
                let pod = format!(
                    "{}:{}",
                    ev.regarding.namespace.as_deref().unwrap_or(""),
                    ev.regarding.name.as_deref().unwrap_or("")
                );
                match tokio::time::timeout(PUBLISH_TIMEOUT, recorder.publish(&event, &ev.regarding))
                    .await
                {
                    Ok(Ok(())) => {
                        task_stats.published.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(pod = %pod, reason = ev.reason.as_str(), "event published");
                    }
                    Ok(Err(e)) => {
                        task_stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(pod = %pod, reason = ev.reason.as_str(), error = %e, "cannot publish event");
                    }
                    Err(_) => {
                        task_stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(pod = %pod, reason = ev.reason.as_str(), "publishing an event timed out");
                    }
                }
            }
        });
        (
            EventSink {
                tx: Some(tx),
                stats,
            },
            task,
        )
    }

    /// A sink that only logs what it would publish (dry run: touch nothing).
    pub fn log_only() -> EventSink {
        EventSink {
            tx: None,
            stats: Arc::default(),
        }
    }

    /// Queues an event; drops it (counted, logged) when the queue is full.
    pub fn publish(&self, ev: PodEvent) {
        let level_warning = ev.reason.event_type() == EventType::Warning;
        let pod = format!(
            "{}:{}",
            ev.regarding.namespace.as_deref().unwrap_or(""),
            ev.regarding.name.as_deref().unwrap_or("")
        );
        if level_warning {
            tracing::warn!(pod = %pod, reason = ev.reason.as_str(), "{}", ev.note);
        } else {
            tracing::info!(pod = %pod, reason = ev.reason.as_str(), "{}", ev.note);
        }
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send(ev).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pod = %pod, "event queue full; event dropped");
        }
    }

    pub fn stats(&self) -> Arc<EventStats> {
        self.stats.clone()
    }
}

/// Cuts a note to the API's limit at a character boundary, marking the cut.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    const MARK: &str = " …";
    let mut cut = MAX_NOTE - MARK.len();
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{MARK}", &note[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_types() {
        assert_eq!(Reason::NatApplied.as_str(), "NATApplied");
        assert_eq!(Reason::NatConflict.event_type(), EventType::Warning);
        assert_eq!(Reason::InvalidAnnotation.event_type(), EventType::Warning);
        assert_eq!(Reason::NatRemoved.event_type(), EventType::Normal);
    }

    #[test]
    fn long_notes_are_cut_to_the_api_limit() {
        let short = "203.0.113.7:25/tcp → 10.1.0.5:25";
        assert_eq!(truncate_note(short), short);
        let long = "→".repeat(1000);
        let cut = truncate_note(&long);
        assert!(cut.len() <= MAX_NOTE, "{}", cut.len());
        assert!(cut.ends_with(" …"));
    }
}
