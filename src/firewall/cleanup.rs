//! `cleanup`: what the agent owns goes, found by its mark in both flavors
//! and both families (it need not be told what it ran with); and
//! `cleanup --for-go-version`: only what the Go version cannot manage goes,
//! so traffic keeps flowing through the rest until the Go version runs.

use std::collections::BTreeSet;

use super::flavors::{iptables::IptablesBackend, nftables::NftablesBackend};
use super::{Backend, FirewallError, Names};
use crate::config::JumpPositions;
use crate::model::{restricted_keys, Families, Family, ForwardRule, Mapping, Proto, RuleSet};

const IPV6_ONLY: Families = Families {
    ipv4: false,
    ipv6: true,
};

/// Removes everything the agent owns: both flavors, both families, local
/// access's objects and the base chains and tables it made. Returns what
/// went, a line per object kind and family. Both flavors are tried even if
/// one fails; the first error is returned.
pub fn everything(names: &Names, dry_run: bool) -> Result<Vec<String>, FirewallError> {
    let jumps = JumpPositions::default();
    let mut backends: [Box<dyn Backend>; 2] = [
        Box::new(IptablesBackend::with_options(
            names.clone(),
            jumps,
            Families::DUAL,
            true,
        )),
        Box::new(NftablesBackend::with_options(
            names.clone(),
            Families::DUAL,
            true,
        )),
    ];
    collect(backends.iter_mut().map(|b| {
        if dry_run {
            b.cleanup_dry_run()
        } else {
            b.cleanup()
        }
    }))
}

/// Leaves exactly the layout the Go version manages: the IPv4 iptables
/// chains, jumps and rules it would write for the same pods. Removed: local
/// access (nat OUTPUT's chain and jump, the MARK rules, the hairpin
/// MASQUERADE), the second protocol of a port published on both (the Go
/// version keys its record by `ip:port`; it keeps TCP), the mappings with
/// source allow-lists (the Go version cannot restrict a port: they are not
/// handed over open), every IPv6 object and the nftables flavor's tables.
/// One batch for the IPv4 change: the mappings the Go version keeps never
/// stop.
pub fn for_go_version(names: &Names, jumps: JumpPositions) -> Result<Vec<String>, FirewallError> {
    let mut lines = Vec::new();
    let mut seen = IptablesBackend::with_options(names.clone(), jumps, Families::default(), true);
    // Nothing of the iptables flavor on IPv4 (the nftables flavor ran):
    // nothing is made for the Go version, it makes its own chains.
    if let Some(rules) = seen.owned_rules()? {
        let go = go_layout(&rules);
        let mut go_backend =
            IptablesBackend::with_options(names.clone(), jumps, Families::default(), false);
        let report = go_backend.apply(&go)?;
        if report.messages > 0 {
            let v4 = rules.of_family(Family::Ipv4);
            let restricted = restricted_keys(&v4.allow);
            let open: usize = v4
                .dnat
                .iter()
                .filter(|m| restricted.binary_search(&m.key).is_err())
                .map(|m| usize::from(m.span) + 1)
                .sum();
            let second = open - go.dnat.len();
            let ranges = v4
                .dnat
                .iter()
                .filter(|m| m.span > 0 && restricted.binary_search(&m.key).is_err())
                .count();
            let restricted = restricted.len();
            lines.push(format!(
                "ip iptables: local access ({} MARK rule(s), the hairpin MASQUERADE, {}) \
                 and the counting chains of -iptablescounters where there were any, \
                 {second} port(s) on the second protocol of a port and {restricted} \
                 mapping(s) with source allow-lists removed (the Go version ignores \
                 sourceRanges and publishes those entries to every source when it runs); \
                 {ranges} port range(s) written as one rule per port; \
                 the Go version's chains and rules kept",
                rules.local.len(),
                names.output
            ));
        }
    }
    let mut rest: [Box<dyn Backend>; 2] = [
        Box::new(IptablesBackend::with_options(
            names.clone(),
            jumps,
            IPV6_ONLY,
            true,
        )),
        Box::new(NftablesBackend::with_options(
            names.clone(),
            Families::DUAL,
            true,
        )),
    ];
    lines.extend(collect(rest.iter_mut().map(|b| b.cleanup()))?);
    Ok(lines)
}

fn collect(
    results: impl Iterator<Item = Result<Vec<String>, FirewallError>>,
) -> Result<Vec<String>, FirewallError> {
    let mut lines = Vec::new();
    let mut first = None;
    for r in results {
        match r {
            Ok(l) => lines.extend(l),
            Err(e) => {
                tracing::error!("cleanup: {e}");
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(lines),
    }
}

/// The part of the IPv4 `rules` the Go version manages: no hairpin
/// sources, and of a port published on both protocols only TCP; the SNAT
/// and FORWARD rules of what is left.
fn go_layout(rules: &RuleSet) -> RuleSet {
    let mut v4 = rules.of_family(Family::Ipv4);
    // A restricted mapping is not handed over (the Go version would publish
    // it open), a range's part neither port by port.
    let restricted = restricted_keys(&v4.allow);
    v4.dnat
        .retain(|m| restricted.binary_search(&m.key).is_err());
    // The Go version writes one rule per port: a range becomes the rules it
    // makes from the state store's records, one per port. It does not know
    // `srcPortEnd`: once those records go stale it keeps each range's first
    // port only.
    v4.dnat = v4
        .dnat
        .iter()
        .flat_map(|m| {
            m.ports().map(|(key, pod_port)| Mapping {
                key,
                pod_port,
                span: 0,
                ..m.clone()
            })
        })
        .collect();
    v4.forward = v4
        .forward
        .iter()
        .flat_map(|f| {
            f.ports().map(|pod_port| ForwardRule {
                pod_port,
                span: 0,
                ..f.clone()
            })
        })
        .collect();
    v4.normalize();
    let tcp: BTreeSet<_> = v4
        .dnat
        .iter()
        .filter(|m| m.key.proto == Proto::Tcp)
        .map(|m| (m.key.public_ip, m.key.public_port))
        .collect();
    let dnat: Vec<_> = v4
        .dnat
        .into_iter()
        .filter(|m| {
            m.key.proto == Proto::Tcp || !tcp.contains(&(m.key.public_ip, m.key.public_port))
        })
        .collect();
    let forward = v4
        .forward
        .into_iter()
        .filter(|f| {
            dnat.iter()
                .any(|m| m.pod_ip == f.pod_ip && m.key.proto == f.proto && m.pod_port == f.pod_port)
        })
        .collect();
    let snat = v4
        .snat
        .into_iter()
        .filter(|s| {
            dnat.iter()
                .any(|m| m.pod_ip == s.pod_ip && m.key.proto == s.proto)
        })
        .collect();
    RuleSet {
        dnat,
        snat,
        forward,
        local: Vec::new(),
        allow: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LocalPod, NatKey, PodRef, SnatRule};
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn publish(r: &mut RuleSet, public: &str, port: u16, proto: Proto, pod: &str) {
        let owner = PodRef::new("ns", pod);
        let pod_ip = ip(if public.contains(':') {
            "fd00::5"
        } else {
            "10.1.0.5"
        });
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip: ip(public),
                public_port: port,
                proto,
            },
            pod_ip,
            pod_port: port,
            owner: owner.clone(),
            span: 0,
        });
        r.forward.push(ForwardRule {
            pod_ip,
            proto,
            pod_port: port,
            owner: owner.clone(),
            span: 0,
        });
        r.snat.push(SnatRule {
            pod_ip,
            proto,
            public_ip: ip(public),
            owner,
        });
        r.local.push(LocalPod {
            pod_ip,
            owner: PodRef::new("ns", pod),
        });
        r.normalize();
    }

    #[test]
    fn the_go_layout_keeps_tcp_of_a_two_protocol_port_and_drops_what_go_cannot_manage() {
        let mut r = RuleSet::default();
        publish(&mut r, "203.0.113.7", 53, Proto::Tcp, "dns");
        publish(&mut r, "203.0.113.7", 53, Proto::Udp, "dns");
        publish(&mut r, "2001:db8::7", 25, Proto::Tcp, "mx");
        let go = go_layout(&r);
        assert_eq!(go.dnat.len(), 1);
        assert_eq!(go.dnat[0].key.proto, Proto::Tcp);
        assert!(go.forward.iter().all(|f| f.proto == Proto::Tcp));
        assert!(go
            .snat
            .iter()
            .all(|s| s.proto == Proto::Tcp && s.pod_ip.is_ipv4()));
        assert!(go.local.is_empty());

        // A UDP port of its own keeps the pod's UDP SNAT.
        publish(&mut r, "203.0.113.7", 5060, Proto::Udp, "dns");
        let go = go_layout(&r);
        assert_eq!(go.dnat.len(), 2);
        assert!(go.snat.iter().any(|s| s.proto == Proto::Udp));
        assert_eq!(go.forward.len(), 2);

        // A restricted mapping is not handed over (it would be open), nor
        // its pod's rules; a UDP port beside a restricted TCP one stays.
        publish(&mut r, "203.0.113.7", 993, Proto::Tcp, "imap");
        publish(&mut r, "203.0.113.7", 5060, Proto::Tcp, "dns");
        let key = |port| {
            r.dnat
                .iter()
                .find(|m| m.key.public_port == port && m.key.proto == Proto::Tcp)
                .unwrap()
                .key
        };
        for (port, source) in [(993, "198.51.100.0/24"), (5060, "192.0.2.0/24")] {
            r.allow.push(crate::model::SourceRule {
                key: key(port),
                span: 0,
                source: source.parse().unwrap(),
                owner: PodRef::new("ns", "imap"),
            });
        }
        r.normalize();
        let go = go_layout(&r);
        let ports: Vec<(u16, Proto)> = go
            .dnat
            .iter()
            .map(|m| (m.key.public_port, m.key.proto))
            .collect();
        assert_eq!(ports, [(53, Proto::Tcp), (5060, Proto::Udp)]);
        assert!(go.allow.is_empty());
    }

    #[test]
    fn the_go_layout_writes_a_range_one_rule_per_port() {
        let mut r = RuleSet::default();
        publish(&mut r, "203.0.113.7", 10000, Proto::Udp, "pbx");
        publish(&mut r, "203.0.113.7", 10001, Proto::Tcp, "pbx");
        for m in r.dnat.iter_mut().filter(|m| m.key.proto == Proto::Udp) {
            m.span = 2;
            m.pod_port = 20000;
        }
        for f in r.forward.iter_mut().filter(|f| f.proto == Proto::Udp) {
            f.span = 2;
            f.pod_port = 20000;
        }
        r.normalize();
        let go = go_layout(&r);
        let ports: Vec<(u16, Proto, u16)> = go
            .dnat
            .iter()
            .map(|m| (m.key.public_port, m.key.proto, m.pod_port))
            .collect();
        // 10001/udp gives way to 10001/tcp, as a two-protocol port does.
        assert_eq!(
            ports,
            [
                (10000, Proto::Udp, 20000),
                (10001, Proto::Tcp, 10001),
                (10002, Proto::Udp, 20002)
            ]
        );
        assert!(go.dnat.iter().all(|m| m.span == 0));
        let fwd: Vec<(u16, u16)> = go.forward.iter().map(|f| (f.pod_port, f.span)).collect();
        assert_eq!(fwd, [(10001, 0), (20000, 0), (20002, 0)]);
    }
}
