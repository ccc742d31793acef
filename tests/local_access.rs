//! Node-local access and hairpin (issue 16) against the real kernel, in
//! namespaces each test creates, both flavors, both families, two pod
//! topologies: routed pods on their own veths, and pods on a Linux bridge as
//! the CNI bridge plugin wires them. A published public address:port answers
//! the node itself (nat output hook), the owner pod (hairpin) and a neighbour
//! pod; a client from outside still shows its own address; the views equal
//! `iptables-nft-save` / `ip6tables-nft-save` / `nft list`; `-localaccess=false`
//! is exactly the Go version's layout; cleanup removes everything.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::{backend_with_options, view, Backend};
use podnat_controller::model::{Families, Family, LocalPod, PodRef, Proto, RuleSet};
use support::crowd::{crowd_dual, ruleset, without_counters};
use support::netns::{veth, Netns, Sandbox, CLIENT_IP, CLIENT_IP6};
use support::rules::{names, publish};
use support::save::agent_save_by;

const PUBLIC4: &str = "203.0.113.7";
const PUBLIC6: &str = "2001:db8::7";

fn backend(flavor: Flavor, local: bool) -> Box<dyn Backend> {
    backend_with_options(
        flavor,
        names(),
        JumpPositions::default(),
        Families::DUAL,
        local,
    )
}

fn apply(ns: &Netns, flavor: Flavor, local: bool, rules: &RuleSet) {
    let rules = rules.clone();
    ns.run(move || backend(flavor, local).apply(&rules))
        .unwrap_or_else(|e| panic!("apply in {}: {e}", ns.name));
}

/// Pod A (`a4`, `a6`) publishes 25/tcp → 2525 and 5353/udp → 5300 on both
/// families; every pod address of the node is a hairpin source.
fn rules(a4: &str, a6: &str, locals: &[(&str, &str)]) -> RuleSet {
    let mut r = RuleSet::default();
    for (public, pod) in [(PUBLIC4, a4), (PUBLIC6, a6)] {
        publish(&mut r, "mail:mx-0", public, 25, Proto::Tcp, pod, 2525);
        publish(&mut r, "mail:mx-0", public, 5353, Proto::Udp, pod, 5300);
    }
    for (ip, owner) in locals {
        let (ns, name) = owner.split_once(':').unwrap();
        r.local.push(LocalPod {
            pod_ip: ip.parse().unwrap(),
            owner: PodRef::new(ns, name),
        });
    }
    r.normalize();
    r
}

/// A TCP server in `pod` on port 2525 (both families) that answers each
/// connection with the address it sees the client at.
struct Server {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(pod: &Netns) -> Server {
        // The port of the server before may still be held for a moment:
        // a process another test thread forks copies the listener's
        // descriptor until it execs (close-on-exec), and the port stays in
        // LISTEN until then. Retried briefly; any other error fails.
        let deadline = Instant::now() + Duration::from_secs(2);
        let listener = pod.run(|| loop {
            match TcpListener::bind("[::]:2525") {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => break other.unwrap(),
            }
        });
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let seen = peer.ip().to_canonical().to_string();
                        let _ = c.write_all(seen.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From `from` to `public`:25: the source address the pod's server saw, or
/// `None` when the connection fails.
fn seen_from(from: &Netns, public: &str) -> Option<String> {
    let to = SocketAddr::new(public.parse::<IpAddr>().unwrap(), 25);
    from.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    })
}

/// UDP from `from` to `public`:5353 reaches pod A on 5300.
fn udp_reaches(from: &Netns, pod: &UdpSocket, public: &str) -> bool {
    let client = from.run(|| UdpSocket::bind("[::]:0").unwrap());
    let to = SocketAddr::new(public.parse::<IpAddr>().unwrap(), 5353);
    client.send_to(b"x", to).unwrap();
    let mut buf = [0u8; 4];
    pod.recv_from(&mut buf).is_ok()
}

/// Every check of the issue for one topology: node → public (TCP, UDP), the
/// owner pod → its own public port, the neighbour → it, the client keeps
/// its address; both families.
fn check_local_traffic(node: &Netns, client: &Netns, a: &Netns, b: &Netns, node_addrs: [&str; 2]) {
    let _server = Server::start(a);
    let udp = a.run(|| UdpSocket::bind("[::]:5300").unwrap());
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for (i, public) in [PUBLIC4, PUBLIC6].into_iter().enumerate() {
        // The node itself: DNATed in the output hook.
        assert!(
            seen_from(node, public).is_some(),
            "node → {public}:25 reaches the pod"
        );
        assert!(udp_reaches(node, &udp, public), "node → {public}:5353/udp");
        // The owner pod to its own published port: hairpin, masqueraded to
        // the node's address on the pod's side.
        assert_eq!(
            seen_from(a, public).as_deref(),
            Some(node_addrs[i]),
            "pod A → {public}:25 gets its own server, from the node's address"
        );
        // A neighbour pod.
        assert!(
            seen_from(b, public).is_some(),
            "pod B → {public}:25 reaches pod A"
        );
        // From outside: the client's own address.
        let client_ip = [CLIENT_IP, CLIENT_IP6][i];
        assert_eq!(seen_from(client, public).as_deref(), Some(client_ip));
    }
}

/// The kernel holds exactly the views, with or without local access.
fn assert_views(ns: &Netns, flavor: Flavor, rules: &RuleSet, local: bool) {
    for (family, tool, fam) in [
        (Family::Ipv4, "iptables-nft-save", "ip"),
        (Family::Ipv6, "ip6tables-nft-save", "ip6"),
    ] {
        let mine = rules.of_family(family);
        match flavor {
            Flavor::Iptables => {
                let text = view::iptables_save_with(&mine, &names(), family, local);
                assert_eq!(agent_save_by(ns, tool), text, "{tool}");
                // -C finds every rule of the view as iptables-nft's own.
                let cmd = tool.trim_end_matches("-save");
                let mut table = "nat";
                for l in text.lines() {
                    if let Some(t) = l.strip_prefix('*') {
                        table = t;
                    } else if let Some(spec) = l.strip_prefix("-A ") {
                        ns.sh(&format!("{cmd} -t {table} -C {spec}"));
                    }
                }
            }
            Flavor::Nftables => assert_eq!(
                view::canonical_nft(&ns.sh(&format!("nft list table {fam} podnat"))),
                view::canonical_nft(&view::nft_with(&mine, &names(), family, local)),
                "table {fam} podnat"
            ),
        }
    }
}

fn routed(flavor: Flavor, tag: &str) {
    let sb = Sandbox::new(tag).with_ipv6();
    // A crowded node: kube-proxy, Docker, Cilium, firewalld beside the agent,
    // in both families.
    crowd_dual(&sb.node);
    let before = ruleset(&sb.node);
    let r = rules(
        "10.1.0.5",
        "fd00:1::5",
        &[
            ("10.1.0.5", "mail:mx-0"),
            ("10.1.1.5", "web:client"),
            ("fd00:1::5", "mail:mx-0"),
            ("fd00:2::5", "web:client"),
        ],
    );
    apply(&sb.node, flavor, true, &r);
    assert_views(&sb.node, flavor, &r, true);
    // Unchanged: nothing to send.
    let again = r.clone();
    let report = sb
        .node
        .run(move || backend(flavor, true).apply(&again).unwrap());
    assert_eq!(report.messages, 0, "{report:?}");
    check_local_traffic(
        &sb.node,
        &sb.client,
        &sb.pod_a,
        &sb.pod_b,
        ["10.1.0.1", "fd00:1::1"],
    );

    // Cleanup removes the new objects too, and every foreign object is as
    // it was, handles included.
    assert!(!sb
        .node
        .run(move || backend(flavor, true).cleanup().unwrap())
        .is_empty());
    assert_eq!(
        without_counters(&ruleset(&sb.node)),
        without_counters(&before),
        "foreign objects untouched"
    );
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        assert!(!agent_save_by(&sb.node, tool).contains("PODNAT"), "{tool}");
    }
    assert!(!sb.node.sh("nft list tables").contains("podnat"));
}

#[test]
fn iptables_flavor_routed_pods() {
    routed(Flavor::Iptables, "lai");
}

#[test]
fn nftables_flavor_routed_pods() {
    routed(Flavor::Nftables, "lan");
}

/// Pods on a Linux bridge (the CNI bridge plugin's wiring): the node's
/// address on the bridge is the pods' gateway.
fn bridged(flavor: Flavor, tag: &str) {
    let node = Netns::new(&format!("{tag}n"));
    let client = Netns::new(&format!("{tag}c"));
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    veth(
        &node,
        "pub0",
        "203.0.113.7/24",
        &client,
        "eth0",
        "203.0.113.1/24",
    );
    node.sh("ip -6 addr add 2001:db8::7/64 dev pub0 nodad && \
         ip link add br0 type bridge && ip link set br0 up && \
         ip addr add 10.1.0.1/24 dev br0 && ip -6 addr add fd00:1::1/64 dev br0 nodad && \
         sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
    client.sh("ip -6 addr add 2001:db8::1/64 dev eth0 nodad");
    for (pod, port, v4, v6) in [
        (&a, "vpa", "10.1.0.5", "fd00:1::5"),
        (&b, "vpb", "10.1.0.6", "fd00:1::6"),
    ] {
        veth(
            &node,
            port,
            "192.0.2.255/32",
            pod,
            "eth0",
            &format!("{v4}/24"),
        );
        // Hairpin mode on the port, as the CNI bridge plugin sets it
        // (`hairpinMode: true`): a pod's own hairpin frame goes back out the
        // port it came in on.
        node.sh(&format!(
            "ip addr flush dev {port} && ip link set {port} master br0 && \
             ip link set {port} type bridge_slave hairpin on"
        ));
        pod.sh(&format!(
            "ip -6 addr add {v6}/64 dev eth0 nodad && ip route add default via 10.1.0.1 && \
             ip -6 route add default via fd00:1::1"
        ));
    }
    for ns in [&node, &client, &a, &b] {
        ns.settle_ipv6();
    }
    let r = rules(
        "10.1.0.5",
        "fd00:1::5",
        &[
            ("10.1.0.5", "mail:mx-0"),
            ("10.1.0.6", "web:client"),
            ("fd00:1::5", "mail:mx-0"),
            ("fd00:1::6", "web:client"),
        ],
    );
    apply(&node, flavor, true, &r);
    assert_views(&node, flavor, &r, true);
    check_local_traffic(&node, &client, &a, &b, ["10.1.0.1", "fd00:1::1"]);
    // The neighbour on the bridge is masqueraded too (its replies would go
    // straight back over the bridge otherwise).
    let _server = Server::start(&a);
    assert_eq!(seen_from(&b, PUBLIC4).as_deref(), Some("10.1.0.1"));
    assert_eq!(seen_from(&b, PUBLIC6).as_deref(), Some("fd00:1::1"));
}

#[test]
fn iptables_flavor_bridged_pods() {
    bridged(Flavor::Iptables, "lbi");
}

#[test]
fn nftables_flavor_bridged_pods() {
    bridged(Flavor::Nftables, "lbn");
}

#[test]
fn local_access_off_is_exactly_the_go_layout() {
    for (flavor, tag) in [(Flavor::Iptables, "loi"), (Flavor::Nftables, "lon")] {
        let ns = Netns::new(tag);
        // Local access first, then switched off: the Go layout again, its
        // chain and jumps retired. The planner lists no hairpin source then;
        // a stray one is ignored.
        let mut r = rules("10.1.0.5", "fd00:1::5", &[("10.1.0.9", "x:y")]);
        apply(&ns, flavor, true, &r);
        assert_views(&ns, flavor, &r, true);
        apply(&ns, flavor, false, &r);
        r.local.clear();
        assert_views(&ns, flavor, &r, false);
        for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
            let all = ns.sh(tool);
            assert!(!all.contains("PODNAT_OUTPUT"), "{tool}: {all}");
        }
        if flavor == Flavor::Iptables {
            // The dry run of the same switch, fed to iptables-nft-restore /
            // ip6tables-nft-restore, leaves the same rules.
            let twin = Netns::new(&format!("{tag}t"));
            apply(&twin, flavor, true, &r);
            let rr = r.clone();
            let text = twin
                .run(move || backend(flavor, false).dry_run(&rr, false))
                .unwrap();
            assert!(text.contains("-X PODNAT_OUTPUT"), "{text}");
            let (v4, v6) = text.split_once("# ipv6\n").unwrap();
            for (part, tool) in [(v4, "iptables-nft-restore"), (v6, "ip6tables-nft-restore")] {
                let file =
                    std::env::temp_dir().join(format!("{tag}-{tool}-{}", std::process::id()));
                std::fs::write(&file, part).unwrap();
                twin.sh(&format!("{tool} --noflush < {}", file.display()));
                let _ = std::fs::remove_file(&file);
            }
            for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
                assert_eq!(
                    agent_save_by(&twin, tool),
                    agent_save_by(&ns, tool),
                    "{tool}"
                );
            }
        }
        let nat = ns.sh("iptables-nft-save -t nat");
        assert!(
            !nat.contains("PODNAT_OUTPUT") && !nat.contains("MASQUERADE"),
            "{nat}"
        );
        let again = r.clone();
        let report = ns.run(move || backend(flavor, false).apply(&again).unwrap());
        assert_eq!(report.messages, 0);
    }
}

#[test]
fn the_output_jump_goes_where_the_fourth_position_says_beside_foreign_rules() {
    let ns = Netns::new("lajump");
    ns.sh(
        "iptables-nft -t nat -N KUBE-SERVICES && for i in 1 2 3; do \
         iptables-nft -t nat -A OUTPUT -m comment --comment foreign-$i -j KUBE-SERVICES; done",
    );
    let r = rules("10.1.0.5", "fd00:1::5", &[("10.1.0.5", "mail:mx-0")]).of_family(Family::Ipv4);
    for (output, want) in [(1, 1), (-1, 4), (-2, 3), (2, 2)] {
        let jumps = JumpPositions {
            output,
            ..JumpPositions::default()
        };
        let rr = r.clone();
        ns.run(move || {
            backend_with_options(Flavor::Iptables, names(), jumps, Families::default(), true)
                .apply(&rr)
        })
        .unwrap();
        let chain: Vec<String> = ns
            .sh("iptables-nft -t nat -S OUTPUT")
            .lines()
            .filter(|l| l.starts_with("-A OUTPUT"))
            .map(str::to_string)
            .collect();
        assert_eq!(chain.len(), 4, "{chain:?}");
        let at = chain
            .iter()
            .position(|l| l.contains("PODNAT_OUTPUT"))
            .unwrap()
            + 1;
        assert_eq!(at, want, "-iptablesJump=..,{output}: {chain:?}");
        let foreign: Vec<&String> = chain.iter().filter(|l| l.contains("foreign-")).collect();
        assert_eq!(foreign.len(), 3, "foreign rules untouched");
        assert!(foreign.windows(2).all(|w| w[0] < w[1]), "in their order");
    }
}
