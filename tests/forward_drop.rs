//! Docker's `iptables -P FORWARD DROP` beside the agent (issue 12, item 3):
//! a foreign forward-hook base chain with policy drop still drops what the
//! nftables flavor accepts in its own table (an accept in one base chain
//! does not override a drop in another), so that flavor must say so by name
//! — log, `/entries/list` `warnings`, `podnat_forward_blocked{table,chain}` —
//! and never touch the foreign chain; the iptables flavor's accept lives in
//! the same FORWARD chain, so its traffic passes — both directions: Docker
//! accepts RELATED,ESTABLISHED only towards docker0, so the replies of a
//! published port need an accept of the agent's too (today it accepts
//! `--ctstate NEW` only, and the replies are dropped).

#[path = "agent/harness.rs"]
mod harness;
mod support;

use harness::{annotation, wait_for, World, NODE, WAIT};
use support::kube_proxy::http_get;
use support::netns::{Netns, POD_A_IP};
use support::ruleset;

/// Docker's filter table (24.x, docker0 only): policy drop, and the
/// RELATED,ESTABLISHED accept only for traffic to docker0, so replies of
/// anything else forwarded are dropped too unless someone accepts them.
const DOCKER_FILTER: &str = "iptables-nft-restore <<'EOF'
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
EOF";

fn setup(tag: &str, flavor: &str) -> (World, harness::EchoServer, harness::Agent) {
    let w = World::new(tag);
    let echo = harness::EchoServer::start(&w.sandbox.pod_a, 2525);
    w.sandbox.node.sh(DOCKER_FILTER);
    // Resyncs every second: whatever the agent checks on a resync is seen.
    let agent = w.start_agent(&[&format!("-firewallflavor={flavor}"), "-informerresync=1"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    (w, echo, agent)
}

/// The `warnings` of /entries/list, each as text (strings or objects).
fn warnings(node: &Netns) -> Vec<String> {
    let body = http_get(node, 8484, "/entries/list").unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    doc["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w.as_str().map_or_else(|| w.to_string(), str::to_string))
        .collect()
}

/// `podnat_forward_blocked` for table filter, chain FORWARD (any label order).
fn blocked_gauge(node: &Netns) -> Option<f64> {
    let text = http_get(node, 8484, "/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("podnat_forward_blocked{"))
        .filter(|l| l.contains(r#"table="filter""#) && l.contains(r#"chain="FORWARD""#))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

fn names_filter_forward(text: &str) -> bool {
    text.contains("filter") && text.contains("FORWARD")
}

#[test]
fn nftables_flavor_reports_a_foreign_forward_drop_by_name() {
    let (w, _echo, agent) = setup("fdnft", "nftables");
    let node = &w.sandbox.node;
    wait_for("the mapping in the kernel", WAIT, || w.dnat().len() == 1);
    let xtables = || ruleset::iptables_lines(node, |_| true);
    let foreign_before = xtables();

    wait_for(
        "a warning naming filter/FORWARD in /entries/list",
        WAIT,
        || warnings(node).iter().any(|w| names_filter_forward(w)),
    );
    wait_for(
        "podnat_forward_blocked{table=filter,chain=FORWARD} 1",
        WAIT,
        || blocked_gauge(node) == Some(1.0),
    );
    let warned = |agent: &harness::Agent| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("WARN") && names_filter_forward(l))
            .count()
    };
    wait_for("a warning in the log naming filter/FORWARD", WAIT, || {
        warned(&agent) > 0
    });
    // The drop is real: the agent reports it, it does not work around it.
    assert!(!w.roundtrip(25), "the foreign FORWARD policy drop drops");

    // Once per change: more reconciles (resyncs, a pod change) repeat nothing.
    w.create_pod("mx-b", NODE, Some(&annotation(&[(26, 2525)])));
    w.set_running("mx-b", "10.1.0.6");
    wait_for("the second mapping", WAIT, || w.dnat().len() == 2);
    let resyncs = agent.count("periodic resync");
    wait_for("two more resyncs", WAIT, || {
        agent.count("periodic resync") >= resyncs + 2
    });
    assert_eq!(warned(&agent), 1, "{}", agent.log());
    assert_eq!(
        xtables(),
        foreign_before,
        "the foreign chains are never touched"
    );

    // The policy goes back to accept: the warning goes, traffic flows.
    node.sh("iptables-nft -t filter -P FORWARD ACCEPT");
    wait_for("the warning gone from /entries/list", WAIT, || {
        !warnings(node).iter().any(|w| names_filter_forward(w))
    });
    wait_for("podnat_forward_blocked back to 0 or gone", WAIT, || {
        blocked_gauge(node).unwrap_or(0.0) == 0.0
    });
    assert!(w.roundtrip(25));
}

#[test]
fn iptables_flavor_passes_traffic_through_a_forward_drop() {
    let (w, _echo, agent) = setup("fdipt", "iptables");
    wait_for(
        "TCP through FORWARD DROP with the iptables flavor",
        WAIT,
        || w.roundtrip(25),
    );
    let filter = w.sandbox.node.sh("iptables-nft-save -t filter");
    assert!(filter.contains(":FORWARD DROP"), "{filter}");
    assert!(agent.running());
    assert!(
        !warnings(&w.sandbox.node)
            .iter()
            .any(|w| names_filter_forward(w)),
        "nothing to warn about: the accept is in the same chain"
    );
}
