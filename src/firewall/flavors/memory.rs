//! An in-memory flavor: the "kernel" is a rule set behind a lock, shared with
//! the test that inspects it, dumped as sorted, comparable text (as
//! knftables' fake does). It lets the reconcile loop be tested without root
//! — bursts, the first-list gate, retries, resyncs — with failures injected
//! on demand. The kernel tests (tests/nftables.rs, tests/iptables.rs) prove
//! the real flavors; this one only stands in for them.

use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;

use crate::firewall::engine::monitor::{Blocker, Interest, Tracker};
use crate::firewall::wire::netlink::NetlinkError;
use crate::firewall::{
    canonical, view, Admission, ApplyReport, Backend, Changes, FirewallError, Names,
};
use crate::model::RuleSet;

/// What the in-memory kernel holds and what was asked of it.
#[derive(Debug, Default)]
pub struct MemoryKernel {
    pub rules: RuleSet,
    /// Applies asked for, batches that changed something, kernel reads
    /// (an apply after `forget`, or `read`), `forget` calls.
    pub applies: u64,
    pub batches: u64,
    pub reads: u64,
    pub forgets: u64,
    /// Of `applies`, those made from the changes alone (no whole table).
    pub delta_applies: u64,
    /// The next this many applies fail as a refused batch would.
    pub fail_next: u32,
}

impl MemoryKernel {
    /// One line per rule, sorted: comparable in a test.
    pub fn dump(&self) -> String {
        let mut lines: Vec<String> = self
            .rules
            .dnat
            .iter()
            .flat_map(view::nft_dnat_elements)
            .map(|e| format!("dnat {e}"))
            .chain(
                self.rules
                    .snat
                    .iter()
                    .map(|s| format!("snat {}", view::nft_snat_element(s))),
            )
            .chain(
                self.rules
                    .forward
                    .iter()
                    .flat_map(view::nft_forward_elements)
                    .map(|e| format!("forward {e}")),
            )
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// The backend over a shared `MemoryKernel`.
pub struct MemoryBackend {
    kernel: Arc<Mutex<MemoryKernel>>,
    names: Names,
    /// The last state "read", as the applier's cache would hold it.
    known: Option<RuleSet>,
}

impl MemoryBackend {
    /// A backend and the kernel it programs (keep the `Arc` to look inside).
    pub fn new(names: Names) -> (MemoryBackend, Arc<Mutex<MemoryKernel>>) {
        let kernel = Arc::new(Mutex::new(MemoryKernel::default()));
        (
            MemoryBackend {
                kernel: Arc::clone(&kernel),
                names,
                known: None,
            },
            kernel,
        )
    }

    fn kernel(&self) -> MutexGuard<'_, MemoryKernel> {
        self.kernel.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One "batch": the changes into the kernel, and their report.
fn commit(k: &mut MemoryKernel, changes: &Changes, cache_hit: bool) -> ApplyReport {
    let mut report = ApplyReport {
        cache_hit,
        ..ApplyReport::default()
    };
    if !changes.is_empty() {
        k.batches += 1;
        report.messages = changes.add.len() + changes.del.len();
        report.added_dnat = changes.add.dnat.clone();
        report.removed_dnat = changes.del.dnat.clone();
        report.admission = Admission::by_change(&k.rules, changes);
        changes.apply_to(&mut k.rules);
    }
    report
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn read(&mut self) -> Result<RuleSet, FirewallError> {
        let rules = {
            let mut k = self.kernel();
            k.reads += 1;
            k.rules.clone()
        };
        self.known = Some(rules.clone());
        Ok(rules)
    }

    fn apply(&mut self, desired: &RuleSet) -> Result<ApplyReport, FirewallError> {
        let desired = canonical(desired);
        let kernel = Arc::clone(&self.kernel);
        let mut k = kernel.lock().unwrap_or_else(|e| e.into_inner());
        k.applies += 1;
        if k.fail_next > 0 {
            k.fail_next -= 1;
            self.known = None;
            return Err(FirewallError::Netlink(NetlinkError::Refused {
                what: "the batch (injected failure)".into(),
                errno: Errno::EIO,
            }));
        }
        // Like the applier: trust what it knows, else read.
        let cache_hit = self.known.is_some();
        let current = match self.known.take() {
            Some(r) => r,
            None => {
                k.reads += 1;
                k.rules.clone()
            }
        };
        let report = commit(&mut k, &Changes::between(&current, &desired), cache_hit);
        self.known = Some(k.rules.clone());
        Ok(report)
    }

    fn apply_changes(&mut self, changes: Changes) -> Result<Option<ApplyReport>, FirewallError> {
        let changes = changes.into_canonical();
        let kernel = Arc::clone(&self.kernel);
        let mut k = kernel.lock().unwrap_or_else(|e| e.into_inner());
        // Like the applier: only on top of the last commit it knows.
        let Some(mut known) = self.known.take() else {
            return Ok(None);
        };
        if !changes.fits(&known) {
            return Ok(None);
        }
        k.applies += 1;
        k.delta_applies += 1;
        if k.fail_next > 0 {
            k.fail_next -= 1;
            return Err(FirewallError::Netlink(NetlinkError::Refused {
                what: "the batch (injected failure)".into(),
                errno: Errno::EIO,
            }));
        }
        let report = commit(&mut k, &changes, true);
        changes.apply_to(&mut known);
        self.known = Some(known);
        Ok(Some(report))
    }

    fn dry_run(&mut self, desired: &RuleSet, _assume_empty: bool) -> Result<String, FirewallError> {
        let ch = Changes::between(&self.kernel().rules, &canonical(desired));
        Ok(if ch.is_empty() {
            String::new()
        } else {
            format!("{} to add, {} to delete\n", ch.add.len(), ch.del.len())
        })
    }

    fn cleanup_dry_run(&mut self) -> Result<Vec<String>, FirewallError> {
        let n = self.kernel().rules.len();
        Ok(if n > 0 {
            vec![format!("memory: {n} rule(s)")]
        } else {
            Vec::new()
        })
    }

    fn cleanup(&mut self) -> Result<Vec<String>, FirewallError> {
        self.known = None;
        let mut k = self.kernel();
        let n = k.rules.len();
        k.rules = RuleSet::default();
        Ok(if n > 0 {
            vec![format!("memory: {n} rule(s)")]
        } else {
            Vec::new()
        })
    }

    fn view(&self, rules: &RuleSet) -> String {
        view::nft(&canonical(rules), &self.names, crate::model::Family::Ipv4)
    }

    fn forget(&mut self) {
        self.known = None;
        self.kernel().forgets += 1;
    }

    fn interest(&self) -> Interest {
        Interest { tables: Vec::new() }
    }

    fn attach_tracker(&mut self, _tracker: Arc<Tracker>) {}

    fn forward_blockers(&mut self) -> Result<Vec<Blocker>, FirewallError> {
        Ok(Vec::new())
    }
}
