//! The firewall: the planned rule set → kernel (one nf_tables netlink batch
//! per change) and back. This module is the vocabulary the rest of the crate
//! speaks (`Backend`, `Changes`, `ApplyReport`, `FirewallError`) and builds
//! the backend for a flavor; a flavor only encodes, decodes and diffs, it
//! never decides what should exist.

pub mod cleanup;
pub mod engine;
pub mod flavors;
pub(crate) mod names;
pub mod sources;
pub mod view;
pub mod wire;

pub use names::Names;

use std::sync::Arc;

use crate::config::{Flavor, JumpPositions};
use crate::model::{Families, Mapping, PodRef, RuleSet};
use engine::conntrack;
use engine::monitor::{self, Tracker};
use flavors::{iptables, nftables};
use wire::netlink::NetlinkError;

/// Errors at the firewall boundary.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("gave up after {0} retries: other writers kept changing the ruleset")]
    TooManyRetries(u32),
    /// An object named as the agent names its own is someone else's.
    #[error("{0}")]
    NotOurs(String),
    /// The rules ask for what this kernel's layout cannot enforce (the
    /// planner refuses such entries first; nothing is applied).
    #[error("{0}")]
    Unsupported(String),
}

impl FirewallError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            FirewallError::Netlink(NetlinkError::Refused { .. }) => "refused",
            FirewallError::Netlink(NetlinkError::Socket(_)) => "socket",
            FirewallError::Netlink(_) => "netlink",
            FirewallError::TooManyRetries(_) => "retries",
            FirewallError::NotOurs(_) => "not_ours",
            FirewallError::Unsupported(_) => "unsupported",
        }
    }
}

pub use flavors::nftables::Traffic;
pub use sources::Admission;

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Messages in the batch (0: nothing changed, nothing sent).
    pub messages: usize,
    pub bytes: usize,
    /// Batches refused because the generation moved, then rebuilt.
    pub retries: u32,
    /// The kernel state came from the cache (generation unchanged).
    pub cache_hit: bool,
    /// The agent's layout was (re)created.
    pub rebuilt: bool,
    pub added_dnat: Vec<Mapping>,
    pub removed_dnat: Vec<Mapping>,
    /// Keys whose allowed sources shrank while their mapping stayed: their
    /// connections from sources no longer allowed are flushed.
    pub admission: Vec<Admission>,
    /// Conntrack entries of removed or moved mappings deleted after the
    /// commit.
    pub conntrack_flushed: usize,
}

/// After a commit: mappings that were removed or moved lose their conntrack
/// entries, so the next datagram follows the new rules and an established
/// TCP connection through a withdrawn mapping ends (a namespace that lost
/// the port keeps nothing open). A failure is logged, not returned: the
/// rules themselves are in place.
pub fn flush_stale_connections(report: &mut ApplyReport) {
    report.conntrack_flushed = flush_targets(&stale_targets(report));
}

/// Whose conntrack entries `flush_targets` deletes after `report`'s commit:
/// every entry of a mapping removed (or moved), those of a key from the
/// sources it no longer admits, and for a UDP key added or admitting new
/// sources, the entries that went to the node itself un-DNATed (a peer
/// that kept sending would stay there).
pub fn stale_targets(report: &ApplyReport) -> conntrack::Targets {
    // UDP only for the entries that went to the node: a TCP client's next
    // connection is a new entry anyway.
    let udp = |k: &crate::model::NatKey| k.proto == crate::model::Proto::Udp;
    // A port that goes to the same pod address and port before and after
    // (a range's part that only got split or joined) keeps its connections.
    // (Nothing to keep when nothing is removed: no set of the adds then.)
    let kept: std::collections::HashSet<_> = if report.removed_dnat.is_empty() {
        Default::default()
    } else {
        report
            .added_dnat
            .iter()
            .flat_map(|m| m.ports().map(move |(k, p)| (k, m.pod_ip, p)))
            .collect()
    };
    conntrack::Targets {
        whole: report
            .removed_dnat
            .iter()
            .flat_map(|m| m.ports().map(move |(k, p)| (k, m.pod_ip, p)))
            .filter(|t| !kept.contains(t))
            .map(|(k, _, _)| k)
            .collect(),
        outside: report
            .admission
            .iter()
            .filter(|n| n.lost)
            .flat_map(|n| n.key.run(n.span).map(|k| (k, n.sources.clone())))
            .collect(),
        unnated: report
            .added_dnat
            .iter()
            .flat_map(|m| m.ports().map(|(k, _)| k))
            .chain(
                report
                    .admission
                    .iter()
                    .filter(|n| n.gained)
                    .flat_map(|n| n.key.run(n.span)),
            )
            .filter(udp)
            .collect(),
    }
}

/// Deletes the conntrack entries of `targets`; how many (0 on a failure,
/// which is logged).
pub fn flush_targets(targets: &conntrack::Targets) -> usize {
    match conntrack::flush(targets) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("could not flush the conntrack entries of changed mappings: {e}");
            0
        }
    }
}

/// One flavor's encoder/decoder. Blocking: call it off the async runtime.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Reads what the agent owns back from the kernel.
    fn read(&mut self) -> Result<RuleSet, FirewallError>;
    /// Makes the kernel hold exactly `desired` with one batch of the
    /// difference (none when nothing differs).
    fn apply(&mut self, desired: &RuleSet) -> Result<ApplyReport, FirewallError>;
    /// Applies `changes` (the difference between the last `desired` this
    /// backend applied and the next) without looking at the whole table:
    /// O(change). `Ok(None)`: not possible now (no trusted state of the last
    /// commit, the layout needs repair, the changes do not fit what the
    /// kernel holds, or another writer committed first): nothing was sent;
    /// call `apply` with the whole desired table.
    fn apply_changes(&mut self, changes: Changes) -> Result<Option<ApplyReport>, FirewallError>;
    /// The changes `apply` would make, in the view's syntax; touches nothing.
    /// `assume_empty`: do not read the kernel (no CAP_NET_ADMIN).
    fn dry_run(&mut self, desired: &RuleSet, assume_empty: bool) -> Result<String, FirewallError>;
    /// Removes everything the agent owns in this backend's families (by its
    /// mark, never by a name alone); returns what it removed, a line per
    /// object kind and family (none: there was nothing).
    fn cleanup(&mut self) -> Result<Vec<String>, FirewallError>;
    /// What `cleanup` would remove, touching nothing.
    fn cleanup_dry_run(&mut self) -> Result<Vec<String>, FirewallError>;
    /// The rule view of `rules` in this flavor's syntax.
    fn view(&self, rules: &RuleSet) -> String;
    /// Drops the remembered kernel state: the next apply reads the kernel.
    fn forget(&mut self);
    /// What the agent owns, as nf_tables notifications name it.
    fn interest(&self) -> monitor::Interest;
    /// From now on the cache trusts `tracker`: commits that touch nothing of
    /// ours cost no re-read, and our own commits are known as ours.
    fn attach_tracker(&mut self, tracker: Arc<Tracker>);
    /// Foreign forward-hook base chains with policy drop, which drop what
    /// this flavor accepts (reported, never touched).
    fn forward_blockers(&mut self) -> Result<Vec<monitor::Blocker>, FirewallError>;
}

/// Builds the backend for a flavor (iptables jumps at the default
/// positions; see `backend_with_jumps`).
pub fn backend_for(flavor: Flavor, names: Names) -> Box<dyn Backend> {
    backend_with_jumps(flavor, names, JumpPositions::default())
}

/// Builds the backend for a flavor; `jumps` (`-iptablesJump`) places the
/// iptables flavor's jump rules. IPv4 only.
pub fn backend_with_jumps(flavor: Flavor, names: Names, jumps: JumpPositions) -> Box<dyn Backend> {
    backend_with(flavor, names, jumps, Families::default())
}

/// Builds the backend for a flavor serving `families` (one part each, in
/// one batch per change), without `-localaccess`'s objects.
pub fn backend_with(
    flavor: Flavor,
    names: Names,
    jumps: JumpPositions,
    families: Families,
) -> Box<dyn Backend> {
    backend_with_options(flavor, names, jumps, families, false)
}

/// Whether `flavor` enforces an entry's `sourceRanges` on this kernel: the
/// iptables flavor always (a DNAT rule per range), the nftables flavor on
/// Linux 5.6 or later (concatenated interval sets). The planner refuses
/// such entries by name where not.
pub fn enforces_source_ranges(flavor: crate::config::Flavor) -> bool {
    flavor == crate::config::Flavor::Iptables || flavors::nftables::kernel_supports_source_ranges()
}

/// What a table holds beyond the NAT maps and sets, by the agent's version
/// and the kernel: this version's layout has the allow-lists on Linux 5.6
/// and the counters too on 5.7; the version before had the allow-lists
/// only; before that, and on an older kernel, neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Source allow-lists: concatenated interval sets (Linux 5.6).
    pub sources: bool,
    /// Per-mapping traffic counters: element counters a lookup updates
    /// (Linux 5.7).
    pub traffic: bool,
}

impl Features {
    pub const ALL: Features = Features {
        sources: true,
        traffic: true,
    };
    pub const NONE: Features = Features {
        sources: false,
        traffic: false,
    };
    /// The layout of the version before per-mapping counters.
    pub const SOURCES_ONLY: Features = Features {
        sources: true,
        traffic: false,
    };

    /// The layouts earlier versions of the agent made that this one reads
    /// (with their elements) and rebuilds once: those with fewer objects.
    pub(crate) fn older(self) -> impl Iterator<Item = Features> {
        [Features::SOURCES_ONLY, Features::NONE]
            .into_iter()
            .filter(move |f| *f != self && (self.sources || !f.sources))
    }
}

/// Where the per-mapping traffic counters are read: the nftables flavor's
/// tables, on a kernel that counts (Linux 5.7), or the iptables flavor's
/// counting chains (`-iptablescounters`). None otherwise.
#[derive(Clone, Debug)]
pub struct TrafficSource {
    flavor: Flavor,
    names: Names,
    families: Families,
}

impl TrafficSource {
    pub fn for_flavor(
        flavor: Flavor,
        names: Names,
        families: Families,
        iptables_counters: bool,
    ) -> Option<TrafficSource> {
        let counts = match flavor {
            Flavor::Nftables => flavors::nftables::kernel_counts_traffic(),
            Flavor::Iptables => iptables_counters,
        };
        counts.then_some(TrafficSource {
            flavor,
            names,
            families,
        })
    }

    /// Every counted key's counters, sorted by key (`None`: nothing of the
    /// agent's counts); `expected`: how many keys the applied table
    /// publishes. Blocking: one dump per family (the nftables flavor's
    /// more if one came short). A range's part is one row under its first
    /// key in the iptables flavor, a row per port in the nftables flavor.
    pub fn read(&self, expected: usize) -> Result<Option<Vec<nftables::Traffic>>, FirewallError> {
        Ok(match self.flavor {
            Flavor::Nftables => nftables::read_traffic(&self.names, self.families, expected)?,
            Flavor::Iptables => iptables::read_traffic(&self.names, self.families)?,
        })
    }
}

/// As `backend_with`; `local`: `-localaccess` (node-local DNAT, hairpin).
pub fn backend_with_options(
    flavor: Flavor,
    names: Names,
    jumps: JumpPositions,
    families: Families,
    local: bool,
) -> Box<dyn Backend> {
    backend_counting(flavor, names, jumps, families, local, false)
}

/// As `backend_with_options`; `iptables_counters`: `-iptablescounters`
/// (the iptables flavor's counting chains; the nftables flavor always
/// counts).
pub fn backend_counting(
    flavor: Flavor,
    names: Names,
    jumps: JumpPositions,
    families: Families,
    local: bool,
    iptables_counters: bool,
) -> Box<dyn Backend> {
    match flavor {
        Flavor::Nftables => Box::new(nftables::NftablesBackend::with_options(
            names, families, local,
        )),
        Flavor::Iptables => Box::new(
            iptables::IptablesBackend::with_options(names, jumps, families, local)
                .with_counters(iptables_counters),
        ),
    }
}

/// Items in `desired` but not in `current` (to add), and the reverse (to
/// delete). Both inputs sorted; one merge walk, unchanged items untouched.
pub fn diff<T: Ord + Clone>(current: &[T], desired: &[T]) -> (Vec<T>, Vec<T>) {
    use std::cmp::Ordering::*;
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < current.len() && j < desired.len() {
        match current[i].cmp(&desired[j]) {
            Less => {
                del.push(current[i].clone());
                i += 1;
            }
            Greater => {
                add.push(desired[j].clone());
                j += 1;
            }
            Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    del.extend_from_slice(&current[i..]);
    add.extend_from_slice(&desired[j..]);
    (add, del)
}

/// The difference between two rule sets, list by list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: RuleSet,
    pub del: RuleSet,
}

impl Changes {
    pub fn between(current: &RuleSet, desired: &RuleSet) -> Changes {
        let (add_d, del_d) = diff(&current.dnat, &desired.dnat);
        let (add_s, del_s) = diff(&current.snat, &desired.snat);
        let (add_f, del_f) = diff(&current.forward, &desired.forward);
        let (add_l, del_l) = diff(&current.local, &desired.local);
        let (add_a, del_a) = diff(&current.allow, &desired.allow);
        Changes {
            add: RuleSet {
                dnat: add_d,
                snat: add_s,
                forward: add_f,
                local: add_l,
                allow: add_a,
            },
            del: RuleSet {
                dnat: del_d,
                snat: del_s,
                forward: del_f,
                local: del_l,
                allow: del_a,
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.del.is_empty()
    }

    /// Whether these changes can be made to `current` as they are: every
    /// deleted item is there, no added one is (binary searches: O(change)).
    pub fn fits(&self, current: &RuleSet) -> bool {
        fn has<T: Ord>(v: &[T], x: &T) -> bool {
            v.binary_search(x).is_ok()
        }
        let (a, c) = (&self.add, current);
        self.deletes_fit(current)
            && !a.dnat.iter().any(|x| has(&c.dnat, x))
            && !a.snat.iter().any(|x| has(&c.snat, x))
            && !a.forward.iter().any(|x| has(&c.forward, x))
            && !a.local.iter().any(|x| has(&c.local, x))
            && !a.allow.iter().any(|x| has(&c.allow, x))
    }

    /// `canonical`, keeping these changes when they already are (no copy).
    pub fn into_canonical(self) -> Changes {
        let fixed = match self.canonical() {
            std::borrow::Cow::Owned(c) => Some(c),
            std::borrow::Cow::Borrowed(_) => None,
        };
        fixed.unwrap_or(self)
    }

    /// Moves the changes into a sorted rule set in place, as `apply_to`
    /// does, without copying what they add.
    pub fn move_into(self, rules: &mut RuleSet) {
        fn one<T: Ord>(v: &mut Vec<T>, add: Vec<T>, del: &[T]) {
            for d in del {
                if let Ok(i) = v.binary_search(d) {
                    v.remove(i);
                }
            }
            for a in add {
                if let Err(i) = v.binary_search(&a) {
                    v.insert(i, a);
                }
            }
        }
        let (add, del) = (self.add, self.del);
        one(&mut rules.dnat, add.dnat, &del.dnat);
        one(&mut rules.snat, add.snat, &del.snat);
        one(&mut rules.forward, add.forward, &del.forward);
        one(&mut rules.local, add.local, &del.local);
        one(&mut rules.allow, add.allow, &del.allow);
    }

    /// Every rule or element the changes delete is in `current`, exactly.
    pub fn deletes_fit(&self, current: &RuleSet) -> bool {
        fn has<T: Ord>(v: &[T], x: &T) -> bool {
            v.binary_search(x).is_ok()
        }
        let (d, c) = (&self.del, current);
        d.dnat.iter().all(|x| has(&c.dnat, x))
            && d.snat.iter().all(|x| has(&c.snat, x))
            && d.forward.iter().all(|x| has(&c.forward, x))
            && d.local.iter().all(|x| has(&c.local, x))
            && d.allow.iter().all(|x| has(&c.allow, x))
    }

    /// Owners as they read back from the kernel (see `canonical`); borrowed
    /// when they already are (no copy on the path of every change).
    pub fn canonical(&self) -> std::borrow::Cow<'_, Changes> {
        match (canonical(&self.add), canonical(&self.del)) {
            (std::borrow::Cow::Borrowed(_), std::borrow::Cow::Borrowed(_)) => {
                std::borrow::Cow::Borrowed(self)
            }
            (add, del) => std::borrow::Cow::Owned(Changes {
                add: add.into_owned(),
                del: del.into_owned(),
            }),
        }
    }

    /// Applies the changes to a sorted rule set in place (no re-read, no
    /// copy of the unchanged part).
    pub fn apply_to(&self, rules: &mut RuleSet) {
        self.clone().move_into(rules);
    }
}

/// Longest owner comment written to the kernel (nft's comment limit is 128
/// bytes with its NUL); longer `namespace:name` pairs are cut at a character
/// boundary.
pub const MAX_COMMENT: usize = 127;

pub fn comment_for(owner: &PodRef) -> String {
    cut_comment(owner.to_string())
}

/// The comment of an element of a range's part (nftables flavor): the
/// part's first and last port before the owner, cut as `comment_for` cuts.
pub fn part_comment(owner: &PodRef, first: u16, span: u16) -> String {
    if span == 0 {
        return comment_for(owner);
    }
    let last = u32::from(first) + u32::from(span);
    cut_comment(format!("{first}-{last} {owner}"))
}

fn cut_comment(mut s: String) -> String {
    if s.len() > MAX_COMMENT {
        let mut cut = MAX_COMMENT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The rule set as it reads back from the kernel: owners as their (possibly
/// cut) comments say. Diffing against this keeps long names from churning.
/// Borrowed when no owner is cut (the usual case: no copy of a large table).
pub fn canonical(rules: &RuleSet) -> std::borrow::Cow<'_, RuleSet> {
    // A range's part: "first-last " goes before the owner in the comment
    // of its elements (nftables), at most 12 bytes.
    let too_long = |o: &PodRef, span: u16| {
        let prefix = if span == 0 { 0 } else { 12 };
        prefix + o.namespace.len() + 1 + o.name.len() > MAX_COMMENT
    };
    if !rules.dnat.iter().any(|m| too_long(&m.owner, m.span))
        && !rules.snat.iter().any(|s| too_long(&s.owner, 0))
        && !rules.forward.iter().any(|f| too_long(&f.owner, f.span))
        && !rules.local.iter().any(|l| too_long(&l.owner, 0))
        && !rules.allow.iter().any(|a| too_long(&a.owner, a.span))
    {
        return std::borrow::Cow::Borrowed(rules);
    }
    let fix = |o: &PodRef| PodRef::from_comment(&comment_for(o)).unwrap_or_else(|| o.clone());
    // The owner as a part's element comment keeps it: both flavors write
    // that owner, so either reads back what it wrote.
    let fix_part = |o: &PodRef, first: u16, span: u16| {
        let c = part_comment(o, first, span);
        let owner = if span == 0 {
            Some(c.as_str())
        } else {
            c.split_once(' ').map(|(_, owner)| owner)
        };
        owner
            .and_then(PodRef::from_comment)
            .unwrap_or_else(|| o.clone())
    };
    let mut r = RuleSet {
        dnat: rules
            .dnat
            .iter()
            .map(|m| Mapping {
                owner: fix_part(&m.owner, m.key.public_port, m.span),
                ..m.clone()
            })
            .collect(),
        snat: rules
            .snat
            .iter()
            .map(|s| crate::model::SnatRule {
                owner: fix(&s.owner),
                ..s.clone()
            })
            .collect(),
        forward: rules
            .forward
            .iter()
            .map(|f| crate::model::ForwardRule {
                owner: fix_part(&f.owner, f.pod_port, f.span),
                ..f.clone()
            })
            .collect(),
        local: rules
            .local
            .iter()
            .map(|l| crate::model::LocalPod {
                owner: fix(&l.owner),
                ..l.clone()
            })
            .collect(),
        allow: rules
            .allow
            .iter()
            .map(|a| crate::model::SourceRule {
                owner: fix_part(&a.owner, a.key.public_port, a.span),
                ..a.clone()
            })
            .collect(),
    };
    r.normalize();
    std::borrow::Cow::Owned(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_range_flushes_only_the_ports_that_moved() {
        let part = |port: u16, span: u16, pod: &str, pod_port: u16| Mapping {
            key: crate::model::NatKey {
                public_ip: "203.0.113.7".parse().unwrap(),
                public_port: port,
                proto: crate::model::Proto::Udp,
            },
            pod_ip: pod.parse().unwrap(),
            pod_port,
            owner: PodRef::new("voip", pod),
            span,
        };
        let report = ApplyReport {
            removed_dnat: vec![part(10000, 99, "10.1.0.5", 20000)],
            added_dnat: vec![
                part(10000, 39, "10.1.0.5", 20000),
                part(10040, 19, "10.1.1.5", 30040),
                part(10060, 39, "10.1.0.5", 20060),
            ],
            ..ApplyReport::default()
        };
        let t = stale_targets(&report);
        let whole: Vec<u16> = t.whole.iter().map(|k| k.public_port).collect();
        assert_eq!(whole, (10040..=10059).collect::<Vec<_>>());
    }

    #[test]
    fn a_long_owner_of_a_range_reads_back_as_canonical_says() {
        let owner = PodRef::new("n".repeat(60), "p".repeat(70));
        let m = Mapping {
            key: crate::model::NatKey {
                public_ip: "203.0.113.7".parse().unwrap(),
                public_port: 10000,
                proto: crate::model::Proto::Udp,
            },
            pod_ip: "10.1.0.5".parse().unwrap(),
            pod_port: 20000,
            owner: owner.clone(),
            span: 99,
        };
        let rules = RuleSet {
            dnat: vec![m.clone()],
            ..RuleSet::default()
        };
        let c = canonical(&rules).into_owned();
        let written = part_comment(&c.dnat[0].owner, 10000, 99);
        assert!(written.len() <= MAX_COMMENT, "{written}");
        // What the element's comment reads back as is the canonical owner:
        // a re-apply finds nothing to change.
        let (_, read) = written.split_once(' ').unwrap();
        assert_eq!(PodRef::from_comment(read), Some(c.dnat[0].owner.clone()));
        assert_eq!(part_comment(&owner, 10000, 99), written);
        // One port: the owner cut as before, at 127 bytes.
        let one = RuleSet {
            dnat: vec![Mapping { span: 0, ..m }],
            ..RuleSet::default()
        };
        let c = canonical(&one).into_owned();
        assert_eq!(c.dnat[0].owner.to_string().len(), MAX_COMMENT);
    }

    #[test]
    fn diff_touches_only_changes() {
        let (add, del) = diff(&[1, 2, 3, 5], &[2, 3, 4, 5]);
        assert_eq!(add, vec![4]);
        assert_eq!(del, vec![1]);
        let (add, del) = diff(&[1, 2], &[1, 2]);
        assert!(add.is_empty() && del.is_empty());
    }

    #[test]
    fn changes_apply_in_place_like_the_target() {
        use crate::model::{NatKey, Proto};
        let m = |port: u16, pod: u8| Mapping {
            key: NatKey {
                public_ip: std::net::Ipv4Addr::new(203, 0, 113, 7).into(),
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip: std::net::Ipv4Addr::new(10, 0, 0, pod).into(),
            pod_port: 80,
            owner: PodRef::new("a", "b"),
            span: 0,
        };
        let cur = RuleSet {
            dnat: vec![m(1, 1), m(2, 1), m(3, 1)],
            ..RuleSet::default()
        };
        let want = RuleSet {
            dnat: vec![m(2, 1), m(3, 2), m(4, 1)],
            ..RuleSet::default()
        };
        let ch = Changes::between(&cur, &want);
        assert_eq!(ch.add.dnat, vec![m(3, 2), m(4, 1)]);
        assert_eq!(ch.del.dnat, vec![m(1, 1), m(3, 1)]);
        let mut got = cur.clone();
        ch.apply_to(&mut got);
        assert_eq!(got, want);
        assert!(Changes::between(&want, &want).is_empty());
    }

    #[test]
    fn long_owner_comments_are_cut_consistently() {
        let long = PodRef::new("ns", "p".repeat(200));
        let c = comment_for(&long);
        assert_eq!(c.len(), MAX_COMMENT);
        assert!(c.starts_with("ns:ppp"));
        let short = PodRef::new("mail", "mx-0");
        assert_eq!(comment_for(&short), "mail:mx-0");
    }
}
