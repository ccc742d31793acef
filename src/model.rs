//! Domain types shared by the planner, the firewall backends, the views and the
//! edges (kube, state store, HTTP). Pure data: no I/O here.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Transport protocol of a mapping. Only the two the annotation allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number, as the kernel sees it (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pod by namespace and name; rendered `namespace:name`, the owner comment
/// every rule and element carries. The names are shared: every rule, element,
/// claim and copy of the table names its pod, and a clone costs no string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl PodRef {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses the owner comment back (`namespace:name`).
    pub fn from_comment(comment: &str) -> Option<PodRef> {
        let (ns, name) = comment.split_once(':')?;
        if ns.is_empty() || name.is_empty() {
            return None;
        }
        Some(PodRef::new(ns, name))
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

/// An IP address family. `Ipv4` sorts first, as `IpAddr` does, so a sorted
/// rule list holds its IPv4 rules ahead of its IPv6 ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// IPv4, the family the agent serves unless told otherwise.
impl Default for Family {
    fn default() -> Self {
        Family::Ipv4
    }
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// As `-ipfamilies` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }

    /// The nf_tables family of the tables holding this family's rules
    /// (NFPROTO_IPV4 / NFPROTO_IPV6, equal to AF_INET / AF_INET6).
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ipv4 => libc::NFPROTO_IPV4 as u8,
            Family::Ipv6 => libc::NFPROTO_IPV6 as u8,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The families the agent serves (`-ipfamilies`); IPv4 alone by default, so
/// nothing opens on IPv6 by surprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            ipv4: true,
            ipv6: false,
        }
    }
}

impl Families {
    pub const DUAL: Families = Families {
        ipv4: true,
        ipv6: true,
    };

    pub fn contains(self, f: Family) -> bool {
        match f {
            Family::Ipv4 => self.ipv4,
            Family::Ipv6 => self.ipv6,
        }
    }

    /// The enabled families, IPv4 first.
    pub fn iter(self) -> impl Iterator<Item = Family> {
        Family::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

impl fmt::Display for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Family::name).collect();
        f.write_str(&names.join(","))
    }
}

/// At most one address per family: a pod's IPs (`status.podIPs`) or the
/// node's public addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DualStack {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl DualStack {
    pub fn v4(ip: Ipv4Addr) -> DualStack {
        DualStack {
            v4: Some(ip),
            v6: None,
        }
    }

    pub fn get(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::Ipv4 => self.v4.map(IpAddr::V4),
            Family::Ipv6 => self.v6.map(IpAddr::V6),
        }
    }

    /// Sets the address of `ip`'s family; a second one of the same family is
    /// ignored (the first counts, as in `status.podIPs`).
    pub fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.v4.get_or_insert(a);
            }
            IpAddr::V6(a) => {
                self.v6.get_or_insert(a);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// The addresses there are, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

impl FromIterator<IpAddr> for DualStack {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        let mut d = DualStack::default();
        for ip in iter {
            d.add(ip);
        }
        d
    }
}

impl fmt::Display for DualStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.iter().map(|ip| ip.to_string()).collect();
        if all.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&all.join(","))
        }
    }
}

/// `address:port`, with IPv6 addresses in brackets (`[2001:db8::7]:25`).
pub fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// One entry of a pod's annotation, validated, for one address family: an
/// auto entry (`ifaceAuto`) serving two families is two mappings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// `None`: use the node's auto-detected public address (ifaceAuto).
    pub src_ip: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: Proto,
    /// The family of `src_ip`, or the one this auto entry is published on.
    pub family: Family,
    /// The entry's index in the annotation's `entries`.
    pub entry: usize,
    /// `sourceRanges` of this mapping's family, aggregated (no two overlap);
    /// `None`: every source may reach it. Never empty: an entry whose
    /// ranges leave out a family is not published on that family.
    #[serde(default)]
    pub sources: Option<Arc<[ipnet::IpNet]>>,
    /// `srcPortEnd - srcPort`: ports after the first, published with one
    /// offset (0: one port).
    #[serde(default)]
    pub span: u16,
}

impl PortMapping {
    /// The last public port (`srcPortEnd`, or `srcPort`).
    pub fn src_end(&self) -> u16 {
        self.src_port + self.span
    }

    /// The last pod port.
    pub fn dst_end(&self) -> u16 {
        self.dst_port + self.span
    }
}

/// The identity of a published port: what two pods can fight over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NatKey {
    pub public_ip: IpAddr,
    pub public_port: u16,
    pub proto: Proto,
}

impl fmt::Display for NatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            host_port(self.public_ip, self.public_port),
            self.proto
        )
    }
}

impl NatKey {
    pub fn family(&self) -> Family {
        Family::of(self.public_ip)
    }

    /// This key and the `span` keys after it (a range's part, port by port).
    pub fn run(self, span: u16) -> impl Iterator<Item = NatKey> {
        (0..=span).map(move |i| NatKey {
            public_port: self.public_port + i,
            ..self
        })
    }
}

/// A winning mapping: traffic to `key` goes to `pod_ip:pod_port`; with a
/// `span`, the `span` ports after `key`'s too, one offset (`srcPortEnd`:
/// port `key.public_port + i` to `pod_port + i`). A pod that won part of a
/// range holds one mapping per part it won.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mapping {
    pub key: NatKey,
    pub pod_ip: IpAddr,
    pub pod_port: u16,
    pub owner: PodRef,
    /// Ports after the first (0: one port).
    #[serde(default)]
    pub span: u16,
}

impl Mapping {
    /// The last public port (the first's for a single port).
    pub fn port_end(&self) -> u16 {
        self.key.public_port + self.span
    }

    /// Each published port with its pod port, in order.
    pub fn ports(&self) -> impl Iterator<Item = (NatKey, u16)> + '_ {
        // Not `pod_port..`: stepping past the last port may overflow.
        let pod_ports = (0..=self.span).map(move |i| self.pod_port + i);
        self.key.run(self.span).zip(pod_ports)
    }

    /// Does it publish `port` of `key`'s address and protocol?
    pub fn covers(&self, key: &NatKey) -> bool {
        key.public_ip == self.key.public_ip
            && key.proto == self.key.proto
            && (self.key.public_port..=self.port_end()).contains(&key.public_port)
    }
}

/// Outbound traffic of `pod_ip` with `proto` leaves with source `public_ip`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnatRule {
    pub pod_ip: IpAddr,
    pub proto: Proto,
    pub public_ip: IpAddr,
    pub owner: PodRef,
}

/// New connections to `pod_ip:pod_port/proto` are accepted in FORWARD (and
/// to the `span` pod ports after it: a range's part).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ForwardRule {
    pub pod_ip: IpAddr,
    pub proto: Proto,
    pub pod_port: u16,
    pub owner: PodRef,
    /// Pod ports after the first (0: one port).
    #[serde(default)]
    pub span: u16,
}

impl ForwardRule {
    /// Each pod port it accepts, in order.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=self.span).map(move |i| self.pod_port + i)
    }
}

/// A pod on this node, by address (`-localaccess`): its new connections to
/// an address of the node are marked and masqueraded to the node (hairpin),
/// so that the replies of a pod it reaches through a published port come back
/// through the NAT. One per address; when two pods share one (an old pod not
/// gone yet), the greater `namespace/name` owns it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LocalPod {
    pub pod_ip: IpAddr,
    pub owner: PodRef,
}

/// Only sources in `source` may reach `key` (the entry's `sourceRanges`,
/// issue 25): one per allowed range of the key's family. A key with any is
/// restricted — other sources are dropped before its DNAT, the node's own
/// connections and its pods' (local access, hairpin) included.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceRule {
    pub key: NatKey,
    /// The ports after `key`'s it restricts too: its mapping's `span`
    /// (a range's part, `srcPortEnd`).
    #[serde(default)]
    pub span: u16,
    pub source: ipnet::IpNet,
    pub owner: PodRef,
}

/// The ranges of `key` in a sorted allow-list (a binary search).
pub fn allow_of<'a>(allow: &'a [SourceRule], key: &NatKey) -> &'a [SourceRule] {
    let start = allow.partition_point(|a| a.key < *key);
    let len = allow[start..].partition_point(|a| a.key == *key);
    &allow[start..start + len]
}

/// The distinct keys of a sorted allow-list: the restricted mappings' first
/// keys, sorted.
pub fn restricted_keys(allow: &[SourceRule]) -> Vec<NatKey> {
    let mut keys: Vec<NatKey> = allow.iter().map(|a| a.key).collect();
    keys.dedup();
    keys
}

/// Every restricted port's key of a sorted allow-list (a range's part
/// port by port), sorted: the nftables flavor's `source_restricted`.
pub fn source_restricted_ports(allow: &[SourceRule]) -> Vec<NatKey> {
    let mut keys: Vec<NatKey> = Vec::with_capacity(allow.len());
    let mut last: Option<(NatKey, u16)> = None;
    for a in allow {
        if last == Some((a.key, a.span)) {
            continue;
        }
        last = Some((a.key, a.span));
        keys.extend(a.key.run(a.span));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Destinations that are never SNATed, so in-cluster traffic keeps the pod IP.
pub const INTERNAL_NETWORKS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// The IPv6 destinations never SNATed: unique local (fc00::/7, where pods
/// live), link-local and loopback.
pub const INTERNAL_NETWORKS_V6: [(Ipv6Addr, u8); 3] = [
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::LOCALHOST, 128),
];

/// How many items of a sorted rule list are IPv4 (they sort first).
fn ipv4_len<T>(v: &[T], ip: impl Fn(&T) -> IpAddr) -> usize {
    v.partition_point(|x| ip(x).is_ipv4())
}

/// The destinations a family's SNAT skips, in the model's order.
pub fn internal_networks(f: Family) -> Vec<(IpAddr, u8)> {
    match f {
        Family::Ipv4 => INTERNAL_NETWORKS
            .iter()
            .map(|(n, l)| (IpAddr::V4(*n), *l))
            .collect(),
        Family::Ipv6 => INTERNAL_NETWORKS_V6
            .iter()
            .map(|(n, l)| (IpAddr::V6(*n), *l))
            .collect(),
    }
}

/// The rules that should exist in the kernel: what a backend encodes and what
/// it reads back. Every list is sorted and free of duplicates, so two tables
/// compare with `==` and diff element by element.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub dnat: Vec<Mapping>,
    pub snat: Vec<SnatRule>,
    pub forward: Vec<ForwardRule>,
    /// Hairpin sources (empty with `-localaccess=false`).
    #[serde(default)]
    pub local: Vec<LocalPod>,
    /// Source allow-lists of restricted keys (`sourceRanges`).
    #[serde(default)]
    pub allow: Vec<SourceRule>,
}

impl RuleSet {
    pub fn is_empty(&self) -> bool {
        self.dnat.is_empty()
            && self.snat.is_empty()
            && self.forward.is_empty()
            && self.local.is_empty()
            && self.allow.is_empty()
    }

    /// Number of per-mapping rules (or elements) this set programs.
    pub fn len(&self) -> usize {
        self.dnat.len() + self.snat.len() + self.forward.len() + self.local.len() + self.allow.len()
    }

    /// The rules of one family (a sorted list holds IPv4 first: a split,
    /// no walk).
    pub fn of_family(&self, f: Family) -> RuleSet {
        fn part<T: Clone>(v: &[T], ip: impl Fn(&T) -> IpAddr, f: Family) -> Vec<T> {
            let cut = ipv4_len(v, ip);
            match f {
                Family::Ipv4 => v[..cut].to_vec(),
                Family::Ipv6 => v[cut..].to_vec(),
            }
        }
        RuleSet {
            dnat: part(&self.dnat, |m| m.key.public_ip, f),
            snat: part(&self.snat, |s| s.pod_ip, f),
            forward: part(&self.forward, |r| r.pod_ip, f),
            local: part(&self.local, |l| l.pod_ip, f),
            allow: part(&self.allow, |a| a.key.public_ip, f),
        }
    }

    /// Per list — `dnat`, `snat`, `forward`, `hairpin` (`local`) — how many
    /// of its rules are IPv4 and how many IPv6 (a split, as `of_family`).
    pub fn counts(&self) -> [(&'static str, [usize; 2]); 5] {
        fn split<T>(v: &[T], ip: impl Fn(&T) -> IpAddr) -> [usize; 2] {
            let v4 = ipv4_len(v, ip);
            [v4, v.len() - v4]
        }
        [
            ("dnat", split(&self.dnat, |m| m.key.public_ip)),
            ("snat", split(&self.snat, |s| s.pod_ip)),
            ("forward", split(&self.forward, |r| r.pod_ip)),
            ("hairpin", split(&self.local, |l| l.pod_ip)),
            ("source", split(&self.allow, |a| a.key.public_ip)),
        ]
    }

    /// Each DNAT mapping with the sources it admits, in the order of
    /// `dnat` then of the ranges: `None` for an open mapping, one pair per
    /// range for a restricted one (the iptables flavor's DNAT rules, one
    /// per allowed range, as `-s` needs). A walk of two sorted lists.
    pub fn dnat_sources(&self) -> Vec<(&Mapping, Option<ipnet::IpNet>)> {
        let mut out = Vec::with_capacity(self.dnat.len() + self.allow.len());
        let mut allow = self.allow.iter().peekable();
        for m in &self.dnat {
            while allow.next_if(|a| a.key < m.key).is_some() {}
            let before = out.len();
            while let Some(a) = allow.next_if(|a| a.key == m.key) {
                out.push((m, Some(a.source)));
            }
            if out.len() == before {
                out.push((m, None));
            }
        }
        out
    }

    /// Sorts and deduplicates every list (after building or reading back).
    pub fn normalize(&mut self) {
        self.dnat.sort();
        self.dnat.dedup();
        self.snat.sort();
        self.snat.dedup();
        self.forward.sort();
        self.forward.dedup();
        self.allow.sort();
        self.allow.dedup();
        // One per address, the greater owner (as the planner decides).
        self.local.sort();
        self.local.dedup_by(|later, kept| {
            let same = later.pod_ip == kept.pod_ip;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
    }
}
