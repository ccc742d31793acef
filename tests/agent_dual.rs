//! The agent end to end on a dual-stack node (issue 15): the binary in the
//! sandbox's node namespace against a real kube-apiserver, pods with an IPv4
//! and an IPv6 address in `status.podIPs`, real traffic over both families.
//! Every wait polls with a deadline; nothing here asserts on timing.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use harness::{annotation, roundtrip6, wait_for, EchoServer, World, NODE, WAIT};
use support::netns::{POD_A_IP, POD_A_IP6, POD_B_IP, POD_B_IP6, PUBLIC_IP6};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn dual_stack_pod_gets_nat_on_both_families_at_detected_addresses() {
    let w = World::new("ag6n");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // No --public-address: 203.0.113.7 and 2001:db8::7 are detected (the
    // pods' 10.x and fd00:: sides, and link-local, are filtered).
    let agent = w.start_agent_with(&["-ipfamilies=ipv4,ipv6"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running_ips("mx-a", &[POD_A_IP, POD_A_IP6]);
    wait_for("a mapping on each family", WAIT, || {
        w.dnat() == set(&["203.0.113.7:25/tcp → 10.1.0.5:2525"])
            && w.dnat6() == set(&["2001:db8::7:25/tcp → fd00:1::5:2525"])
    });
    wait_for("TCP over IPv4 and IPv6", WAIT, || {
        w.roundtrip(25) && roundtrip6(&w.sandbox.client, 25)
    });
    wait_for("one NATApplied event naming both", WAIT, || {
        w.events("mx-a", "NATApplied")
            == vec!["203.0.113.7:25/tcp → 10.1.0.5:2525, [2001:db8::7]:25/tcp → [fd00:1::5]:2525"]
    });

    // The node's IPv6 address changes: the IPv6 rules follow, IPv4 stays.
    w.sandbox.node.sh(
        "ip -6 addr add 2001:db8::8/64 dev pub0 nodad && ip -6 addr del 2001:db8::7/64 dev pub0",
    );
    wait_for("the IPv6 mapping on the new address", WAIT, || {
        w.dnat6() == set(&["2001:db8::8:25/tcp → fd00:1::5:2525"])
    });
    assert_eq!(w.dnat(), set(&["203.0.113.7:25/tcp → 10.1.0.5:2525"]));
    let moved: SocketAddr = "[2001:db8::8]:25".parse().unwrap();
    wait_for("TCP to the new IPv6 address", WAIT, || {
        support::traffic::echo_roundtrip(&w.sandbox.client, moved)
    });

    // The pod loses its IPv6 address: its IPv6 rules go, IPv4 stays.
    w.set_running_ips("mx-a", &[POD_A_IP]);
    wait_for("the IPv6 mapping removed", WAIT, || w.dnat6().is_empty());
    assert!(w.roundtrip(25));
}

#[test]
fn iptables_flavor_dual_stack_and_udp_retarget_over_ipv6() {
    let w = World::new("ag6i");
    let agent = w.start_agent_with(&[
        "--public-address",
        "203.0.113.7,2001:db8::7",
        "-ipfamilies=ipv4,ipv6",
        "-firewallflavor=iptables",
    ]);
    agent.wait_first_sync();
    let udp = r#"{"entries":[{"srcPort":5353,"dstPort":5300,"proto":"udp"}]}"#;
    w.create_pod("dns-a", NODE, Some(udp));
    w.set_running_ips("dns-a", &[POD_A_IP, POD_A_IP6]);
    wait_for("the IPv6 DNAT rule in ip6tables-nft-save", WAIT, || {
        w.sandbox.node.sh("ip6tables-nft-save -t nat").contains(
            "-A PODNAT_PRE -d 2001:db8::7/128 -p udp -m udp --dport 5353 -m comment --comment \"mail:dns-a\" -j DNAT --to-destination [fd00:1::5]:5300",
        )
    });

    // A client keeps sending from one socket (one conntrack entry); pod A
    // answers, then a newer pod B takes the port: the agent deletes the
    // entry, so the next datagram reaches pod B.
    let pod_a = w
        .sandbox
        .pod_a
        .run(|| UdpSocket::bind("[::]:5300").unwrap());
    let pod_b = w
        .sandbox
        .pod_b
        .run(|| UdpSocket::bind("[::]:5300").unwrap());
    for s in [&pod_a, &pod_b] {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let client = w.sandbox.client.run(|| UdpSocket::bind("[::]:0").unwrap());
    let to = format!("[{PUBLIC_IP6}]:5353");
    let mut buf = [0u8; 8];
    wait_for("a datagram at pod A over IPv6", WAIT, || {
        client.send_to(b"a", &to).unwrap();
        pod_a.recv_from(&mut buf).is_ok()
    });
    std::thread::sleep(Duration::from_millis(10));
    w.create_pod("dns-b", NODE, Some(udp));
    w.set_running_ips("dns-b", &[POD_B_IP, POD_B_IP6]);
    let moved = Instant::now();
    wait_for("the datagrams of the same flow at pod B", WAIT, || {
        client.send_to(b"b", &to).unwrap();
        let _ = pod_a.recv_from(&mut buf);
        pod_b.recv_from(&mut buf).is_ok()
    });
    // A figure, not an assertion (the SPEC's target is 1 s).
    eprintln!(
        "UDP flow over IPv6 moved to the new pod after {:?}",
        moved.elapsed()
    );
    let save = w.sandbox.node.sh("ip6tables-nft-save -t nat");
    assert!(save.contains("--to-destination [fd00:2::5]:5300"), "{save}");
    assert!(!save.contains("[fd00:1::5]:5300"), "{save}");
}

#[test]
fn ipv4_only_agent_ignores_ipv6_pod_ips_and_addresses() {
    let w = World::new("ag6o");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // The node and the pods have IPv6 addresses; -ipfamilies is the default.
    let agent = w.start_agent_with(&["-firewallflavor=iptables"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running_ips("mx-a", &[POD_A_IP6, POD_A_IP]);
    wait_for("TCP over IPv4", WAIT, || w.roundtrip(25));
    let v6 = r#"{"entries":[{"srcIP":"2001:db8::9","srcPort":80,"dstPort":80}]}"#;
    w.create_pod("web", NODE, Some(v6));
    w.set_running_ips("web", &[POD_B_IP, POD_B_IP6]);
    wait_for("the IPv6 srcIP refused by name", WAIT, || {
        w.events("web", "InvalidAnnotation").iter().any(|n| {
            n.contains("entries[0].srcIP: 2001:db8::9 is an IPv6 address, and ipv6 is not enabled on this node (ipfamilies=ipv4)")
        })
    });
    assert!(!roundtrip6(&w.sandbox.client, 25));
    let ip6 = w.sandbox.node.sh("nft list tables ip6");
    assert!(ip6.trim().is_empty(), "no ip6 table at all: {ip6}");
    assert!(
        !agent.log().contains("2001:db8::7"),
        "IPv6 addresses are not even looked at:\n{}",
        agent.log()
    );
}

/// `-localaccess` (the default) end to end: the planner lists the pods of
/// the node, annotated or not, as hairpin sources; the node itself and the
/// owner pod reach the published port; `-localaccess=false` does not.
#[test]
fn the_node_and_the_pod_itself_reach_its_published_port() {
    let w = World::new("aglo");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent_with(&["-ipfamilies=ipv4,ipv6", "-firewallflavor=iptables"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running_ips("mx-a", &[POD_A_IP, POD_A_IP6]);
    // A plain client pod (no annotation) of this node is a hairpin source too.
    w.create_pod("client", NODE, None);
    w.set_running_ips("client", &[POD_B_IP, POD_B_IP6]);
    wait_for("the hairpin marks of both pods", WAIT, || {
        let save = w
            .sandbox
            .node
            .sh("iptables-nft-save -t nat; ip6tables-nft-save -t nat");
        [POD_A_IP, POD_B_IP, POD_A_IP6, POD_B_IP6].iter().all(|ip| {
            save.lines()
                .any(|l| l.contains("-j MARK") && l.contains(&format!("-s {ip}/")))
        })
    });
    for public in ["203.0.113.7", PUBLIC_IP6] {
        let to = SocketAddr::new(public.parse().unwrap(), 25);
        for (who, ns) in [
            ("the node", &w.sandbox.node),
            ("the pod itself", &w.sandbox.pod_a),
            ("the client pod", &w.sandbox.pod_b),
        ] {
            wait_for(&format!("{who} → {to}"), WAIT, || {
                support::traffic::echo_roundtrip(ns, to)
            });
        }
    }
    // The client pod goes: its marks go with it.
    w.delete_pod("client");
    wait_for("the client's marks removed", WAIT, || {
        !w.sandbox
            .node
            .sh("iptables-nft-save -t nat")
            .contains(&format!("-s {POD_B_IP}/32"))
    });
    drop(agent);

    // -localaccess=false: the Go version's layout; the node's own connection
    // to the published port finds no DNAT.
    let mut off = w.start_agent_with(&[
        "-ipfamilies=ipv4,ipv6",
        "-firewallflavor=iptables",
        "-localaccess=false",
    ]);
    off.wait_first_sync();
    wait_for("the marks and the masquerade gone", WAIT, || {
        let save = w.sandbox.node.sh("iptables-nft-save -t nat");
        !save.contains("-j MARK") && !save.contains("MASQUERADE")
    });
    off.terminate();
}
