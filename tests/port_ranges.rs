//! Port ranges (`srcPortEnd`, issue 25) in both flavors, against the real
//! kernel on a crowded dual-stack node, planned from annotations by the
//! real planner: a 100-port UDP range with an offset reaches the right pod
//! port at three ports across it; a newer pod claiming part of the range
//! wins only that part; the kernel equals the view (`nft list`, or
//! `iptables-nft-save` / `ip6tables-nft-save` and `-C` for each rule),
//! reads back as the same parts (a re-apply sends nothing), counts each
//! part's datagrams (nftables), and gives the range back whole when the
//! newer pod goes.

mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::flavors::nftables::read_traffic;
use podnat_controller::firewall::{backend_with_options, Backend};
use podnat_controller::model::{DualStack, Families, Family, PodRef, Proto, RuleSet};
use podnat_controller::plan::{plan, NamespacePolicy, PlanConfig, PodFacts};
use support::crowd::crowd_dual;
use support::netns::{Netns, Sandbox, POD_A_IP, POD_A_IP6, POD_B_IP, POD_B_IP6};
use support::rules::names;
use support::save::assert_kernel_holds_view;

const PUBLIC4: &str = "203.0.113.7";
const PUBLIC6: &str = "2001:db8::7";
// The same ports on TCP too: in key order the two ranges' ports
// interleave, and each must still read back as one mapping.
const RTP: &str = r#"{"entries":[{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp"},{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000}]}"#;
const PART: &str =
    r#"{"entries":[{"srcPort":10040,"srcPortEnd":10059,"dstPort":30040,"proto":"udp"}]}"#;

fn backend(flavor: Flavor) -> Box<dyn Backend> {
    backend_with_options(
        flavor,
        names(),
        JumpPositions::default(),
        Families::DUAL,
        true,
    )
}

fn pod(name: &str, v4: &str, v6: &str, created: i64, annotation: &str) -> PodFacts {
    let mut ips = DualStack::default();
    ips.add(v4.parse().unwrap());
    ips.add(v6.parse().unwrap());
    PodFacts {
        pod: PodRef::new("voip", name),
        node: Some("node1".into()),
        ips,
        created: Some(k8s_openapi::jiff::Timestamp::from_second(created).unwrap()),
        ready: true,
        terminating: false,
        finished: false,
        annotation: Some(annotation.into()),
        host_network: false,
        namespace_policy: NamespacePolicy::Open,
    }
}

fn planned(pods: &[PodFacts]) -> RuleSet {
    let cfg = PlanConfig {
        node_id: "node1".into(),
        restricted_ports: [22, 53, 6443].into(),
        families: Families::DUAL,
        local_access: true,
        source_ranges: true,
    };
    let address =
        DualStack::from_iter([PUBLIC4.parse::<IpAddr>().unwrap(), PUBLIC6.parse().unwrap()]);
    let t = plan(pods, address, &cfg);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    t.rules
}

/// Applies `rules` whole, checks the kernel against the view, and that a
/// second apply (which reads the rules back) finds nothing to do.
fn apply_and_check(ns: &Netns, flavor: Flavor, rules: &RuleSet) {
    let r = rules.clone();
    ns.run(move || backend(flavor).apply(&r)).unwrap();
    assert_kernel_holds_view(ns, flavor, rules);
    let again = rules.clone();
    let report = ns.run(move || backend(flavor).apply(&again)).unwrap();
    assert_eq!(
        report.messages, 0,
        "the parts read back as planned: {report:?}"
    );
    let read = ns.run(move || backend(flavor).read()).unwrap();
    assert_eq!(&read.dnat, &rules.dnat, "one mapping per part, read back");
    assert_eq!(&read.forward, &rules.forward);
    assert_eq!(&read.allow, &rules.allow, "one allowed range per part");
}

/// The nftables flavor's dry run of `rules`, fed to `nft -f`, makes what
/// apply makes (every part's per-port elements, their comments too): an
/// apply then sends nothing. The dry run's text.
fn dry_run_through_nft(ns: &Netns, rules: &RuleSet) -> String {
    let r = rules.clone();
    let text = ns
        .run(move || backend(Flavor::Nftables).dry_run(&r, false))
        .unwrap();
    ns.sh(&format!("nft -f - <<'EOF'\n{text}EOF"));
    let r = rules.clone();
    let report = ns.run(move || backend(Flavor::Nftables).apply(&r)).unwrap();
    assert_eq!(report.messages, 0, "the dry run was the change: {text}");
    text
}

/// UDP sockets on pod A's ports 20000, 20050, 20099 (the range's first,
/// middle and last) and pod B's 30050, by port.
fn pod_sockets(sb: &Sandbox) -> Vec<(u16, UdpSocket)> {
    let bind = |ns: &Netns, port: u16| ns.run(|| UdpSocket::bind(("::", port)).unwrap());
    let mut v: Vec<(u16, UdpSocket)> = [20000, 20050, 20099]
        .into_iter()
        .map(|p| (p, bind(&sb.pod_a, p)))
        .collect();
    v.push((30050, bind(&sb.pod_b, 30050)));
    v
}

/// Sends one datagram from the client to `public:port`; the pod socket in
/// `sockets` that receives it, by its port.
fn lands(sb: &Sandbox, public: &str, port: u16, sockets: &[(u16, &UdpSocket)]) -> Option<u16> {
    lands_from(&sb.client, public, port, sockets)
}

/// `lands`, sent from `from`.
fn lands_from(from: &Netns, public: &str, port: u16, sockets: &[(u16, &UdpSocket)]) -> Option<u16> {
    let to = SocketAddr::new(public.parse().unwrap(), port);
    from.run(|| {
        let s = UdpSocket::bind(if public.contains(':') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        })
        .unwrap();
        // A drop in the output path (the node's own datagram to a
        // restricted key, nftables flavor) is EPERM to the sender: it lands
        // nowhere.
        if let Err(e) = s.send_to(&port.to_be_bytes(), to) {
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        }
    });
    let mut buf = [0u8; 16];
    for (at, s) in sockets {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            assert_eq!(
                &buf[..n],
                &port.to_be_bytes(),
                "the datagram sent to {port}"
            );
            return Some(*at);
        }
    }
    None
}

#[test]
fn a_port_range_with_an_offset_is_shared_per_port_and_given_back_whole() {
    shared_per_port_and_given_back_whole(Flavor::Nftables, "rng");
}

/// The iptables flavor writes a part as one DNAT rule (`--dport N:M`,
/// `--to-destination A:P-Q/N`) and one FORWARD rule (`--dport P:Q`).
#[test]
fn a_port_range_with_an_offset_is_shared_per_port_and_given_back_whole_iptables() {
    shared_per_port_and_given_back_whole(Flavor::Iptables, "rngi");
}

fn shared_per_port_and_given_back_whole(flavor: Flavor, name: &str) {
    let sb = Sandbox::new(name).with_ipv6();
    crowd_dual(&sb.node);
    let pbx = pod("pbx", POD_A_IP, POD_A_IP6, 100, RTP);
    let probe = pod("probe", POD_B_IP, POD_B_IP6, 200, PART);

    // The pbx alone: 100 ports, one mapping per family and protocol.
    let alone = planned(std::slice::from_ref(&pbx));
    assert_eq!(alone.dnat.len(), 4);
    apply_and_check(&sb.node, flavor, &alone);
    if flavor == Flavor::Iptables {
        // One DNAT rule per range (and family), not one per port.
        let save = sb.node.sh("iptables-nft-save; ip6tables-nft-save");
        assert_eq!(save.matches("--dport 10000:10099").count(), 4, "{save}");
        let ours = save
            .lines()
            .filter(|l| l.starts_with("-A PODNAT_PRE") && l.contains("-j DNAT"));
        assert_eq!(ours.count(), 4, "{save}");
    }

    let owned = pod_sockets(&sb);
    let sockets: Vec<(u16, &UdpSocket)> = owned.iter().map(|(p, s)| (*p, s)).collect();
    for public in [PUBLIC4, PUBLIC6] {
        for (port, want) in [(10000, 20000), (10050, 20050), (10099, 20099)] {
            assert_eq!(
                lands(&sb, public, port, &sockets),
                Some(want),
                "{public}:{port}"
            );
        }
    }

    // The newer probe claims 10040-10059: it wins that part only.
    let both = planned(&[pbx.clone(), probe]);
    let v4 = both.of_family(Family::Ipv4);
    let parts: Vec<(u16, u16, &str)> = v4
        .dnat
        .iter()
        .filter(|m| m.key.proto == Proto::Udp)
        .map(|m| (m.key.public_port, m.port_end(), &*m.owner.name))
        .collect();
    assert_eq!(
        parts,
        [
            (10000, 10039, "pbx"),
            (10040, 10059, "probe"),
            (10060, 10099, "pbx")
        ]
    );
    if flavor == Flavor::Nftables {
        let text = dry_run_through_nft(&sb.node, &both);
        assert!(text.contains("\"10040-10059 voip:probe\""), "{text}");
    }
    apply_and_check(&sb.node, flavor, &both);
    // The conntrack entries of the moved ports go with the change, as the
    // agent flushes them; here each datagram comes from a new source port.
    for public in [PUBLIC4, PUBLIC6] {
        for (port, want) in [(10000, 20000), (10050, 30050), (10099, 20099)] {
            assert_eq!(
                lands(&sb, public, port, &sockets),
                Some(want),
                "{public}:{port}"
            );
        }
    }

    // Each part counts its own datagrams: the probe's one per family
    // (nftables; the iptables flavor keeps no counters per mapping).
    let traffic = sb
        .node
        .run(|| read_traffic(&names(), Families::DUAL, 0))
        .unwrap();
    assert_eq!(traffic.is_some(), flavor == Flavor::Nftables);
    for m in both
        .dnat
        .iter()
        .filter(|m| traffic.is_some() && m.key.proto == Proto::Udp)
    {
        let traffic = traffic.as_deref().unwrap_or_default();
        let sum: u64 = traffic
            .iter()
            .filter(|t| m.covers(&t.key))
            .map(|t| t.packets)
            .sum();
        // One datagram to each part since the split (the pbx's parts are
        // elements made anew then, so they count from then).
        let want = 1;
        assert_eq!(sum, want, "{}-{}", m.key, m.port_end());
    }

    // The probe goes: the pbx has the whole range again, one mapping.
    let back = planned(std::slice::from_ref(&pbx));
    assert_eq!(back, alone);
    if flavor == Flavor::Nftables {
        // The parts joined again: the whole range's elements come back.
        let text = dry_run_through_nft(&sb.node, &back);
        assert!(text.contains("\"10000-10099 voip:pbx\""), "{text}");
    }
    apply_and_check(&sb.node, flavor, &back);
    for public in [PUBLIC4, PUBLIC6] {
        assert_eq!(
            lands(&sb, public, 10050, &sockets),
            Some(20050),
            "{public}:10050"
        );
    }
}

/// Two pods on one address (hostNetwork pods, or an address reused before
/// the old pod is gone) whose pod ports overlap: each pod port is accepted
/// once, by the newer pod's rule, the older pod's range cut around it — a
/// second element or rule for the same port would make the whole batch
/// fail (the nftables flavor's set refuses a duplicate).
#[test]
fn pods_sharing_an_address_accept_each_pod_port_once() {
    for (flavor, name) in [(Flavor::Nftables, "rngs"), (Flavor::Iptables, "rngsi")] {
        let sb = Sandbox::new(name).with_ipv6();
        crowd_dual(&sb.node);
        let pbx = pod("pbx", POD_A_IP, POD_A_IP6, 100, RTP);
        let sip = pod(
            "sip",
            POD_A_IP,
            POD_A_IP6,
            200,
            r#"{"entries":[{"srcPort":5060,"dstPort":20050,"proto":"udp"}]}"#,
        );
        let both = planned(&[pbx, sip]);
        let v4 = both.of_family(Family::Ipv4);
        let runs: Vec<(u16, u16, &str)> = v4
            .forward
            .iter()
            .filter(|f| f.proto == Proto::Udp)
            .map(|f| (f.pod_port, f.pod_port + f.span, &*f.owner.name))
            .collect();
        assert_eq!(
            runs,
            [
                (20000, 20049, "pbx"),
                (20050, 20050, "sip"),
                (20051, 20099, "pbx")
            ]
        );
        apply_and_check(&sb.node, flavor, &both);
        let sock = sb.pod_a.run(|| UdpSocket::bind(("::", 20050)).unwrap());
        for public in [PUBLIC4, PUBLIC6] {
            for port in [10050, 5060] {
                assert_eq!(
                    lands(&sb, public, port, &[(20050, &sock)]),
                    Some(20050),
                    "{flavor:?} {public}:{port}"
                );
            }
        }
    }
}

/// A range restricted to sources (`srcPortEnd` with `sourceRanges`): the
/// client in the ranges reaches ports across it, the node (local access,
/// its address not listed) none; a newer open pod winning a middle part
/// opens exactly that part. One allowed range is one element per part
/// (nftables: the ports as an interval) or one DNAT rule per part and
/// range (iptables).
#[test]
fn a_restricted_port_range_admits_only_its_sources() {
    const RESTRICTED: &str = r#"{"entries":[{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp","sourceRanges":["203.0.113.0/30","2001:db8::/126"]}]}"#;
    for (flavor, name) in [(Flavor::Nftables, "rngr"), (Flavor::Iptables, "rngri")] {
        let sb = Sandbox::new(name).with_ipv6();
        crowd_dual(&sb.node);
        let pbx = pod("pbx", POD_A_IP, POD_A_IP6, 100, RESTRICTED);
        let probe = pod("probe", POD_B_IP, POD_B_IP6, 200, PART);
        let owned = pod_sockets(&sb);
        let sockets: Vec<(u16, &UdpSocket)> = owned.iter().map(|(p, s)| (*p, s)).collect();

        let alone = planned(std::slice::from_ref(&pbx));
        assert_eq!(alone.allow.len(), 2, "{:?}", alone.allow);
        assert!(alone.allow.iter().all(|a| a.span == 99));
        apply_and_check(&sb.node, flavor, &alone);
        for public in [PUBLIC4, PUBLIC6] {
            for (port, want) in [(10000, 20000), (10050, 20050), (10099, 20099)] {
                let got = lands(&sb, public, port, &sockets);
                assert_eq!(got, Some(want), "{flavor:?} client → {public}:{port}");
            }
            let got = lands_from(&sb.node, public, 10050, &sockets);
            assert_eq!(got, None, "{flavor:?} node → {public}:10050");
        }

        // The open probe wins 10040-10059: that part is open, the pbx's
        // parts stay restricted.
        let both = planned(&[pbx, probe]);
        let parts: Vec<(u16, u16)> = both
            .allow
            .iter()
            .map(|a| (a.key.public_port, a.span))
            .collect();
        assert_eq!(parts, [(10000, 39), (10060, 39), (10000, 39), (10060, 39)]);
        apply_and_check(&sb.node, flavor, &both);
        for public in [PUBLIC4, PUBLIC6] {
            let got = lands_from(&sb.node, public, 10050, &sockets);
            assert_eq!(
                got,
                Some(30050),
                "{flavor:?} node → {public}:10050, open now"
            );
            let got = lands_from(&sb.node, public, 10060, &sockets);
            assert_eq!(got, None, "{flavor:?} node → {public}:10060");
            let got = lands(&sb, public, 10099, &sockets);
            assert_eq!(got, Some(20099), "{flavor:?} client → {public}:10099");
        }
    }
}
