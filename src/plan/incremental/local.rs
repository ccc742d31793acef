//! Hairpin sources kept up to date one pod event at a time: the addresses of
//! every pod on this node (annotated or not), one `LocalPod` per address, the
//! greater pod owning an address two pods share (as `plan()` decides).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::replan::swap_rule;
use super::IncrementalPlan;
use crate::firewall::Changes;
use crate::model::{LocalPod, PodRef};
use crate::plan::{local_ips, PodFacts};

#[derive(Debug, Default)]
pub(super) struct Locals {
    /// The addresses each pod is a source with.
    of_pod: HashMap<PodRef, Vec<IpAddr>>,
    /// The pods at each address.
    at: HashMap<IpAddr, BTreeSet<PodRef>>,
}

impl IncrementalPlan {
    /// `pod` is now a hairpin source with `ips` (none: it is not): the
    /// changes of the local list, which is updated in place.
    pub(super) fn set_local(&mut self, pod: &PodRef, ips: Vec<IpAddr>) -> Changes {
        let mut out = Changes::default();
        let old = self.locals.of_pod.remove(pod).unwrap_or_default();
        if old == ips {
            if !ips.is_empty() {
                self.locals.of_pod.insert(pod.clone(), ips);
            }
            return out;
        }
        for ip in &old {
            if let Some(set) = self.locals.at.get_mut(ip) {
                set.remove(pod);
                if set.is_empty() {
                    self.locals.at.remove(ip);
                }
            }
        }
        for ip in &ips {
            self.locals.at.entry(*ip).or_default().insert(pod.clone());
        }
        let touched: BTreeSet<IpAddr> = old.iter().chain(&ips).copied().collect();
        if !ips.is_empty() {
            self.locals.of_pod.insert(pod.clone(), ips);
        }
        for ip in touched {
            let want = self
                .locals
                .at
                .get(&ip)
                .and_then(|s| s.last())
                .map(|owner| LocalPod {
                    pod_ip: ip,
                    owner: owner.clone(),
                });
            let list = &mut self.table.rules.local;
            let at = list.binary_search_by(|l| l.pod_ip.cmp(&ip));
            swap_rule(list, at, want, &mut out.add.local, &mut out.del.local);
        }
        out.add.local.sort();
        out.del.local.sort();
        out
    }

    /// Every pod of a full list, from scratch.
    pub(super) fn reset_locals(&mut self, pods: &[PodFacts]) {
        self.locals = Locals::default();
        for p in pods {
            let ips = local_ips(p, &self.cfg);
            for ip in &ips {
                self.locals.at.entry(*ip).or_default().insert(p.pod.clone());
            }
            if !ips.is_empty() {
                self.locals.of_pod.insert(p.pod.clone(), ips);
            }
        }
        let mut list: Vec<LocalPod> = self
            .locals
            .at
            .iter()
            .filter_map(|(ip, set)| {
                Some(LocalPod {
                    pod_ip: *ip,
                    owner: set.last()?.clone(),
                })
            })
            .collect();
        list.sort();
        self.table.rules.local = list;
    }
}
