//! The agent on a crowded node (issue 12): a real kube-proxy v1.34.4
//! (tests/support/kube_proxy.rs) in the node namespace, in nftables mode and
//! in iptables mode, programming 200 Services whose endpoints answer on pod
//! B, under a bounded API churn (20 s at 5 changes/s); the agent binary beside
//! it with 50 annotated pods, in each flavor. What must hold:
//! - the agent sends no batch during the churn and reconciles at most a
//!   handful of times (its own /metrics counters);
//! - kube-proxy's rules are the same with and without the agent, and the
//!   agent's are the same before and after the churn;
//! - ClusterIP traffic through kube-proxy and DNAT/SNAT traffic through the
//!   agent both work, before and after the churn;
//! - the iptables flavor runs with `-iptablescounters`: its counting chains
//!   in mangle (walked by kube-proxy's DNATed Service traffic too) count the
//!   mail pod's traffic, and `cleanup` removes them.
//!
//! Counts, not timings, are asserted; both flavors are measured before the
//! assertions, so that a failure shows the figures of both.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::time::Duration;

use harness::{wait_for, EchoServer, World, NODE, WAIT};
use support::agent_view::{self, mappings, Counters};
use support::kube_proxy::{KubeProxy, ProxyMode};
use support::netns::{Netns, POD_A_IP, PUBLIC_IP};
use support::ruleset::diff;
use support::services::{self, service_address, Services, TARGET_PORT};
use support::traffic::{check_mail_traffic, echo_roundtrip};

const SERVICES: usize = 200;
/// Annotated pods: the mail pod of support::traffic plus this many more.
const OTHER_PODS: usize = 49;
const CHURN: Duration = Duration::from_secs(20);
const CHURN_RATE: u32 = 5;
/// "A handful": reconciles the agent may run while kube-proxy churns.
const MAX_RECONCILES: f64 = 5.0;
const MAIL: &str =
    r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcPort":5353,"dstPort":5300,"proto":"udp"}]}"#;

#[test]
fn beside_kube_proxy_in_nftables_mode() {
    crowded_node("cxnft", ProxyMode::Nftables);
}

#[test]
fn beside_kube_proxy_in_iptables_mode() {
    crowded_node("cxipt", ProxyMode::Iptables);
}

/// What one flavor did during the churn.
struct Observed {
    flavor: &'static str,
    changes: usize,
    during: Counters,
}

fn crowded_node(tag: &str, mode: ProxyMode) {
    let w = World::new(tag);
    services::create_node(&w.rt, &w.admin, NODE, PUBLIC_IP);
    services::add_endpoint_addresses(&w.sandbox.pod_b);
    let _backend = EchoServer::start(&w.sandbox.pod_b, TARGET_PORT);
    let svcs = Services::create(&w.rt, &w.admin, SERVICES);
    create_agent_pods(&w);

    let kp = KubeProxy::start(
        &w.sandbox.node,
        &w.cluster.admin_kubeconfig,
        mode,
        NODE,
        &w.cluster.dir,
    );
    kp.quiesce();
    check_cluster_ips(&w.sandbox.pod_a);
    let alone = kp.rules();
    let last_ip = services::cluster_ip(SERVICES - 1).to_string();
    assert!(
        alone.iter().any(|l| l.contains(&last_ip)),
        "kube-proxy ({}) programmed every Service: {alone:#?}",
        mode.name()
    );

    let mut observed = Vec::new();
    for flavor in ["nftables", "iptables"] {
        let flag = format!("-firewallflavor={flavor}");
        let agent = match flavor {
            "iptables" => w.start_agent(&[&flag, "-iptablescounters"]),
            _ => w.start_agent(&[&flag]),
        };
        agent.wait_first_sync();
        wait_for("the agent's rules for every pod", WAIT, || {
            mappings(&w.sandbox.node, flavor) == OTHER_PODS + 2
        });
        check_mail_traffic(&w.sandbox);
        check_cluster_ips(&w.sandbox.pod_a);
        // Both flavors count the mail pod's traffic (the iptables flavor in
        // mangle, beside kube-proxy's rules).
        let metrics = support::kube_proxy::http_get(&w.sandbox.node, 8484, "/metrics")
            .expect("the agent's /metrics");
        let packets: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("podnat_mapping_packets_total{"))
            .filter(|l| l.contains("port=\"25\"") && l.contains("pod=\"mx-a\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert!(
            packets > 0.0,
            "{flavor}: the mail pod's 25/tcp counted:\n{metrics}"
        );
        let ours = agent_view::rules(&w.sandbox.node, flavor);
        let before = Counters::read(&w.sandbox.node);

        let changes = svcs.churn(&w.rt, CHURN, CHURN_RATE);
        kp.quiesce();
        assert!(agent.running(), "the agent exited:\n{}", agent.log());
        let during = Counters::read(&w.sandbox.node).since(before);
        observed.push(Observed {
            flavor,
            changes,
            during,
        });

        let beside = kp.rules();
        assert!(
            beside == alone,
            "kube-proxy's rules ({} mode) differ with the agent's {flavor} flavor beside them: {}",
            mode.name(),
            diff(&alone, &beside)
        );
        let now = agent_view::rules(&w.sandbox.node, flavor);
        assert!(
            now == ours,
            "the agent's rules ({flavor}) changed over the churn: {}",
            diff(&ours, &now)
        );
        check_mail_traffic(&w.sandbox);
        check_cluster_ips(&w.sandbox.pod_a);

        drop(agent);
        agent_view::cleanup(&w.sandbox.node, flavor);
        assert_eq!(mappings(&w.sandbox.node, flavor), 0, "cleanup left rules");
        assert!(
            agent_view::rules(&w.sandbox.node, "iptables").is_empty(),
            "cleanup left chains or jumps in iptables-nft's tables (mangle's included)"
        );
        let cleaned = kp.rules();
        assert!(
            cleaned == alone,
            "the agent's cleanup ({flavor}) changed kube-proxy's rules: {}",
            diff(&alone, &cleaned)
        );
    }

    let table: Vec<String> = observed
        .iter()
        .map(|o| {
            format!(
                "kube-proxy {} mode, agent {} flavor: {} API changes; agent reconciles {}, batches {} ({} messages)",
                mode.name(),
                o.flavor,
                o.changes,
                o.during.reconciles,
                o.during.batches,
                o.during.messages
            )
        })
        .collect();
    let table = table.join("\n");
    eprintln!("{table}");
    assert!(
        observed
            .iter()
            .all(|o| o.during.batches == 0.0 && o.during.reconciles <= MAX_RECONCILES),
        "the agent must send no batch and reconcile at most {MAX_RECONCILES} times \
         while kube-proxy churns:\n{table}"
    );
}

/// The mail pod on pod A (the mappings support::traffic checks), and
/// `OTHER_PODS` more with one TCP port each on addresses nobody answers.
fn create_agent_pods(w: &World) {
    w.create_pod("mx-a", NODE, Some(MAIL));
    w.set_running("mx-a", POD_A_IP);
    for i in 0..OTHER_PODS {
        let name = format!("p-{i}");
        let port = 30000 + i as u16;
        w.create_pod(&name, NODE, Some(&harness::annotation(&[(port, 80)])));
        w.set_running(&name, &format!("10.3.0.{}", i + 1));
    }
}

/// ClusterIP → endpoint on pod B, from pod A, for the first and the last
/// Service (the churn never touches svc-0; svc-199 was created last).
fn check_cluster_ips(from: &Netns) {
    for i in [0, SERVICES - 1] {
        let addr = service_address(i);
        wait_for(&format!("TCP to ClusterIP {addr}"), WAIT, || {
            echo_roundtrip(from, addr)
        });
    }
}
