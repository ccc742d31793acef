//! Rule sets for kernel tests, built as the planner builds them.

use std::net::{IpAddr, Ipv4Addr};

use podnat_controller::firewall::Names;
use podnat_controller::model::{ForwardRule, Mapping, NatKey, PodRef, Proto, RuleSet, SnatRule};

use super::netns::{POD_A_IP, PUBLIC_IP};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The agent's names with the default prefix.
pub fn names() -> Names {
    Names::new("podnat")
}

/// Adds a mapping public:port/proto → pod:pod_port owned by `owner`
/// (`ns:name`), with its SNAT (first per pod and protocol) and FORWARD rules.
pub fn publish(
    rules: &mut RuleSet,
    owner: &str,
    public: &str,
    port: u16,
    proto: Proto,
    pod: &str,
    pod_port: u16,
) {
    let (ns, name) = owner.split_once(':').unwrap();
    let owner = PodRef::new(ns, name);
    rules.dnat.push(Mapping {
        key: NatKey {
            public_ip: ip(public),
            public_port: port,
            proto,
        },
        pod_ip: ip(pod),
        pod_port,
        owner: owner.clone(),
        span: 0,
    });
    if !rules
        .snat
        .iter()
        .any(|s| s.pod_ip == ip(pod) && s.proto == proto)
    {
        rules.snat.push(SnatRule {
            pod_ip: ip(pod),
            proto,
            public_ip: ip(public),
            owner: owner.clone(),
        });
    }
    rules.forward.push(ForwardRule {
        pod_ip: ip(pod),
        proto,
        pod_port,
        owner,
        span: 0,
    });
    rules.normalize();
}

/// `publish` of a port range: port..=port+span → pod_port..=pod_port+span.
#[allow(clippy::too_many_arguments)]
pub fn publish_range(
    rules: &mut RuleSet,
    owner: &str,
    public: &str,
    port: u16,
    span: u16,
    proto: Proto,
    pod: &str,
    pod_port: u16,
) {
    publish(rules, owner, public, port, proto, pod, pod_port);
    let key = (ip(public), port, proto);
    for m in rules
        .dnat
        .iter_mut()
        .filter(|m| (m.key.public_ip, m.key.public_port, m.key.proto) == key)
    {
        m.span = span;
    }
    let slot = (ip(pod), pod_port, proto);
    for f in rules
        .forward
        .iter_mut()
        .filter(|f| (f.pod_ip, f.pod_port, f.proto) == slot)
    {
        f.span = span;
    }
    rules.normalize();
}

/// The mail pod of `traffic::check_mail_traffic`: 25/tcp → 2525 and
/// 5353/udp → 5300 on pod A, plus 587/tcp.
pub fn mail() -> RuleSet {
    let mut r = RuleSet::default();
    for (port, proto, pod_port) in [
        (25, Proto::Tcp, 2525),
        (587, Proto::Tcp, 587),
        (5353, Proto::Udp, 5300),
    ] {
        publish(
            &mut r,
            "mail:mx-0",
            PUBLIC_IP,
            port,
            proto,
            POD_A_IP,
            pod_port,
        );
    }
    r
}

/// `ports` TCP ports 10000.. on the public address, one pod each
/// (10.2.x.y:80, owner bulk:p-i): 3 × `ports` rules.
pub fn bulk(ports: u16) -> RuleSet {
    let mut r = RuleSet::default();
    for i in 0..ports {
        let pod = IpAddr::V4(Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1));
        let owner = PodRef::new("bulk", format!("p-{i}"));
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip: ip(PUBLIC_IP),
                public_port: 10000 + i,
                proto: Proto::Tcp,
            },
            pod_ip: pod,
            pod_port: 80,
            owner: owner.clone(),
            span: 0,
        });
        r.snat.push(SnatRule {
            pod_ip: pod,
            proto: Proto::Tcp,
            public_ip: ip(PUBLIC_IP),
            owner: owner.clone(),
        });
        r.forward.push(ForwardRule {
            pod_ip: pod,
            proto: Proto::Tcp,
            pod_port: 80,
            owner,
            span: 0,
        });
    }
    r.normalize();
    r
}
