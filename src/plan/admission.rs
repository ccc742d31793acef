//! Who may publish what, decided per annotation entry before it claims a
//! public key: the admin's namespace policy (`-namespaceselector`, the
//! namespace annotation `<annotationkey>-ports`) and the node's own services
//! (a listener of the host on the public address or the wildcard). Pure: the
//! edges read the namespaces and the sockets; the planner asks here.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::model::{Family, NatKey, PodRef, Proto};

/// What the admin allows the pods of one namespace, as the edge read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NamespacePolicy {
    /// No selector excludes it and no ports annotation limits it.
    #[default]
    Open,
    /// `-namespaceselector` does not match the namespace's labels.
    NotSelected,
    /// The ports annotation (or the namespace itself) cannot be read: the
    /// namespace publishes nothing until it is fixed.
    Invalid(String),
    /// Only these ports.
    Ports(PortAllotment),
}

impl NamespacePolicy {
    /// Why ports `port..=port + span` may not be published: a range is
    /// refused whole when the policy leaves out any of its ports. The
    /// namespace's policy is asked first: it needs no address.
    pub(crate) fn refuses_span(&self, port: u16, span: u16, proto: Proto) -> Option<RefusalReason> {
        match self {
            NamespacePolicy::Open => None,
            NamespacePolicy::NotSelected => Some(RefusalReason::NamespaceNotSelected),
            NamespacePolicy::Invalid(e) => Some(RefusalReason::NamespacePolicyInvalid(e.clone())),
            NamespacePolicy::Ports(a) if (port..=port + span).all(|p| a.allows(p, proto)) => None,
            NamespacePolicy::Ports(a) => Some(RefusalReason::PortNotAllowed(a.to_string())),
        }
    }
}

/// Ports a namespace may publish, from `25,143,587,993,10000-10100/udp`: a
/// port or an inclusive range, each for both protocols unless `/tcp` or
/// `/udp` follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortAllotment {
    ranges: Vec<(u16, u16, Option<Proto>)>,
}

impl PortAllotment {
    pub fn parse(text: &str) -> Result<PortAllotment, String> {
        let port = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
                Ok(p) => Ok(p),
            }
        };
        let mut ranges = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!("empty item in {text:?}"));
            }
            let (span, proto) = match item.split_once('/') {
                Some((span, "tcp")) => (span, Some(Proto::Tcp)),
                Some((span, "udp")) => (span, Some(Proto::Udp)),
                Some((_, p)) => {
                    return Err(format!("{item:?}: unknown protocol {p:?} (tcp or udp)"))
                }
                None => (item, None),
            };
            let (first, last) = match span.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(span)?, port(span)?),
            };
            if first > last {
                return Err(format!("{item:?}: the range runs backwards"));
            }
            ranges.push((first, last, proto));
        }
        Ok(PortAllotment { ranges })
    }

    pub fn allows(&self, port: u16, proto: Proto) -> bool {
        self.ranges
            .iter()
            .any(|&(a, b, p)| (a..=b).contains(&port) && p.is_none_or(|p| p == proto))
    }
}

impl fmt::Display for PortAllotment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b, p)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
            if let Some(p) = p {
                write!(f, "/{p}")?;
            }
        }
        Ok(())
    }
}

/// The node's own sockets that a DNAT on their port would shadow: TCP
/// listeners and unconnected (bound) UDP sockets of the host's network
/// namespace, kernel tunnel sockets (VXLAN, Geneve) included, by protocol
/// and port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeServices {
    by_port: HashMap<(Proto, u16), Vec<Bound>>,
    /// Keys the agent held when a node service appeared on them: they stay
    /// (reported, never flipped silently).
    kept: BTreeSet<NatKey>,
}

/// A socket's local address; `v6only` is false for an IPv6 wildcard that
/// also takes IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bound {
    pub addr: IpAddr,
    pub v6only: bool,
}

impl NodeServices {
    pub fn from_sockets(sockets: impl IntoIterator<Item = (Proto, u16, Bound)>) -> NodeServices {
        let mut by_port: HashMap<(Proto, u16), Vec<Bound>> = HashMap::new();
        for (proto, port, bound) in sockets {
            let list = by_port.entry((proto, port)).or_default();
            if !list.contains(&bound) {
                list.push(bound);
            }
        }
        for list in by_port.values_mut() {
            list.sort();
        }
        NodeServices {
            by_port,
            kept: BTreeSet::new(),
        }
    }

    /// The same sockets; `kept` are the keys allowed to stay on them.
    pub fn keeping(mut self, kept: BTreeSet<NatKey>) -> NodeServices {
        self.kept = kept;
        self
    }

    pub fn kept(&self) -> &BTreeSet<NatKey> {
        &self.kept
    }

    /// Same sockets (the kept keys aside)?
    pub fn same_sockets(&self, other: &NodeServices) -> bool {
        self.by_port == other.by_port
    }

    pub fn len(&self) -> usize {
        self.by_port.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_port.is_empty()
    }

    /// The node's socket that serves `key`: bound to its address, or to the
    /// wildcard of its family, or to an IPv6 wildcard that takes IPv4 too.
    pub fn serving(&self, key: &NatKey) -> Option<SocketAddr> {
        let list = self.by_port.get(&(key.proto, key.public_port))?;
        list.iter()
            .find(|b| {
                b.addr == key.public_ip
                    || (b.addr.is_unspecified()
                        && (Family::of(b.addr) == key.family()
                            || (key.family() == Family::Ipv4 && !b.v6only)))
            })
            .map(|b| SocketAddr::new(b.addr, key.public_port))
    }
}

/// Why an entry is not published although its annotation is valid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum RefusalReason {
    /// The node itself serves the port (the socket's address:port).
    NodeService(String),
    /// `-namespaceselector` does not select the pod's namespace.
    NamespaceNotSelected,
    /// The namespace's ports annotation does not list it (what it lists).
    PortNotAllowed(String),
    /// The namespace's ports annotation is malformed (why).
    NamespacePolicyInvalid(String),
}

impl RefusalReason {
    /// The `reason` label of `podnat_entries_refused_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RefusalReason::NodeService(_) => "node_service",
            RefusalReason::NamespaceNotSelected => "namespace_not_selected",
            RefusalReason::PortNotAllowed(_) => "port_not_allowed",
            RefusalReason::NamespacePolicyInvalid(_) => "namespace_policy_invalid",
        }
    }

    pub const LABELS: [&'static str; 4] = [
        "node_service",
        "namespace_not_selected",
        "port_not_allowed",
        "namespace_policy_invalid",
    ];
}

/// An entry of a valid annotation that is not published, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Refusal {
    pub pod: PodRef,
    pub entry: usize,
    pub family: Family,
    /// The public address, when one is known.
    pub public_ip: Option<IpAddr>,
    pub public_port: u16,
    /// The ports after the first (a range, refused whole).
    pub span: u16,
    pub proto: Proto,
    pub reason: RefusalReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, ns) = (self.proto, &self.pod.namespace);
        let port = if self.span == 0 {
            format!("port {}", self.public_port)
        } else {
            let end = u32::from(self.public_port) + u32::from(self.span);
            format!("ports {}-{end}", self.public_port)
        };
        match &self.reason {
            RefusalReason::NodeService(socket) => match self.public_ip {
                Some(ip) => write!(
                    f,
                    "{port}/{proto} on {ip} is served by the node itself ({socket})"
                ),
                None => write!(f, "{port}/{proto} is served by the node itself ({socket})"),
            },
            RefusalReason::NamespaceNotSelected => write!(
                f,
                "{port}/{proto}: namespace {ns} is not selected by -namespaceselector"
            ),
            RefusalReason::PortNotAllowed(allowed) => write!(
                f,
                "{port}/{proto}: namespace {ns} may publish only {allowed}"
            ),
            RefusalReason::NamespacePolicyInvalid(e) => write!(
                f,
                "{port}/{proto}: namespace {ns} publishes nothing until its ports annotation is fixed: {e}"
            ),
        }
    }
}

/// Why `key` and the `span` ports after it may not be published: a node
/// service on any of them refuses the whole range (unless the agent held
/// that port first).
pub(crate) fn node_refuses_span(
    services: &NodeServices,
    key: &NatKey,
    span: u16,
) -> Option<RefusalReason> {
    if services.is_empty() {
        return None;
    }
    (0..=span).find_map(|i| {
        let k = NatKey {
            public_port: key.public_port + i,
            ..*key
        };
        if services.kept.contains(&k) {
            return None;
        }
        services
            .serving(&k)
            .map(|s| RefusalReason::NodeService(s.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, port: u16, proto: Proto) -> NatKey {
        NatKey {
            public_ip: ip.parse().unwrap(),
            public_port: port,
            proto,
        }
    }

    fn bound(addr: &str, v6only: bool) -> Bound {
        Bound {
            addr: addr.parse().unwrap(),
            v6only,
        }
    }

    #[test]
    fn ports_annotation_parses_ranges_and_protocols() {
        let a = PortAllotment::parse("25, 143,587,993,10000-10100/udp").unwrap();
        assert!(a.allows(25, Proto::Tcp) && a.allows(25, Proto::Udp));
        assert!(a.allows(10050, Proto::Udp));
        assert!(!a.allows(10050, Proto::Tcp));
        assert!(!a.allows(2525, Proto::Tcp));
        assert_eq!(a.to_string(), "25,143,587,993,10000-10100/udp");
        for bad in ["", "25,", "0", "70000", "25/sctp", "100-90", "a-b", "25-"] {
            assert!(PortAllotment::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            PortAllotment::parse("25/sctp").unwrap_err(),
            "\"25/sctp\": unknown protocol \"sctp\" (tcp or udp)"
        );
    }

    #[test]
    fn a_node_socket_serves_its_address_and_the_wildcard_of_its_family() {
        let s = NodeServices::from_sockets([
            (Proto::Tcp, 10250, bound("0.0.0.0", false)),
            (Proto::Tcp, 8080, bound("203.0.113.5", false)),
            (Proto::Udp, 8472, bound("::", false)),
            (Proto::Tcp, 9000, bound("::", true)),
            (Proto::Tcp, 53, bound("127.0.0.1", false)),
        ]);
        assert!(s.serving(&key("203.0.113.5", 10250, Proto::Tcp)).is_some());
        assert!(s.serving(&key("203.0.113.5", 10250, Proto::Udp)).is_none());
        assert!(s.serving(&key("203.0.113.5", 8080, Proto::Tcp)).is_some());
        assert!(s.serving(&key("203.0.113.6", 8080, Proto::Tcp)).is_none());
        // An IPv6 wildcard takes IPv4 unless it is v6only.
        assert!(s.serving(&key("203.0.113.5", 8472, Proto::Udp)).is_some());
        assert!(s.serving(&key("203.0.113.5", 9000, Proto::Tcp)).is_none());
        assert!(s.serving(&key("2001:db8::7", 9000, Proto::Tcp)).is_some());
        // An IPv4 wildcard does not take IPv6; loopback serves no public key.
        assert!(s.serving(&key("2001:db8::7", 10250, Proto::Tcp)).is_none());
        assert!(s.serving(&key("203.0.113.5", 53, Proto::Tcp)).is_none());
        assert_eq!(
            s.serving(&key("203.0.113.5", 10250, Proto::Tcp)),
            Some("0.0.0.0:10250".parse().unwrap())
        );
        let k = key("203.0.113.5", 10250, Proto::Tcp);
        assert!(node_refuses_span(&s, &k, 0).is_some());
        let kept = s.clone().keeping([k].into());
        assert!(
            node_refuses_span(&kept, &k, 0).is_none(),
            "a held key stays"
        );
        assert!(kept.same_sockets(&s));
    }

    #[test]
    fn every_reason_has_its_label_listed() {
        for r in [
            RefusalReason::NodeService(String::new()),
            RefusalReason::NamespaceNotSelected,
            RefusalReason::PortNotAllowed(String::new()),
            RefusalReason::NamespacePolicyInvalid(String::new()),
        ] {
            assert!(RefusalReason::LABELS.contains(&r.metric_label()), "{r:?}");
        }
    }

    #[test]
    fn namespace_policies() {
        let p = NamespacePolicy::Ports(PortAllotment::parse("25").unwrap());
        assert_eq!(p.refuses_span(25, 0, Proto::Tcp), None);
        assert_eq!(
            p.refuses_span(26, 0, Proto::Tcp),
            Some(RefusalReason::PortNotAllowed("25".into()))
        );
        assert_eq!(
            NamespacePolicy::NotSelected.refuses_span(25, 0, Proto::Tcp),
            Some(RefusalReason::NamespaceNotSelected)
        );
        assert_eq!(NamespacePolicy::Open.refuses_span(1, 0, Proto::Udp), None);
        // A range is refused whole when the policy leaves out any port.
        let rtp = NamespacePolicy::Ports(PortAllotment::parse("10000-10100/udp").unwrap());
        assert_eq!(rtp.refuses_span(10000, 100, Proto::Udp), None);
        assert!(rtp.refuses_span(10001, 100, Proto::Udp).is_some());
        assert!(rtp.refuses_span(10000, 100, Proto::Tcp).is_some());
        // The refusal names the whole range.
        let r = Refusal {
            pod: PodRef::new("voip", "pbx"),
            entry: 0,
            family: Family::Ipv4,
            public_ip: None,
            public_port: 10001,
            span: 100,
            proto: Proto::Udp,
            reason: rtp.refuses_span(10001, 100, Proto::Udp).unwrap(),
        };
        assert_eq!(
            r.to_string(),
            "ports 10001-10101/udp: namespace voip may publish only 10000-10100/udp"
        );
    }
}
