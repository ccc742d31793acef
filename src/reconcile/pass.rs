//! One pass of the loop: plan what changed (or everything), apply it (the
//! changes alone when the kernel holds the last table), then tell the state
//! store, the events and the status.

use super::*;
use crate::plan::NodeServices;

impl Reconciler {
    #[tracing::instrument(level = "debug", skip_all, fields(trigger = cause.1, force, fresh))]
    pub(super) async fn reconcile(
        &mut self,
        force: bool,
        fresh: bool,
        cause: (&str, &str),
    ) -> Result<(), ReconcileError> {
        let (why, trigger) = cause;
        let _timer = self.status.metrics.reconcile_timer(trigger);
        let choice = self.address.borrow().clone();
        let mut changed = self.feed.changes.take();
        // A namespace whose policy changed: its pods on this node again.
        if let Some(ns) = &self.namespaces {
            let moved = ns.take_changes();
            if moved.all {
                changed.relisted = true;
            } else if !moved.names.is_empty() {
                for p in self.feed.store.state() {
                    if moved.names.contains(&*p.pod().namespace) {
                        changed.pods.insert(p.pod().clone());
                    }
                }
            }
        }
        let store_len = self.feed.store.len();
        self.status
            .counters
            .pods
            .store(store_len as u64, Ordering::Relaxed);

        // The node's own services, asked of the kernel before each plan
        // (a dump of its listeners: tens of microseconds, see benches).
        let services = self.read_node_services();

        // Plan: the whole store at the first sync, after a relist and at the
        // resync (the safety net); otherwise only the pods that changed.
        let replan = fresh || changed.relisted || self.inc.is_none();
        let change = if replan {
            let pods = self.feed.store.state();
            let facts: Vec<_> = pods
                .iter()
                .map(|p| facts_with(p, &self.namespaces))
                .collect();
            let inc = self
                .inc
                .get_or_insert_with(|| IncrementalPlan::new(self.cfg.plan.clone(), choice.chosen));
            if let Some(s) = services {
                inc.replace_node_services(s);
            }
            inc.reset_at(&facts, choice.chosen);
            None
        } else {
            let inc = self.inc.as_mut().expect("planned before");
            let mut ch = inc.set_public_address(choice.chosen);
            if let Some(s) = services {
                ch.absorb(inc.set_node_services(s));
            }
            for r in &changed.pods {
                let next = match self.feed.store.get(r) {
                    Some(p) => inc.upsert(facts_with(&p, &self.namespaces)),
                    None => inc.remove(r),
                };
                ch.absorb(next);
            }
            Some(ch)
        };
        let inc = self.inc.as_ref().expect("planned above");
        let table = inc.table();
        tracing::debug!(
            why,
            force,
            pods = store_len,
            changed = changed.pods.len(),
            replan,
            mappings = table.rules.dnat.len(),
            "reconcile"
        );
        if !table.pending.is_empty() {
            tracing::debug!(
                entries = table.pending.len(),
                "no public address known; auto-address entries wait"
            );
        }

        // Apply: the changes alone when the kernel holds the last table,
        // else (first sync, relist, resync, drift, after a failure) the
        // whole table, diffed against the kernel by the applier.
        let whole = force || change.is_none() || !self.synced;
        let report = if self.cfg.dry_run {
            match self.backend.dry_run(table.rules.clone()).await {
                Ok(text) => {
                    if self.last_dry_run.as_deref() != Some(&text) {
                        if text.is_empty() {
                            println!("# no changes: the kernel already holds this NAT table");
                        } else {
                            print!("{text}");
                        }
                        self.last_dry_run = Some(text);
                    }
                }
                Err(WorkerError::Firewall(e)) => {
                    self.apply_failed(&e);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            None
        } else {
            let result = match &change {
                Some(ch) if !whole && ch.rules.is_empty() => Ok(None),
                Some(ch) if !whole => match self.backend.apply_changes(ch.rules.clone()).await {
                    Ok(Some(report)) => Ok(Some(report)),
                    // The applier cannot (its state is gone, another
                    // writer came first): the whole table then.
                    Ok(None) => self
                        .backend
                        .apply(table.rules.clone(), false)
                        .await
                        .map(Some),
                    Err(e) => Err(e),
                },
                _ => self
                    .backend
                    .apply(table.rules.clone(), fresh)
                    .await
                    .map(Some),
            };
            match result {
                Ok(report) => {
                    self.synced = true;
                    self.failures = 0;
                    self.retry_at = None;
                    if let Some(report) = &report {
                        log_apply(report, table, why);
                        self.status.metrics.observe_batch(report);
                    }
                    // Network programming: the oldest pod change this batch
                    // carries, from when the watch announced it.
                    if let Some(since) = self.changed_since.take() {
                        if report.as_ref().is_some_and(|r| r.messages > 0) {
                            self.status
                                .metrics
                                .network_programming_duration
                                .observe(since.elapsed().as_secs_f64());
                        }
                    }
                    report
                }
                Err(WorkerError::Firewall(e)) => {
                    self.apply_failed(&e);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        };

        if !self.status.first_sync_applied.swap(true, Ordering::AcqRel) {
            tracing::info!(
                mappings = table.rules.dnat.len(),
                pods = store_len,
                "first sync applied"
            );
        }

        // The kernel holds this table now: hand it to the state store, whose
        // task writes it if it changed, without holding this loop up.
        if let Some(recorder) = self.state.as_ref().filter(|_| !self.cfg.dry_run) {
            match (&change, self.recorded) {
                (Some(ch), true) => recorder.record_changes(&ch.rules.add.dnat, &ch.rules.del.dnat),
                _ => recorder.record(&table.rules.dnat),
            }
            self.recorded = true;
        }

        // Events only once the kernel holds what they describe: about the
        // pods whose part changed, or every pod after a whole re-plan.
        let store = &self.feed.store;
        let reference = |p: &PodRef| store.get(p).map(|p| p.reference());
        let notes = match (&change, self.shown) {
            (Some(ch), true) => {
                self.ledger
                    .observe_pods(table, &ch.pods, |p| inc.mappings_of(p), reference)
            }
            _ => self.ledger.observe(table, reference),
        };
        for ev in notes {
            self.events.publish(ev);
        }
        for reason in self.ledger.take_refusals() {
            self.status.metrics.entry_refused(reason);
        }

        self.status.metrics.observe_table(table, !self.cfg.dry_run);
        let mut last = lock(&self.status.last);
        if report.is_some() {
            last.report = report;
        }
        last.error = None;
        // The status keeps a copy of the table, brought up to date by the
        // change alone when it holds the one before.
        match (&change, last.table.as_mut()) {
            (Some(ch), Some(shown)) if self.shown => follow(shown, table, ch),
            _ => last.table = Some(table.clone()),
        }
        self.shown = true;
        last.address = Some(choice);
        last.at = Some(SystemTime::now());
        drop(last);
        self.status
            .counters
            .reconciled
            .fetch_add(1, Ordering::Release);
        self.status.beat();
        if !self.cfg.dry_run {
            self.report_shadowed();
        }
        Ok(())
    }
}

impl Reconciler {
    /// The node's sockets, when the guard is on and the kernel answers;
    /// otherwise the plan keeps the ones it has (a failed read never blocks
    /// NAT, and is warned about once).
    fn read_node_services(&mut self) -> Option<NodeServices> {
        if !self.cfg.guard_node_ports {
            return None;
        }
        match crate::net::sockets::node_services(self.cfg.plan.families) {
            Ok(s) => {
                if std::mem::take(&mut self.sockets_failed) {
                    tracing::info!("the node's sockets can be read again");
                }
                Some(s)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.sockets_failed, true) {
                    tracing::warn!(error = %e, "cannot read the node's own sockets; the guard keeps what it knew");
                }
                None
            }
        }
    }

    /// Says once, per mapping, that a node service started on a key the
    /// agent already held: log, event on the owner, gauge. The mapping
    /// stays (never flipped silently).
    fn report_shadowed(&mut self) {
        let Some(inc) = self.inc.as_ref() else {
            return;
        };
        let table = inc.table();
        let kept = inc.node_services().kept();
        if *kept == self.shadowed {
            return;
        }
        for key in kept.difference(&self.shadowed) {
            let Ok(i) = table.rules.dnat.binary_search_by(|m| m.key.cmp(key)) else {
                continue;
            };
            let m = &table.rules.dnat[i];
            let socket = inc
                .node_services()
                .serving(key)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let note = format!(
                "a node service ({socket}) started on {}:{}/{} after this mapping; the mapping stays and shadows it from outside (delete the pod or stop the service)",
                key.public_ip, key.public_port, key.proto
            );
            tracing::warn!(pod = %m.owner, "{note}");
            if let Some(p) = self.feed.store.get(&m.owner) {
                self.events.publish(events::PodEvent {
                    regarding: p.reference(),
                    reason: events::Reason::NodeServiceShadowed,
                    note,
                });
            }
        }
        self.shadowed = kept.clone();
        self.status.metrics.observe_shadowed(self.shadowed.len());
    }
}

fn log_apply(report: &ApplyReport, table: &NatTable, why: &str) {
    if report.messages == 0 {
        tracing::debug!(why, "kernel already up to date");
        return;
    }
    tracing::info!(
        why,
        added = report.added_dnat.len(),
        removed = report.removed_dnat.len(),
        mappings = table.rules.dnat.len(),
        messages = report.messages,
        bytes = report.bytes,
        retries = report.retries,
        rebuilt = report.rebuilt,
        "applied one batch"
    );
}
