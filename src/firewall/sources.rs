//! One published key's mapping and allowed sources, before and after a
//! change: what the iptables flavor rewrites for a key (its DNAT rules are
//! the mapping once per allowed range) and which keys' conntrack entries
//! are flushed after a commit because whom they admit changed (`Admission`).

use ipnet::IpNet;

use crate::firewall::Changes;
use crate::model::{allow_of, Mapping, NatKey, RuleSet};

/// What one key holds: its mapping, if published, and its allowed ranges
/// (empty: every source).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyView {
    pub mapping: Option<Mapping>,
    pub sources: Vec<IpNet>,
}

impl KeyView {
    /// `key` in a sorted rule set (binary searches: O(log n + ranges)).
    pub fn of(rules: &RuleSet, key: &NatKey) -> KeyView {
        let at = rules.dnat.partition_point(|m| m.key < *key);
        let mapping = rules.dnat.get(at).filter(|m| m.key == *key).cloned();
        let sources = allow_of(&rules.allow, key)
            .iter()
            .map(|a| a.source)
            .collect();
        KeyView { mapping, sources }
    }

    /// This key after `ch`; `None` if `ch` does not fit it (it deletes a
    /// mapping or a range the key does not hold, or adds one it holds and
    /// does not delete), as `Changes::fits` says of a whole table.
    pub fn after(&self, ch: &Changes, key: &NatKey) -> Option<KeyView> {
        let (add, del) = (KeyView::of(&ch.add, key), KeyView::of(&ch.del, key));
        if del.mapping.is_some() && del.mapping != self.mapping {
            return None;
        }
        let mapping = match (add.mapping, del.mapping) {
            (Some(_), None) if self.mapping.is_some() => return None,
            (Some(m), _) => Some(m),
            (None, Some(_)) => None,
            (None, None) => self.mapping.clone(),
        };
        let mut sources = self.sources.clone();
        for d in &del.sources {
            let at = sources.iter().position(|s| s == d)?;
            sources.remove(at);
        }
        if add.sources.iter().any(|a| sources.contains(a)) {
            return None;
        }
        sources.extend(add.sources);
        sources.sort_unstable();
        sources.dedup();
        // Ranges without a mapping would be dropped here, and a later
        // change adding the mapping alone would publish it open.
        if mapping.is_none() && !sources.is_empty() {
            return None;
        }
        Some(KeyView { mapping, sources })
    }

    /// The keys whose mapping or ranges `ch` touches, sorted, once each.
    pub fn touched(ch: &Changes) -> Vec<NatKey> {
        let mut keys: Vec<NatKey> = [&ch.add, &ch.del]
            .into_iter()
            .flat_map(|r| {
                r.dnat
                    .iter()
                    .map(|m| m.key)
                    .chain(r.allow.iter().map(|a| a.key))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// A key that keeps its mapping while the sources it admits change. After
/// the commit, when it `lost` some (a range removed, or an open key
/// restricted), its conntrack entries from any source outside `sources` are
/// deleted: an established connection from a removed range ends as a
/// removed mapping's does. When it `gained` some, the entries that were
/// not DNATed are deleted (a UDP flow from a newly admitted source that
/// went to the node itself would stay there while it keeps sending).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Admission {
    pub key: NatKey,
    /// The ports after `key`'s its mapping publishes (a range's part).
    pub span: u16,
    /// What it admits after the change (empty: every source).
    pub sources: Vec<IpNet>,
    pub lost: bool,
    pub gained: bool,
}

impl Admission {
    /// `key` from `before` to `after`, if whom it admits changes. A key that
    /// is new, gone or moved to another pod is not: its conntrack entries go
    /// whole (`removed_dnat`), or as a new mapping's do.
    pub fn of(key: &NatKey, before: &KeyView, after: &KeyView) -> Option<Admission> {
        let same = before.mapping.is_some() && before.mapping == after.mapping;
        // Empty is every source.
        let misses = |from: &[IpNet], to: &[IpNet]| {
            !to.is_empty() && (from.is_empty() || from.iter().any(|s| !to.contains(s)))
        };
        let lost = misses(&before.sources, &after.sources);
        let gained = misses(&after.sources, &before.sources);
        (same && (lost || gained)).then(|| Admission {
            key: *key,
            span: after.mapping.as_ref().map_or(0, |m| m.span),
            sources: after.sources.clone(),
            lost,
            gained,
        })
    }

    /// The keys `ch` narrows on `before` (a rule set holding at least the
    /// keys `ch` touches): O(change).
    pub fn by_change(before: &RuleSet, ch: &Changes) -> Vec<Admission> {
        KeyView::touched(ch)
            .iter()
            .filter_map(|k| {
                let b = KeyView::of(before, k);
                Admission::of(k, &b, &b.after(ch, k)?)
            })
            .collect()
    }

    /// The keys whose admission changes from `before` to `after`, whole
    /// tables (a rebuild).
    pub fn between(before: &RuleSet, after: &RuleSet) -> Vec<Admission> {
        Admission::by_change(before, &Changes::between(before, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PodRef, Proto, SourceRule};

    fn key() -> NatKey {
        NatKey {
            public_ip: "203.0.113.7".parse().unwrap(),
            public_port: 993,
            proto: Proto::Tcp,
        }
    }

    fn table(pod: &str, ranges: &[&str]) -> RuleSet {
        let owner = PodRef::new("mail", pod);
        let mut r = RuleSet {
            dnat: vec![Mapping {
                key: key(),
                pod_ip: "10.0.0.5".parse().unwrap(),
                pod_port: 993,
                owner: owner.clone(),
                span: 0,
            }],
            allow: ranges
                .iter()
                .map(|s| SourceRule {
                    key: key(),
                    span: 0,
                    source: s.parse().unwrap(),
                    owner: owner.clone(),
                })
                .collect(),
            ..RuleSet::default()
        };
        r.normalize();
        r
    }

    /// The sources a key still admits when it lost some.
    fn narrowed(before: &RuleSet, after: &RuleSet) -> Option<Vec<String>> {
        let n = Admission::between(before, after);
        assert!(n.len() <= 1);
        n.first()
            .filter(|n| n.lost)
            .map(|n| n.sources.iter().map(|s| s.to_string()).collect())
    }

    fn gained(before: &RuleSet, after: &RuleSet) -> bool {
        Admission::between(before, after).iter().any(|n| n.gained)
    }

    #[test]
    fn a_key_narrows_when_it_loses_sources_and_keeps_its_mapping() {
        let a = ["198.51.100.0/24"];
        let ab = ["198.51.100.0/24", "192.0.2.0/24"];
        let wide = ["198.51.0.0/16"];
        let pod = |r: &[&str]| table("imap", r);
        // A range removed: the rest stays admitted.
        assert_eq!(
            narrowed(&pod(&ab), &pod(&a)),
            Some(vec!["198.51.100.0/24".to_string()])
        );
        // An open key restricted: everything else goes.
        assert_eq!(
            narrowed(&pod(&[]), &pod(&a)),
            Some(vec!["198.51.100.0/24".to_string()])
        );
        // Replaced by a wider range: connections inside it stay (the flush
        // keeps every source the key still admits).
        assert_eq!(
            narrowed(&pod(&a), &pod(&wide)),
            Some(vec!["198.51.0.0/16".to_string()])
        );
        // Widened, reopened, unchanged: nothing lost.
        assert_eq!(narrowed(&pod(&a), &pod(&ab)), None);
        assert_eq!(narrowed(&pod(&a), &pod(&[])), None);
        assert_eq!(narrowed(&pod(&a), &pod(&a)), None);
        // What gained: widened, reopened, a range replaced by a wider one or
        // by another; not a narrowing alone, not an unchanged key.
        assert!(gained(&pod(&a), &pod(&ab)) && gained(&pod(&a), &pod(&[])));
        assert!(gained(&pod(&a), &pod(&wide)) && gained(&pod(&a), &pod(&["192.0.2.0/24"])));
        assert!(!gained(&pod(&ab), &pod(&a)) && !gained(&pod(&[]), &pod(&a)));
        assert!(!gained(&pod(&a), &pod(&a)));
        // Another pod takes the key: its connections go whole (removed_dnat).
        assert_eq!(narrowed(&pod(&ab), &table("other", &a)), None);
        // New or gone.
        assert_eq!(narrowed(&RuleSet::default(), &pod(&a)), None);
        assert_eq!(narrowed(&pod(&a), &RuleSet::default()), None);
    }

    #[test]
    fn a_change_that_does_not_fit_the_key_is_refused() {
        let before = KeyView::of(&table("imap", &["198.51.100.0/24"]), &key());
        let ch = Changes::between(
            &table("imap", &["192.0.2.0/24"]),
            &table("imap", &["10.0.0.0/8"]),
        );
        assert_eq!(before.after(&ch, &key()), None);
        let ok = Changes::between(
            &table("imap", &["198.51.100.0/24"]),
            &table("imap", &["10.0.0.0/8"]),
        );
        assert_eq!(
            before.after(&ok, &key()).map(|k| k.sources),
            Some(vec!["10.0.0.0/8".parse().unwrap()])
        );
        // Adding what the key holds (its mapping, a range it has) does not
        // fit either.
        let held = table("imap", &["198.51.100.0/24"]);
        let again = Changes {
            add: held.clone(),
            del: RuleSet::default(),
        };
        assert_eq!(before.after(&again, &key()), None);
        let range_again = Changes {
            add: RuleSet {
                allow: held.allow.clone(),
                ..RuleSet::default()
            },
            del: RuleSet::default(),
        };
        assert_eq!(before.after(&range_again, &key()), None);
        // Another mapping added over the one the key holds, without its
        // delete; ranges left on a key whose mapping goes.
        let other = table("other", &["198.51.100.0/24"]);
        let over = Changes {
            add: RuleSet {
                dnat: other.dnat.clone(),
                ..RuleSet::default()
            },
            del: RuleSet::default(),
        };
        assert_eq!(before.after(&over, &key()), None);
        let orphan = Changes {
            add: RuleSet::default(),
            del: RuleSet {
                dnat: held.dnat.clone(),
                ..RuleSet::default()
            },
        };
        assert_eq!(before.after(&orphan, &key()), None);
    }
}
