//! Firewall reloads on a crowded node (issue 12, item 4): what firewalld,
//! nftables.service or an iptables-restore based tool does to the kernel
//! while the agent runs, in agent mode, in both flavors, with a client
//! connecting through the NAT all along. After each reload the agent's rules
//! must come back exactly as they were (no duplicate, jumps where they were)
//! and traffic must flow again. How long the rules were missing and how many
//! client round trips failed is printed, not asserted.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::{annotation, wait_for, ClientLoop, EchoServer, World, NODE, WAIT};
use support::agent_view;
use support::netns::POD_A_IP;
use support::ruleset::diff;

/// A foreign iptables-nft ruleset loaded without --noflush: it replaces the
/// nat and filter tables, chains and all.
const FOREIGN_RESTORE: &str = "iptables-nft-restore <<'EOF'
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FOREIGN-POST - [0:0]
-A POSTROUTING -j FOREIGN-POST
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN-FWD - [0:0]
-A FORWARD -j FOREIGN-FWD
COMMIT
EOF";

#[test]
fn nftables_flavor_survives_reloads() {
    survives_reloads(
        "rlnft",
        "nftables",
        &[
            ("nft flush ruleset", "nft flush ruleset"),
            ("iptables-nft-restore of a foreign ruleset", FOREIGN_RESTORE),
            ("its table deleted", "nft delete table ip podnat"),
            ("iptables-nft -t nat -F", "iptables-nft -t nat -F"),
        ],
    );
}

#[test]
fn iptables_flavor_survives_reloads() {
    survives_reloads(
        "rlipt",
        "iptables",
        &[
            ("nft flush ruleset", "nft flush ruleset"),
            ("iptables-nft-restore of a foreign ruleset", FOREIGN_RESTORE),
            (
                "the nat table holding its chains deleted",
                "nft delete table ip nat",
            ),
            ("iptables-nft -t nat -F", "iptables-nft -t nat -F"),
        ],
    );
}

fn survives_reloads(tag: &str, flavor: &str, reloads: &[(&str, &str)]) {
    let w = World::new(tag);
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    let agent = w.start_agent(&[&format!("-firewallflavor={flavor}")]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("TCP through the NAT", WAIT, || w.roundtrip(25));
    let node = &w.sandbox.node;
    let ours = agent_view::rules(node, flavor);
    assert!(!ours.is_empty(), "the agent's rules are in the kernel");

    let client = ClientLoop::start(&w.sandbox.client, 25);
    client.wait_more(3);
    let mut report = Vec::new();
    for (what, script) in reloads {
        let (ok0, failed0) = (client.ok(), client.failed.load(Ordering::Relaxed));
        let t0 = Instant::now();
        node.sh(script);
        let first_look = if agent_view::rules(node, flavor) == ours {
            "intact at the first look"
        } else {
            "missing at the first look"
        };
        let mut missing_for = None;
        wait_for(
            &format!("the agent's rules back after {what}"),
            WAIT,
            || {
                let back = agent_view::rules(node, flavor) == ours;
                if back && missing_for.is_none() {
                    missing_for = Some(t0.elapsed());
                }
                back
            },
        );
        // Stay a moment: the repair must not be followed by a second,
        // duplicating one, nor be undone.
        std::thread::sleep(Duration::from_millis(500));
        let now = agent_view::rules(node, flavor);
        assert!(
            now == ours,
            "after {what}, the agent's rules differ from before: {}",
            diff(&ours, &now)
        );
        client.wait_more(3);
        assert!(agent.running(), "the agent exited:\n{}", agent.log());
        report.push(format!(
            "{flavor} flavor, {what}: rules {first_look}, as before after {:.0} ms; client round trips meanwhile {} ok, {} failed",
            missing_for.unwrap_or_default().as_secs_f64() * 1000.0,
            client.ok() - ok0,
            client.failed.load(Ordering::Relaxed) - failed0,
        ));
    }
    let (_, failures) = client.stop();
    report.push(format!("client failures: {failures:?}"));
    eprintln!("{}", report.join("\n"));
}
