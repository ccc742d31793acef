//! `state.json` as the Go version wrote and read it: an object keyed
//! `"<public IP>:<public port>"` whose values are lists of rules
//! (`api.NATRule`). Parsing accepts what the Go version wrote (addresses as
//! `net.IPAddr` objects `{"IP":"a.b.c.d","Zone":""}`) and plain address
//! strings; writing uses the object form, the only one the Go version can
//! read back. Pure data: the stores move the text, the recorder decides when.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{Mapping, NatKey, PodRef, Proto};

/// One rule of the record: traffic to `source_ip:source_port` goes to
/// `destination_ip:destination_port`, owned by the pod named in `comment`.
/// Field order and names are the Go version's (`api.NATRule`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRecord {
    #[serde(rename = "Protocol")]
    pub protocol: Proto,
    #[serde(rename = "SourceIP", with = "go_ip")]
    pub source_ip: IpAddr,
    #[serde(rename = "SourcePort")]
    pub source_port: u16,
    #[serde(rename = "DestinationIP", with = "go_ip")]
    pub destination_ip: IpAddr,
    #[serde(rename = "DestinationPort")]
    pub destination_port: u16,
    /// When the agent last wrote the record with this rule in it.
    #[serde(rename = "LastVerified", with = "go_time")]
    pub last_verified: Timestamp,
    /// When the rule first appeared in the record; kept while it exists.
    #[serde(rename = "Created", with = "go_time")]
    pub created: Timestamp,
    /// The owner, `namespace:pod`.
    #[serde(rename = "Comment", default)]
    pub comment: String,
}

/// What makes two records the same rule (everything but the times): the
/// Go version matched a pod's rule by key, destination address and port; the
/// protocol and owner make a UDP twin or a new pod on a recycled IP new rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    pub protocol: Proto,
    pub source_ip: IpAddr,
    pub source_port: u16,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub comment: String,
}

impl NatRecord {
    pub fn id(&self) -> RecordId {
        RecordId {
            protocol: self.protocol,
            source_ip: self.source_ip,
            source_port: self.source_port,
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
            comment: self.comment.clone(),
        }
    }

    /// The rule as a mapping of the planner's model; `None` when the comment
    /// does not name a pod (`namespace:pod`).
    pub fn mapping(&self) -> Option<Mapping> {
        Some(Mapping {
            key: NatKey {
                public_ip: self.source_ip,
                public_port: self.source_port,
                proto: self.protocol,
            },
            pod_ip: self.destination_ip,
            pod_port: self.destination_port,
            owner: PodRef::from_comment(&self.comment)?,
            span: 0,
        })
    }
}

/// The whole record: `"<public IP>:<public port>"` → rules. The key has no
/// protocol (as in the Go version), so a TCP and a UDP mapping of one port
/// share a list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateFile {
    pub entries: BTreeMap<String, Vec<NatRecord>>,
}

/// The Go version's key of a rule; an IPv6 address in brackets
/// (`[2001:db8::7]:25`).
pub fn record_key(public_ip: IpAddr, public_port: u16) -> String {
    crate::model::host_port(public_ip, public_port)
}

impl StateFile {
    pub fn parse(text: &str) -> Result<StateFile, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Compact JSON, as the Go version's `json.Marshal` wrote it (a ConfigMap
    /// holds at most 1 MiB).
    pub fn to_json(&self) -> String {
        // Infallible: string keys, no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    pub fn records(&self) -> impl Iterator<Item = &NatRecord> {
        self.entries.values().flatten()
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of `dnat` at `now`: `Created` is taken from `previous` for
    /// every rule that is already there, `LastVerified` is `now`.
    pub fn from_mappings(dnat: &[Mapping], previous: &StateFile, now: Timestamp) -> StateFile {
        StateFile::with_times(dnat, &Summary::of(previous), now)
    }

    /// Like `from_mappings`, with the `Created` times of a [`Summary`].
    pub fn with_times(dnat: &[Mapping], previous: &Summary, now: Timestamp) -> StateFile {
        let mut entries: BTreeMap<String, Vec<NatRecord>> = BTreeMap::new();
        // A range's part is recorded port by port, as the Go version's
        // schema has one port per record.
        for (m, (key, pod_port)) in dnat.iter().flat_map(|m| m.ports().map(move |p| (m, p))) {
            let mut record = NatRecord {
                protocol: key.proto,
                source_ip: key.public_ip,
                source_port: key.public_port,
                destination_ip: m.pod_ip,
                destination_port: pod_port,
                last_verified: now,
                created: now,
                comment: m.owner.to_string(),
            };
            if let Some(t) = previous.created(&record.id()) {
                record.created = t;
            }
            entries
                .entry(record_key(key.public_ip, key.public_port))
                .or_default()
                .push(record);
        }
        for list in entries.values_mut() {
            list.sort_by_key(NatRecord::id);
            go_keeps_the_first(list);
            // A list is almost always one rule; the record lives until the
            // next write, without the three empty slots a push leaves.
            list.shrink_to_fit();
        }
        StateFile { entries }
    }

    /// The rules, ignoring their times: equal when the NAT table is the same.
    pub fn ids(&self) -> Vec<(&str, RecordId)> {
        let mut ids: Vec<(&str, RecordId)> = self
            .entries
            .iter()
            .flat_map(|(k, list)| list.iter().map(move |r| (k.as_str(), r.id())))
            .collect();
        ids.sort();
        ids
    }

    /// Same rules under the same keys (times aside)?
    pub fn same_rules(&self, other: &StateFile) -> bool {
        self.ids() == other.ids()
    }

    /// The rules as the planner's mappings (rules whose comment names no pod
    /// are left out), sorted.
    pub fn mappings(&self) -> Vec<Mapping> {
        let mut out: Vec<Mapping> = self.records().filter_map(NatRecord::mapping).collect();
        out.sort();
        out.dedup();
        out
    }

    /// The latest `LastVerified`: when the record was last written.
    pub fn last_verified(&self) -> Option<Timestamp> {
        self.records().map(|r| r.last_verified).max()
    }
}

/// What the recorder keeps of the record it last wrote or read: each rule's
/// `Created` time by a hash of the rule, and a hash of each rule with the key
/// it is listed under — a few dozen bytes a rule where the record takes
/// about 400 (at 5,000 rules, 0.3 against 2.4 MB, held for as long as the
/// agent runs).
#[derive(Debug, Default)]
pub struct Summary {
    created: HashMap<u64, Timestamp>,
    /// `placed_hash` of every rule, sorted (a rule listed twice, twice).
    placed: Vec<u64>,
}

impl Summary {
    pub fn of(file: &StateFile) -> Summary {
        let mut created: HashMap<u64, Timestamp> = HashMap::with_capacity(file.len());
        for r in file.records() {
            // A rule listed twice (an old file) keeps its earliest time.
            created
                .entry(rule_hash(&r.id()))
                .and_modify(|t| *t = (*t).min(r.created))
                .or_insert(r.created);
        }
        Summary {
            created,
            placed: placed_hashes(file),
        }
    }

    /// When the rule `id` was first recorded, if it is in the record (under
    /// whatever key: the Go version's files are matched by the rule alone).
    pub fn created(&self, id: &RecordId) -> Option<Timestamp> {
        self.created.get(&rule_hash(id)).copied()
    }

    /// `file` holds the same rules under the same keys (times aside), as
    /// `StateFile::same_rules` tells. A 64-bit hash per rule: two tables
    /// that differ but hash alike (odds about n²/2⁶⁵) would skip one write,
    /// and the next change writes.
    pub fn same_rules(&self, file: &StateFile) -> bool {
        placed_hashes(file) == self.placed
    }
}

// SipHash with fixed keys: the same rule hashes alike for the whole run.
fn rule_hash(id: &RecordId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

fn placed_hashes(file: &StateFile) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut v: Vec<u64> = file
        .entries
        .iter()
        .flat_map(|(key, list)| {
            list.iter().map(move |r| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (key, r.id()).hash(&mut h);
                h.finish()
            })
        })
        .collect();
    v.sort_unstable();
    v
}

/// A list of more than one rule (TCP and UDP on one port) is a conflict to
/// the Go version: its `reconcileRules` deletes, kernel rules and record
/// alike, every rule `Created` before the list's latest, and programs only
/// the first of the rest; its pod events refresh only the first rule that
/// matches by pod address and port, so the rest go stale and are deleted
/// after 600 s. Written TCP first (`RecordId` order) with every later rule
/// `Created` at least a second before the first, a Go version reading the
/// record back keeps the TCP mapping and deletes the others from the kernel
/// at once, by its own rulespecs (which are ours), instead of leaving them
/// beside its rules or dropping whichever was published first.
fn go_keeps_the_first(list: &mut [NatRecord]) {
    let Some((first, rest)) = list.split_first_mut() else {
        return;
    };
    let before = first
        .created
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1))
        .unwrap_or(first.created);
    for r in rest {
        r.created = r.created.min(before);
    }
}

/// Addresses: Go's `*net.IPAddr` (`{"IP":"a.b.c.d","Zone":""}`) on write;
/// that or a plain string on read.
mod go_ip {
    use super::*;
    use serde::de::{self, MapAccess, Visitor};
    use serde::ser::SerializeStruct;

    pub fn serialize<S: serde::Serializer>(ip: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("IPAddr", 2)?;
        st.serialize_field("IP", &ip.to_string())?;
        st.serialize_field("Zone", "")?;
        st.end()
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
        d.deserialize_any(AddressVisitor)
    }

    /// Go writes IPv4 as dotted quads, but an address held in 16-byte form
    /// may come as `::ffff:a.b.c.d`; both are the same IPv4 address.
    fn ip(text: &str) -> Result<IpAddr, String> {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => Ok(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)),
            Ok(a) => Ok(a),
            Err(_) => Err(format!("{text:?} is not an IP address")),
        }
    }

    struct AddressVisitor;

    impl<'de> Visitor<'de> for AddressVisitor {
        type Value = IpAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"an IP address: "a.b.c.d" or {"IP":"a.b.c.d","Zone":""}"#)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<IpAddr, E> {
            ip(v).map_err(E::custom)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IpAddr, A::Error> {
            let mut ip: Option<String> = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == "IP" {
                    ip = Some(map.next_value()?);
                } else {
                    // "Zone" (always empty for IPv4) and anything else.
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            let ip = ip.ok_or_else(|| de::Error::missing_field("IP"))?;
            self::ip(&ip).map_err(de::Error::custom)
        }
    }
}

/// Times: RFC 3339, as Go's `time.Time` marshals (any offset on read; UTC
/// on write, the same instant).
mod go_time {
    use super::*;
    use serde::de;

    pub fn serialize<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse::<Timestamp>()
            .map_err(|e| de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} → {} ({})",
            crate::model::host_port(self.source_ip, self.source_port),
            self.protocol,
            crate::model::host_port(self.destination_ip, self.destination_port),
            self.comment
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn mapping(port: u16, proto: Proto, pod_ip: [u8; 4], owner: &str) -> Mapping {
        Mapping {
            key: NatKey {
                public_ip: Ipv4Addr::new(203, 0, 113, 7).into(),
                public_port: port,
                proto,
            },
            pod_ip: pod_ip.into(),
            pod_port: port,
            owner: PodRef::from_comment(owner).unwrap(),
            span: 0,
        }
    }

    #[test]
    fn reads_go_objects_and_plain_strings() {
        let text = r#"{"203.0.113.7:25":[
            {"Protocol":"tcp","SourceIP":{"IP":"203.0.113.7","Zone":""},"SourcePort":25,
             "DestinationIP":"10.42.0.17","DestinationPort":2525,
             "LastVerified":"2024-11-03T09:14:52.418273645+01:00",
             "Created":"0001-01-01T00:00:00Z","Comment":"mail:mx-0"}]}"#;
        let f = StateFile::parse(text).unwrap();
        let r = &f.entries["203.0.113.7:25"][0];
        assert_eq!(r.source_ip, Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(r.destination_ip, Ipv4Addr::new(10, 42, 0, 17));
        assert_eq!(r.last_verified, ts("2024-11-03T08:14:52.418273645Z"));
        assert_eq!(r.created, ts("0001-01-01T00:00:00Z"));
        assert_eq!(
            r.mapping(),
            Some(Mapping {
                pod_port: 2525,
                ..mapping(25, Proto::Tcp, [10, 42, 0, 17], "mail:mx-0")
            })
        );
    }

    #[test]
    fn writes_addresses_as_go_objects() {
        let now = ts("2025-01-02T03:04:05Z");
        let f = StateFile::from_mappings(
            &[mapping(25, Proto::Tcp, [10, 42, 0, 17], "mail:mx-0")],
            &StateFile::default(),
            now,
        );
        assert_eq!(
            f.to_json(),
            r#"{"203.0.113.7:25":[{"Protocol":"tcp","SourceIP":{"IP":"203.0.113.7","Zone":""},"SourcePort":25,"DestinationIP":{"IP":"10.42.0.17","Zone":""},"DestinationPort":25,"LastVerified":"2025-01-02T03:04:05Z","Created":"2025-01-02T03:04:05Z","Comment":"mail:mx-0"}]}"#
        );
    }

    #[test]
    fn ipv6_mappings_are_keyed_in_brackets_and_read_back() {
        let m = Mapping {
            key: NatKey {
                public_ip: "2001:db8::7".parse().unwrap(),
                public_port: 25,
                proto: Proto::Tcp,
            },
            pod_ip: "fd00:1::5".parse().unwrap(),
            pod_port: 2525,
            owner: PodRef::new("mail", "mx-0"),
            span: 0,
        };
        let now = ts("2025-01-02T03:04:05Z");
        let file = StateFile::from_mappings(std::slice::from_ref(&m), &StateFile::default(), now);
        let json = file.to_json();
        assert!(json.starts_with(r#"{"[2001:db8::7]:25":[{"Protocol":"tcp","SourceIP":{"IP":"2001:db8::7","Zone":""}"#), "{json}");
        assert!(
            json.contains(r#""DestinationIP":{"IP":"fd00:1::5","Zone":""},"DestinationPort":2525"#),
            "{json}"
        );
        assert_eq!(StateFile::parse(&json).unwrap().mappings(), vec![m]);
    }

    #[test]
    fn rejects_what_is_not_a_record() {
        for (text, needle) in [
            ("[]", "expected a map"),
            (r#"{"k":[{"Protocol":"sctp"}]}"#, "sctp"),
            (
                r#"{"k":[{"Protocol":"tcp","SourceIP":"fe80::1::2","SourcePort":1,"DestinationIP":"10.0.0.1","DestinationPort":1,"LastVerified":"2024-01-01T00:00:00Z","Created":"2024-01-01T00:00:00Z"}]}"#,
                "not an IP address",
            ),
            (
                r#"{"k":[{"Protocol":"tcp","SourceIP":{"Zone":""},"SourcePort":1}]}"#,
                "missing field `IP`",
            ),
            (
                r#"{"k":[{"Protocol":"tcp","SourceIP":"1.2.3.4","SourcePort":1,"DestinationIP":"10.0.0.1","DestinationPort":1,"LastVerified":"yesterday","Created":"2024-01-01T00:00:00Z"}]}"#,
                "not an RFC 3339 time",
            ),
        ] {
            let e = StateFile::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn created_is_kept_for_rules_that_stay_and_new_for_the_rest() {
        let t0 = ts("2024-01-01T00:00:00Z");
        let t1 = ts("2024-06-01T00:00:00Z");
        let a = mapping(25, Proto::Tcp, [10, 42, 0, 17], "mail:mx-0");
        let b = mapping(443, Proto::Tcp, [10, 42, 0, 9], "web:ingress");
        let b_udp = mapping(443, Proto::Udp, [10, 42, 0, 9], "web:ingress");
        let first = StateFile::from_mappings(&[a.clone(), b.clone()], &StateFile::default(), t0);

        // a stays; b moves to a new pod IP; a UDP twin of b appears.
        let b_moved = Mapping {
            pod_ip: Ipv4Addr::new(10, 42, 0, 10).into(),
            ..b.clone()
        };
        let second = StateFile::from_mappings(&[a.clone(), b_moved, b_udp], &first, t1);
        let created: Vec<(String, Timestamp, Timestamp)> = second
            .records()
            .map(|r| (r.id().to_string(), r.created, r.last_verified))
            .collect();
        assert_eq!(
            created,
            vec![
                (
                    "203.0.113.7:25/tcp → 10.42.0.17:25 (mail:mx-0)".into(),
                    t0,
                    t1
                ),
                (
                    "203.0.113.7:443/tcp → 10.42.0.10:443 (web:ingress)".into(),
                    t1,
                    t1
                ),
                (
                    "203.0.113.7:443/udp → 10.42.0.9:443 (web:ingress)".into(),
                    ts("2024-05-31T23:59:59Z"),
                    t1
                ),
            ]
        );
        assert_eq!(second.entries["203.0.113.7:443"].len(), 2);
        assert!(!second.same_rules(&first));
        let again =
            StateFile::from_mappings(&second.mappings(), &second, ts("2025-01-01T00:00:00Z"));
        assert!(again.same_rules(&second));
        assert_ne!(again, second, "LastVerified moved");
    }

    #[test]
    fn a_summary_tells_the_same_rules_as_the_record() {
        let t0 = ts("2024-01-01T00:00:00Z");
        let a = mapping(25, Proto::Tcp, [10, 42, 0, 17], "mail:mx-0");
        let b = mapping(443, Proto::Tcp, [10, 42, 0, 9], "web:ingress");
        let b_udp = mapping(443, Proto::Udp, [10, 42, 0, 9], "web:ingress");
        let b_other = mapping(443, Proto::Tcp, [10, 42, 0, 9], "web:other");
        let tables = [
            vec![],
            vec![a.clone()],
            vec![a.clone(), b.clone()],
            vec![a.clone(), b_udp.clone()],
            vec![b.clone(), b_udp.clone()],
            vec![a.clone(), b_other],
        ];
        for x in &tables {
            let fx = StateFile::from_mappings(x, &StateFile::default(), t0);
            let summary = Summary::of(&fx);
            for y in &tables {
                let fy = StateFile::from_mappings(y, &StateFile::default(), t0);
                assert_eq!(summary.same_rules(&fy), fx.same_rules(&fy), "{x:?} / {y:?}");
            }
        }
        // An old file that lists a rule twice is not the table once: it is
        // written again, and the rule keeps its earliest time.
        let mut twice =
            StateFile::from_mappings(std::slice::from_ref(&a), &StateFile::default(), t0);
        let list = twice.entries.get_mut("203.0.113.7:25").unwrap();
        let mut older = list[0].clone();
        older.created = ts("2023-01-01T00:00:00Z");
        list.push(older);
        let once = StateFile::from_mappings(std::slice::from_ref(&a), &twice, t0);
        assert!(!Summary::of(&twice).same_rules(&once));
        assert_eq!(
            once.records().map(|r| r.created).collect::<Vec<_>>(),
            [ts("2023-01-01T00:00:00Z")]
        );
        assert!(Summary::of(&once).same_rules(&once));
        // A rule under another key than ours (an old file): its time is
        // found by the rule alone, but the record is not the same.
        let mut moved = once.clone();
        let list = moved.entries.remove("203.0.113.7:25").unwrap();
        moved.entries.insert("203.0.113.7:0025".into(), list);
        let summary = Summary::of(&moved);
        let id = once.records().next().unwrap().id();
        assert_eq!(summary.created(&id), Some(ts("2023-01-01T00:00:00Z")));
        assert!(!summary.same_rules(&once));
        assert!(!once.same_rules(&moved));
    }

    /// What the Go version's `reconcileRules` keeps of one key's list read
    /// from `state.json` (its `fetchState` → `map[string][]*NATRule`): the
    /// rules not `Created` before the list's latest; of those it programs the
    /// first. Read from the JSON text, not from our types.
    fn go_keeps(json: &str, key: &str) -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let list = v[key].as_array().unwrap();
        let created =
            |r: &serde_json::Value| r["Created"].as_str().unwrap().parse::<Timestamp>().unwrap();
        let latest = list.iter().map(created).max().unwrap();
        let name = |r: &serde_json::Value| {
            format!("{}/{}", r["SourcePort"], r["Protocol"].as_str().unwrap())
        };
        let (kept, deleted): (Vec<_>, Vec<_>) = list.iter().partition(|r| created(r) >= latest);
        (
            kept.into_iter().map(name).collect(),
            deleted.into_iter().map(name).collect(),
        )
    }

    #[test]
    fn both_protocols_on_one_port_leave_the_go_version_the_tcp_rule() {
        let now = ts("2025-01-02T03:04:05Z");
        let sip = |proto| mapping(5060, proto, [10, 42, 0, 30], "voip:pbx-0");
        // Whichever came first, and in either order.
        for (udp_first, order) in [
            (true, [Proto::Udp, Proto::Tcp]),
            (false, [Proto::Tcp, Proto::Udp]),
        ] {
            let first = StateFile::from_mappings(
                &[sip(order[0])],
                &StateFile::default(),
                ts("2024-01-01T00:00:00Z"),
            );
            let both = StateFile::from_mappings(&[sip(order[1]), sip(order[0])], &first, now);
            let json = both.to_json();
            let (kept, deleted) = go_keeps(&json, "203.0.113.7:5060");
            assert_eq!(kept, ["5060/tcp"], "udp first: {udp_first}: {json}");
            assert_eq!(deleted, ["5060/udp"], "udp first: {udp_first}: {json}");
            // Rewriting keeps the times (the record does not churn).
            let again = StateFile::from_mappings(&both.mappings(), &both, now);
            assert_eq!(again, both);
        }
        let json = StateFile::from_mappings(
            &[sip(Proto::Tcp), sip(Proto::Udp)],
            &StateFile::default(),
            now,
        )
        .to_json();
        assert_eq!(
            json,
            r#"{"203.0.113.7:5060":[{"Protocol":"tcp","SourceIP":{"IP":"203.0.113.7","Zone":""},"SourcePort":5060,"DestinationIP":{"IP":"10.42.0.30","Zone":""},"DestinationPort":5060,"LastVerified":"2025-01-02T03:04:05Z","Created":"2025-01-02T03:04:05Z","Comment":"voip:pbx-0"},{"Protocol":"udp","SourceIP":{"IP":"203.0.113.7","Zone":""},"SourcePort":5060,"DestinationIP":{"IP":"10.42.0.30","Zone":""},"DestinationPort":5060,"LastVerified":"2025-01-02T03:04:05Z","Created":"2025-01-02T03:04:04Z","Comment":"voip:pbx-0"}]}"#
        );
    }
}
