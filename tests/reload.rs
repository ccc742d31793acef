//! Firewall reloads and foreign commits on a crowded node, agent mode (issue
//! 12): the binary runs in a sandbox's node namespace against a real
//! kube-apiserver (tests/agent/harness.rs), beside the foreign ruleset of
//! tests/support/crowd.rs, with a client connecting in a loop. After each
//! reload the agent restores exactly its rules (no duplicate, jumps where they
//! belong); the repair time and the failed connections are printed (figures,
//! not assertions). Foreign commits elsewhere cost no reconcile; a foreign
//! forward-hook drop policy is reported by name.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::time::{Duration, Instant};

use harness::{annotation, wait_for, Agent, ClientLoop, EchoServer, World, NODE, WAIT};
use podnat_controller::firewall::view;
use support::crowd::crowd;
use support::netns::{Netns, POD_A_IP};

fn curl(ns: &Netns, path: &str) -> String {
    ns.sh(&format!("curl -sf http://127.0.0.1:8484{path}"))
}

/// The value of one series in the agent's /metrics (0 when absent).
fn metric(ns: &Netns, series: &str) -> f64 {
    curl(ns, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Nftables,
    Iptables,
}

/// What the agent owns as the kernel's own tools list it: the table (nft),
/// or every iptables-nft-save line of its chains and jumps, in order.
fn ours(node: &Netns, flavor: Flavor) -> String {
    match flavor {
        Flavor::Nftables => {
            let out = node.try_sh("nft list table ip podnat");
            view::canonical_nft(&String::from_utf8_lossy(&out.stdout))
        }
        Flavor::Iptables => node
            .sh("iptables-nft-save")
            .lines()
            .filter(|l| l.contains("PODNAT"))
            .map(|l| format!("{l}\n"))
            .collect(),
    }
}

/// A reload as the tools named in the issue do it.
fn reloads(flavor: Flavor) -> Vec<(&'static str, &'static str)> {
    let delete_ours = match flavor {
        Flavor::Nftables => ("nft delete table ip podnat", "nft delete table ip podnat"),
        Flavor::Iptables => (
            "the agent's chain deleted",
            // One transaction, as a reload is: three separate commands race the
            // agent, which may put the jump back before the chain is deleted.
            // With local access PODNAT_OUTPUT jumps to it too: flushed first.
            "printf '%s\\n' '*nat' \
               \"-D PREROUTING -m comment --comment podnat[jump_to_chain] -j PODNAT_PRE\" \
               '-F PODNAT_OUTPUT' '-F PODNAT_PRE' '-X PODNAT_PRE' COMMIT | iptables-nft-restore --noflush",
        ),
    };
    vec![
        ("nft flush ruleset", "nft flush ruleset"),
        (
            "iptables-nft-restore of a foreign ruleset",
            "printf '%s\\n' '*nat' ':PREROUTING ACCEPT [0:0]' ':POSTROUTING ACCEPT [0:0]' \
               ':KUBE-SERVICES - [0:0]' '-A PREROUTING -j KUBE-SERVICES' COMMIT \
               '*filter' ':FORWARD ACCEPT [0:0]' \
               '-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT' COMMIT \
             | iptables-nft-restore",
        ),
        delete_ours,
        ("iptables-nft -t nat -F", "iptables-nft -t nat -F"),
    ]
}

fn world(flavor: Flavor) -> (World, Agent, EchoServer) {
    let w = World::new("reload");
    crowd(&w.sandbox.node);
    let echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let flag = match flavor {
        Flavor::Nftables => "-firewallflavor=nftables",
        Flavor::Iptables => "-firewallflavor=iptables",
    };
    let agent = w.start_agent(&[flag]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525), (587, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("TCP through the DNAT", WAIT, || w.roundtrip(25));
    (w, agent, echo)
}

fn reloads_are_repaired(flavor: Flavor) {
    let (w, agent, _echo) = world(flavor);
    let node = &w.sandbox.node;
    let expected = ours(node, flavor);
    assert!(expected.contains("mail:mx-a"), "{expected}");
    let client = ClientLoop::start(&w.sandbox.client, 25);
    client.wait_more(3);
    let mut figures = Vec::new();
    for (what, script) in reloads(flavor) {
        let failed_before = client.failed.load(std::sync::atomic::Ordering::Relaxed);
        let t0 = Instant::now();
        node.sh(script);
        wait_for(
            &format!("{flavor:?}: repaired after {what}"),
            Duration::from_secs(10),
            || ours(node, flavor) == expected,
        );
        let repaired = t0.elapsed();
        client.wait_more(3);
        let failed = client.failed.load(std::sync::atomic::Ordering::Relaxed) - failed_before;
        figures.push(format!(
            "{what}: rules back after {repaired:?}, {failed} failed connection(s)"
        ));
        // Exactly ours, once: no duplicate rule or jump.
        assert_eq!(ours(node, flavor), expected, "{flavor:?} after {what}");
    }
    for f in &figures {
        eprintln!("{flavor:?}: {f}");
    }

    // Foreign commits elsewhere (a kube-proxy sync burst) cost no reconcile.
    node.sh("nft add table ip foo && nft add set ip foo ips '{ type ipv4_addr; }'");
    std::thread::sleep(Duration::from_millis(500));
    let reconciles = metric(node, "podnat_reconciles_total");
    let batches = metric(node, "podnat_batch_messages_count");
    for i in 0..20 {
        node.sh(&format!("nft add element ip foo ips '{{ 10.96.1.{i} }}'"));
    }
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        metric(node, "podnat_reconciles_total"),
        reconciles,
        "{}",
        agent.log()
    );
    assert_eq!(metric(node, "podnat_batch_messages_count"), batches);
    let (worked, _) = client.stop();
    assert!(worked > 0);
}

#[test]
fn nftables_flavor_survives_reloads() {
    reloads_are_repaired(Flavor::Nftables);
}

#[test]
fn iptables_flavor_survives_reloads() {
    reloads_are_repaired(Flavor::Iptables);
}

#[test]
fn a_forward_drop_policy_is_reported_by_name_until_it_goes() {
    let (w, agent, _echo) = world(Flavor::Nftables);
    let node = &w.sandbox.node;
    let series = r#"podnat_forward_blocked{family="ip",table="filter",chain="FORWARD"}"#;
    assert_eq!(metric(node, series), 0.0);
    node.sh("iptables-nft -P FORWARD DROP");
    wait_for("the blocker in /entries/list", WAIT, || {
        let list: serde_json::Value = serde_json::from_str(&curl(node, "/entries/list")).unwrap();
        list["warnings"].as_array().is_some_and(|w| {
            w.len() == 1 && w[0]["chain"] == "FORWARD" && w[0]["table"] == "filter"
        })
    });
    assert_eq!(metric(node, series), 1.0);
    assert_eq!(
        agent.count("table ip filter chain FORWARD drops forwarded packets by policy"),
        1,
        "{}",
        agent.log()
    );
    assert!(!w.roundtrip(25), "the foreign drop wins, as reported");
    node.sh("iptables-nft -P FORWARD ACCEPT");
    wait_for("the warning gone", WAIT, || {
        curl(node, "/entries/list").contains("\"warnings\":[]")
    });
    assert_eq!(metric(node, series), 0.0);
    assert!(w.roundtrip(25));
}
