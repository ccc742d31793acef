//! The agent end to end (issue 7): the binary runs in a sandbox's node
//! namespace against a real kube-apiserver, as the agent identity with only
//! the RBAC of tests/fixtures/rbac.yaml. There is no kubelet: the tests bind
//! pods to `node1` themselves and write their status as a kubelet would, with
//! the sandbox's pod addresses as pod IPs, so real traffic crosses the NAT.
//! Every wait polls with a deadline; nothing here asserts on timing.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::{annotation, wait_for, ClientLoop, EchoServer, World, NODE, WAIT};
use support::netns::{POD_A_IP, POD_B_IP};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn annotated_pod_gets_nat_that_follows_edits_and_deletion() {
    let w = World::new("agnat");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent(&["-informerresync=1"]);
    agent.wait_first_sync();

    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    let first = set(&["203.0.113.7:25/tcp → 10.1.0.5:2525"]);
    wait_for("the mapping in the kernel", WAIT, || w.dnat() == first);
    wait_for("TCP through 203.0.113.7:25", WAIT, || w.roundtrip(25));
    wait_for("a NATApplied event", WAIT, || {
        w.events("mx-a", "NATApplied") == vec!["203.0.113.7:25/tcp → 10.1.0.5:2525"]
    });

    // Resyncs (every second here) re-apply but do not repeat the event.
    let resyncs = agent.count("periodic resync");
    wait_for("two more resyncs", WAIT, || {
        agent.count("periodic resync") >= resyncs + 2
    });
    assert_eq!(w.events("mx-a", "NATApplied").len(), 1);
    assert_eq!(w.dnat(), first);

    // The annotation is edited: the rules follow.
    w.set_annotation("mx-a", &annotation(&[(26, 2525), (587, 2525)]));
    let second = set(&[
        "203.0.113.7:26/tcp → 10.1.0.5:2525",
        "203.0.113.7:587/tcp → 10.1.0.5:2525",
    ]);
    wait_for("the edited mappings", WAIT, || w.dnat() == second);
    assert!(w.roundtrip(26) && w.roundtrip(587));
    assert!(!w.roundtrip(25), "port 25 is no longer forwarded");
    wait_for("a second NATApplied event", WAIT, || {
        w.events("mx-a", "NATApplied").last().map(String::as_str)
            == Some("203.0.113.7:26/tcp → 10.1.0.5:2525, 203.0.113.7:587/tcp → 10.1.0.5:2525")
    });

    // The pod is deleted: the rules go.
    w.delete_pod("mx-a");
    wait_for("the mappings removed", WAIT, || w.dnat().is_empty());
    assert!(!w.roundtrip(26));
    wait_for("a NATRemoved event", WAIT, || {
        w.events("mx-a", "NATRemoved")
            == vec![
                "removed 203.0.113.7:26/tcp → 10.1.0.5:2525, 203.0.113.7:587/tcp → 10.1.0.5:2525",
            ]
    });
}

#[test]
fn newer_pod_wins_a_port_and_the_older_takes_over_when_it_goes() {
    let w = World::new("agwin");
    let _echo_a = EchoServer::start(&w.sandbox.pod_a, 25);
    let echo_b = EchoServer::start(&w.sandbox.pod_b, 25);
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();

    w.create_pod("old", NODE, Some(&annotation(&[(25, 25)])));
    w.set_running("old", POD_A_IP);
    wait_for("old holds port 25", WAIT, || {
        w.dnat() == set(&["203.0.113.7:25/tcp → 10.1.0.5:25"])
    });
    // creationTimestamp has one-second resolution: make "new" clearly newer
    // (the name would break a tie the same way, but the test is about age).
    std::thread::sleep(Duration::from_millis(1100));
    w.create_pod("new", NODE, Some(&annotation(&[(25, 25)])));
    w.set_running("new", POD_B_IP);
    wait_for("new takes port 25", WAIT, || {
        w.dnat() == set(&["203.0.113.7:25/tcp → 10.1.1.5:25"])
    });
    let before = echo_b.accepted.load(Ordering::Relaxed);
    wait_for("traffic reaches the new pod", WAIT, || w.roundtrip(25));
    assert!(echo_b.accepted.load(Ordering::Relaxed) > before);
    wait_for("a NATConflict event on the older pod", WAIT, || {
        w.events("old", "NATConflict")
            .iter()
            .any(|n| n.contains("203.0.113.7:25/tcp is taken by mail:new"))
    });
    assert!(w.events("new", "NATConflict").is_empty());

    w.delete_pod("new");
    wait_for("old takes port 25 back", WAIT, || {
        w.dnat() == set(&["203.0.113.7:25/tcp → 10.1.0.5:25"])
    });
    wait_for("old is told it has the port again", WAIT, || {
        w.events("old", "NATApplied").len() == 2
    });
    drop(echo_b);
    assert!(w.roundtrip(25));
}

#[test]
fn invalid_annotation_gets_a_warning_and_leaves_other_pods_alone() {
    let w = World::new("agbad");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();

    w.create_pod(
        "broken",
        NODE,
        Some(r#"{"entries":[{"srcPort":26,"dstPort":0}]}"#),
    );
    w.set_running("broken", POD_B_IP);
    w.create_pod("restricted", NODE, Some(&annotation(&[(22, 22)])));
    w.set_running("restricted", "10.1.2.5");
    // A bad port range is rejected alone: the pod's other entry is
    // published.
    w.create_pod(
        "partial",
        NODE,
        Some(r#"{"entries":[{"srcPort":27,"dstPort":27},{"srcPort":10000,"srcPortEnd":11000,"dstPort":20000}]}"#),
    );
    w.set_running("partial", "10.1.2.6");
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);

    wait_for("only the valid entries' mappings", WAIT, || {
        w.dnat()
            == set(&[
                "203.0.113.7:25/tcp → 10.1.0.5:2525",
                "203.0.113.7:27/tcp → 10.1.2.6:27",
            ])
    });
    wait_for("InvalidAnnotation on the partial pod", WAIT, || {
        w.events("partial", "InvalidAnnotation").iter().any(|n| {
            n.contains("entries rejected alone, the pod's other entries are unaffected: entries[1].srcPortEnd: 10000-11000 is 1001 ports")
        })
    });
    wait_for("TCP to the valid pod", WAIT, || w.roundtrip(25));
    wait_for("InvalidAnnotation on the broken pod", WAIT, || {
        w.events("broken", "InvalidAnnotation")
            .iter()
            .any(|n| n.contains("entries[0].dstPort: port 0 is reserved"))
    });
    wait_for("InvalidAnnotation on the restricted pod", WAIT, || {
        w.events("restricted", "InvalidAnnotation")
            .iter()
            .any(|n| n.contains("22"))
    });
    assert!(w.events("mx-a", "InvalidAnnotation").is_empty());
    assert_eq!(w.events("mx-a", "NATApplied").len(), 1);
}

#[test]
fn only_this_nodes_pods_are_watched_and_programmed() {
    let w = World::new("agnode");
    // 50 annotated, running pods elsewhere; "node10"/"node11" share a prefix
    // with ours and must not match.
    let others = ["node2", "node3", "node10", "node11"];
    for i in 0..50u16 {
        let name = format!("other-{i}");
        w.create_pod(
            &name,
            others[usize::from(i) % others.len()],
            Some(&annotation(&[(30000 + i, 80)])),
        );
        w.set_running(&name, &format!("10.2.{i}.5"));
    }
    for i in 0..3u16 {
        let name = format!("mine-{i}");
        w.create_pod(&name, NODE, Some(&annotation(&[(40 + i, 80)])));
        w.set_running(&name, &format!("10.1.{i}.5"));
    }
    // Started after the pods exist, so the first list holds all of them.
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let ours = set(&[
        "203.0.113.7:40/tcp → 10.1.0.5:80",
        "203.0.113.7:41/tcp → 10.1.1.5:80",
        "203.0.113.7:42/tcp → 10.1.2.5:80",
    ]);
    wait_for("exactly our three mappings", WAIT, || w.dnat() == ours);
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("first sync applied"))
        .expect("first sync line");
    // The store held only this node's pods.
    assert!(line.contains("pods=3"), "{line}");
    assert!(
        log.contains("spec.nodeName=node1"),
        "the selector is logged"
    );
}

#[test]
fn apiserver_outage_and_agent_restarts_keep_traffic_flowing() {
    let w = World::new("agout");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let mut agent = w.start_agent(&[]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    let one = set(&["203.0.113.7:25/tcp → 10.1.0.5:2525"]);
    let two = set(&[
        "203.0.113.7:25/tcp → 10.1.0.5:2525",
        "203.0.113.7:26/tcp → 10.1.0.5:2525",
    ]);
    wait_for("the mapping", WAIT, || w.dnat() == one);
    wait_for("TCP through the NAT", WAIT, || w.roundtrip(25));

    // From here on a client connects through the NAT in a loop.
    let client = ClientLoop::start(&w.sandbox.client, 25);
    client.wait_more(5);

    // 1. The apiserver goes away and comes back; the same agent converges on
    // a change made afterwards.
    w.cluster.stop_apiserver();
    wait_for("the agent notices the outage", WAIT, || {
        agent.count("pod watch failed") > 0
    });
    client.wait_more(5);
    assert_eq!(w.dnat(), one, "rules stay while the apiserver is away");
    w.cluster.start_apiserver();
    w.set_annotation("mx-a", &annotation(&[(25, 2525), (26, 2525)]));
    wait_for("the change after the outage", WAIT, || w.dnat() == two);
    assert!(w.roundtrip(26));

    // 2. kill -9 and restart while the apiserver is up.
    agent.kill9();
    client.wait_more(5);
    agent = w.start_agent(&[]);
    agent.wait_first_sync();
    client.wait_more(5);
    assert_eq!(w.dnat(), two);

    // 3. kill -9, the apiserver goes away, the agent restarts without it: with
    // no pod list it must leave the kernel alone.
    agent.kill9();
    w.cluster.stop_apiserver();
    agent = w.start_agent(&[]);
    wait_for("the new agent finds no apiserver", WAIT, || {
        agent.count("pod watch failed") > 0
    });
    client.wait_more(5);
    assert_eq!(w.dnat(), two, "no rule touched before the first pod list");
    assert_eq!(agent.count("first sync applied"), 0);
    w.cluster.start_apiserver();
    agent.wait_first_sync();
    w.set_annotation("mx-a", &annotation(&[(25, 2525)]));
    wait_for("the change after the restart", WAIT, || w.dnat() == one);
    client.wait_more(5);

    let (worked, failures) = client.stop();
    assert!(worked >= 30, "{worked} round trips");
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:?}",
        failures.len(),
        worked + failures.len() as u64
    );

    // 4. SIGTERM: exit 0, the rules stay.
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(agent.log().contains("the rules stay in the kernel"));
    assert_eq!(w.dnat(), one);
    assert!(w.roundtrip(25));
}

#[test]
fn detected_public_address_and_its_change_retarget_the_rules() {
    let w = World::new("agaddr");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // No --public-address: the agent finds 203.0.113.7 on the node (the
    // pods' 10.x side is filtered by default).
    let agent = w.start_agent_with(&[]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("the mapping on the detected address", WAIT, || {
        w.dnat() == set(&["203.0.113.7:25/tcp → 10.1.0.5:2525"])
    });
    wait_for("TCP through the NAT", WAIT, || w.roundtrip(25));

    // The node's public address changes: the rules follow.
    w.sandbox
        .node
        .sh("ip addr add 198.51.100.7/24 dev pub0 && ip addr del 203.0.113.7/24 dev pub0");
    wait_for("the mapping on the new address", WAIT, || {
        w.dnat() == set(&["198.51.100.7:25/tcp → 10.1.0.5:2525"])
    });
    wait_for("a NATApplied event naming the new address", WAIT, || {
        w.events("mx-a", "NATApplied").last().map(String::as_str)
            == Some("198.51.100.7:25/tcp → 10.1.0.5:2525")
    });
}

#[test]
fn dry_run_agent_prints_the_changes_and_touches_nothing() {
    let w = World::new("agdry");
    let agent = w.start_agent(&["-dryrun"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("the printed diff", WAIT, || {
        agent.count("203.0.113.7 . tcp . 25") > 0
    });
    assert!(
        !w.sandbox
            .node
            .try_sh("nft list table ip podnat")
            .status
            .success(),
        "dry run created the table"
    );
    assert!(
        w.events("mx-a", "NATApplied").is_empty(),
        "dry run published an event"
    );
}

#[test]
fn short_node_id_matches_full_node_names_through_a_cluster_wide_watch() {
    // The Go version's matching: -nodeid node1 serves pods on
    // node1.example.org. Without NODE_NAME the watch cannot select by the
    // exact name, so it watches all pods and says so.
    let w = World::new("agshort");
    w.create_pod("fqdn", "node1.example.org", Some(&annotation(&[(60, 80)])));
    w.set_running("fqdn", "10.1.0.5");
    w.create_pod(
        "elsewhere",
        "node2.example.org",
        Some(&annotation(&[(61, 80)])),
    );
    w.set_running("elsewhere", "10.1.1.5");
    let agent = w.start_agent(&["-nodeid=node1"]);
    agent.wait_first_sync();
    wait_for("the pod on node1.example.org mapped", WAIT, || {
        w.dnat() == set(&["203.0.113.7:60/tcp → 10.1.0.5:80"])
    });
    assert!(agent.log().contains("cluster-wide"), "{}", agent.log());
}

#[test]
fn default_iptables_flavor_works_end_to_end() {
    let w = World::new("agipt");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent(&["-firewallflavor=iptables", "-iptablesJump=-1,-1,-1"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("TCP through the iptables flavor's DNAT", WAIT, || {
        w.roundtrip(25)
    });
    let save = w.sandbox.node.sh("iptables-nft-save -t nat");
    assert!(
        save.contains("-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25")
            && save.contains("mail:mx-a"),
        "{save}"
    );
    wait_for("a NATApplied event", WAIT, || {
        w.events("mx-a", "NATApplied") == vec!["203.0.113.7:25/tcp → 10.1.0.5:2525"]
    });

    // Drift repair: someone flushes the agent's chain and deletes its jump;
    // the nf_tables monitor wakes the loop, which puts both back (well
    // within the periodic resync, which is minutes away).
    let before = agent.count("applied one batch");
    w.sandbox.node.sh(
        "iptables-nft -t nat -F PODNAT_PRE && \
         iptables-nft -t filter -D FORWARD -m comment --comment 'podnat[jump_to_chain]' -j PODNAT_FORWARD",
    );
    wait_for(
        "the flushed chain and the deleted jump repaired",
        Duration::from_secs(3),
        || {
            let nat = w.sandbox.node.sh("iptables-nft-save -t nat");
            let filter = w.sandbox.node.sh("iptables-nft-save -t filter");
            nat.contains("-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25")
                && filter.contains(
                    "-A FORWARD -m comment --comment \"podnat[jump_to_chain]\" -j PODNAT_FORWARD",
                )
        },
    );
    assert!(w.roundtrip(25), "traffic flows again after the repair");
    wait_for("the repair logged by the agent", WAIT, || {
        agent.count("applied one batch") > before
    });
    // The agent's own repair does not wake it into a loop: the log settles.
    let applies = agent.count("applied one batch");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        agent.count("applied one batch") <= applies + 1,
        "{}",
        agent.log()
    );

    w.delete_pod("mx-a");
    wait_for("the DNAT rule removed", WAIT, || {
        !w.sandbox
            .node
            .sh("iptables-nft-save -t nat")
            .contains("mail:mx-a")
    });
    assert!(!w.roundtrip(25));
}

#[test]
fn refused_events_are_logged_and_nat_goes_on() {
    let w = World::new("agev");
    // Take the events rules away from the agent's ClusterRole.
    let roles: kube::Api<k8s_openapi::api::rbac::v1::ClusterRole> = kube::Api::all(w.admin.clone());
    let pods_only = serde_json::json!({"rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]});
    w.rt.block_on(roles.patch(
        "podnat-controller",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&pods_only),
    ))
    .expect("narrow the ClusterRole");
    wait_for("the authorizer to refuse events", WAIT, || {
        !w.agent_may("create", "events.k8s.io", "events", "mail")
    });
    assert!(w.agent_may("watch", "", "pods", ""));
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("TCP through the NAT", WAIT, || w.roundtrip(25));
    wait_for("the refused event in the log", WAIT, || {
        agent.count("cannot publish event") > 0
    });
    assert!(w.events("mx-a", "NATApplied").is_empty());
    // Later changes are not held back by the failing events either.
    w.set_annotation("mx-a", &annotation(&[(26, 2525)]));
    wait_for("the edited mapping", WAIT, || {
        w.dnat() == set(&["203.0.113.7:26/tcp → 10.1.0.5:2525"])
    });
}

/// `sourceRanges` through the whole agent (annotation → planner → kernel),
/// both flavors: the client inside the ranges gets through; the annotation
/// edited to other ranges shuts it out, its open connection included; the
/// iptables flavor shows the `-s` rule, /entries/list the ranges.
#[test]
fn source_ranges_through_the_agent_in_both_flavors() {
    for (tag, flavor) in [("agsri", "iptables"), ("agsrn", "nftables")] {
        let w = World::new(tag);
        let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
        let agent = w.start_agent(&[&format!("-firewallflavor={flavor}")]);
        agent.wait_first_sync();
        let ranged = |range: &str| {
            format!(r#"{{"entries":[{{"srcPort":25,"dstPort":2525,"sourceRanges":["{range}"]}}]}}"#)
        };
        // The client is 203.0.113.1.
        w.create_pod("mx-a", NODE, Some(&ranged("203.0.113.0/30")));
        w.set_running("mx-a", POD_A_IP);
        wait_for("TCP from inside the ranges", WAIT, || w.roundtrip(25));
        if flavor == "iptables" {
            let save = w.sandbox.node.sh("iptables-nft-save -t nat");
            assert!(
                save.contains(
                    "-A PODNAT_PRE -s 203.0.113.0/30 -d 203.0.113.7/32 -p tcp -m tcp --dport 25"
                ),
                "{save}"
            );
        }
        let list = w
            .sandbox
            .node
            .sh("curl -s http://127.0.0.1:8484/entries/list");
        assert!(
            list.contains(r#""source_ranges":["203.0.113.0/30"]"#),
            "{list}"
        );

        let mut held = w.sandbox.client.run(|| {
            let s = std::net::TcpStream::connect_timeout(
                &"203.0.113.7:25".parse().unwrap(),
                Duration::from_secs(2),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        });
        let echoes = |s: &mut std::net::TcpStream| {
            use std::io::{Read, Write};
            let mut b = [0u8; 1];
            s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok()
        };
        assert!(echoes(&mut held), "{flavor}: the held connection works");
        w.set_annotation("mx-a", &ranged("198.51.100.0/24"));
        wait_for("TCP from the client refused", WAIT, || !w.roundtrip(25));
        // The firewall thread flushes the narrowed key's conntrack entries
        // right after the commit (the iptables flavor needs it; the
        // nftables flavor drops the packets anyway).
        wait_for(
            "the open connection from the removed range ends",
            WAIT,
            || !echoes(&mut held),
        );
        drop(agent);
    }
}
