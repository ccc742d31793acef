//! Domain types shared by the planner, the firewall backends, the views and the
//! edges (kube, state store, HTTP). Pure data: no I/O here.

use std::fmt;
use std::net::Ipv4Addr;

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
/// every rule and element carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> PodRef {
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

/// One entry of a pod's annotation, validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// `None`: use the node's auto-detected public address (ifaceAuto).
    pub src_ip: Option<Ipv4Addr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: Proto,
}

/// The identity of a published port: what two pods can fight over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NatKey {
    pub public_ip: Ipv4Addr,
    pub public_port: u16,
    pub proto: Proto,
}

impl fmt::Display for NatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.public_ip, self.public_port, self.proto)
    }
}

/// A winning mapping: traffic to `key` goes to `pod_ip:pod_port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mapping {
    pub key: NatKey,
    pub pod_ip: Ipv4Addr,
    pub pod_port: u16,
    pub owner: PodRef,
}

/// Outbound traffic of `pod_ip` with `proto` leaves with source `public_ip`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnatRule {
    pub pod_ip: Ipv4Addr,
    pub proto: Proto,
    pub public_ip: Ipv4Addr,
    pub owner: PodRef,
}

/// New connections to `pod_ip:pod_port/proto` are accepted in FORWARD.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ForwardRule {
    pub pod_ip: Ipv4Addr,
    pub proto: Proto,
    pub pod_port: u16,
    pub owner: PodRef,
}

/// Destinations that are never SNATed, so in-cluster traffic keeps the pod IP.
pub const INTERNAL_NETWORKS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// The rules that should exist in the kernel: what a backend encodes and what
/// it reads back. Every list is sorted and free of duplicates, so two tables
/// compare with `==` and diff element by element.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub dnat: Vec<Mapping>,
    pub snat: Vec<SnatRule>,
    pub forward: Vec<ForwardRule>,
}

impl RuleSet {
    pub fn is_empty(&self) -> bool {
        self.dnat.is_empty() && self.snat.is_empty() && self.forward.is_empty()
    }

    /// Number of per-mapping rules (or elements) this set programs.
    pub fn len(&self) -> usize {
        self.dnat.len() + self.snat.len() + self.forward.len()
    }

    /// Sorts and deduplicates every list (after building or reading back).
    pub fn normalize(&mut self) {
        self.dnat.sort();
        self.dnat.dedup();
        self.snat.sort();
        self.snat.dedup();
        self.forward.sort();
        self.forward.dedup();
    }
}
