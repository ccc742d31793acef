//! The firewall thread: the backend's netlink work blocks, so it runs on a
//! dedicated thread of its own, in the network namespace of the process
//! (where the rules belong), fed by the reconcile loop over a channel. After
//! each commit it flushes the UDP conntrack entries of moved mappings.

use tokio::sync::oneshot;

use super::monitor::Blocker;
use crate::firewall::wire::netlink::NetlinkError;
use crate::firewall::{flush_targets, stale_targets, ApplyReport, Backend, Changes, FirewallError};
use crate::model::RuleSet;

/// The thread could not start, or is gone.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the firewall thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the firewall thread is gone (it panicked); restart the agent")]
    Gone,
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

enum Job {
    /// `true`: read the kernel even if the remembered state looks valid.
    Apply(
        RuleSet,
        bool,
        oneshot::Sender<Result<ApplyReport, FirewallError>>,
    ),
    /// The changes on top of the last apply (`None` back: send the table).
    ApplyChanges(
        Changes,
        oneshot::Sender<Result<Option<ApplyReport>, FirewallError>>,
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
    pub fn spawn(mut backend: Box<dyn Backend>) -> Result<BackendWorker, WorkerError> {
        let name = backend.name();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("podnat-firewall".into())
            .spawn(move || {
                // Ends when the worker is dropped; a reply nobody waits for
                // any more is not an error.
                for job in rx {
                    match job {
                        // The pass gets its report as soon as the rules are
                        // committed; the conntrack flush of removed mappings
                        // (a dump of the host's whole connection table, ~10 ms)
                        // follows on this thread, before the next job.
                        Job::Apply(rules, fresh, reply) => {
                            if fresh {
                                backend.forget();
                            }
                            let result = backend.apply(&rules);
                            let stale = result.as_ref().map(stale_targets).unwrap_or_default();
                            let _ = reply.send(result);
                            flush_targets(&stale);
                        }
                        Job::ApplyChanges(changes, reply) => {
                            let result = backend.apply_changes(changes);
                            let stale = match &result {
                                Ok(Some(report)) => stale_targets(report),
                                _ => Default::default(),
                            };
                            let _ = reply.send(result);
                            flush_targets(&stale);
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
            .map_err(WorkerError::Spawn)?;
        Ok(BackendWorker { jobs: tx, name })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// One batch of the difference between the kernel and `rules`;
    /// `fresh`: against a new read of the kernel, not the remembered state.
    pub async fn apply(&self, rules: RuleSet, fresh: bool) -> Result<ApplyReport, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Apply(rules, fresh, tx))
            .map_err(|_| WorkerError::Gone)?;
        Ok(rx.await.map_err(|_| WorkerError::Gone)??)
    }

    /// One batch of `changes` on top of the last apply, if the backend can
    /// (see `Backend::apply_changes`); `None`: nothing sent, apply the table.
    pub async fn apply_changes(
        &self,
        changes: Changes,
    ) -> Result<Option<ApplyReport>, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::ApplyChanges(changes, tx))
            .map_err(|_| WorkerError::Gone)?;
        Ok(rx.await.map_err(|_| WorkerError::Gone)??)
    }

    /// Foreign forward-hook chains with policy drop (read only).
    pub async fn forward_blockers(&self) -> Result<Vec<Blocker>, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::ForwardBlockers(tx))
            .map_err(|_| WorkerError::Gone)?;
        Ok(rx.await.map_err(|_| WorkerError::Gone)??)
    }

    /// The changes `apply` would make, as text; touches nothing.
    pub async fn dry_run(&self, rules: RuleSet) -> Result<String, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::DryRun(rules, tx))
            .map_err(|_| WorkerError::Gone)?;
        Ok(rx.await.map_err(|_| WorkerError::Gone)??)
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
