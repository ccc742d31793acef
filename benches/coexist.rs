//! The agent's cost on a crowded node (issue 12), with the release binary:
//! a real kube-proxy v1.34.4 (nftables mode, then iptables mode) in the node
//! namespace programs 200 Services while the API churns (5 changes/s:
//! endpoints added and removed, Services deleted and created again); beside
//! it the agent in each flavor, with 50 pods and then 1000 pods, 5 ports
//! each. Per run: the agent's CPU seconds per minute (utime + stime from
//! /proc), its reconciles per minute and the batches it sent, and kube-proxy's
//! sync time p50 (its /metrics histogram, interpolated within a bucket, and
//! from the durations it logs) with and without the agent.
//! Targets: 0 batches, ≤ 0.05 CPU-s/min at 50 pods, kube-proxy unchanged
//! within noise. Prints a table; asserts nothing.
//!
//! Run as root: `cargo bench --bench coexist`. Env: COEXIST_CHURN_SECS
//! (seconds of churn per row, default 20), COEXIST_MODES (default
//! `nftables,iptables`).

#[path = "../tests/agent/harness.rs"]
mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use harness::{annotation, wait_for, World, NODE};
use support::agent_view::{self, Counters};
use support::kube_proxy::{KubeProxy, ProxyMode};
use support::netns::PUBLIC_IP;
use support::services::{self, Services, TARGET_PORT};

const SERVICES: usize = 200;
const SMALL: u32 = 50;
const LARGE: u32 = 1000;
const PORTS_PER_POD: u32 = 5;
const CHURN_RATE: u32 = 5;
const LONG: Duration = Duration::from_secs(600);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this must not start clusters and measure.
    if !std::env::args().any(|a| a == "--bench") {
        println!("coexist: run with `cargo bench --bench coexist`");
        return;
    }
    let churn = Duration::from_secs(
        std::env::var("COEXIST_CHURN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let modes = std::env::var("COEXIST_MODES").unwrap_or_else(|_| "nftables,iptables".into());
    let mut rows = Vec::new();
    for mode in modes.split(',') {
        let mode = match mode.trim() {
            "nftables" => ProxyMode::Nftables,
            "iptables" => ProxyMode::Iptables,
            other => panic!("COEXIST_MODES: unknown mode {other:?}"),
        };
        rows.extend(run_mode(mode, churn));
    }
    println!(
        "\nbeside kube-proxy v1.34.4, {SERVICES} Services, churn {} s at {CHURN_RATE} changes/s per row; \
         agent figures over the churn and until kube-proxy went quiet",
        churn.as_secs()
    );
    println!(
        "{:<10} {:<9} {:>12} {:>10} {:>13} {:>15} {:>16} {:>9} {:>8}",
        "kube-proxy",
        "agent",
        "pods×ports",
        "CPU-s/min",
        "reconc./min",
        "batches (msgs)",
        "kp p50 hist/log",
        "kp mean",
        "kp syncs"
    );
    for r in &rows {
        println!("{r}");
    }
}

/// One measured window.
struct Row {
    mode: ProxyMode,
    agent: Option<&'static str>,
    pods: u32,
    /// CPU-s/min, reconciles/min, (batches, messages) of the agent.
    agent_figures: Option<(f64, f64, Counters)>,
    kp_p50_hist: Option<f64>,
    kp_p50_log: Option<Duration>,
    kp_mean: Option<f64>,
    kp_syncs: f64,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.1}", s * 1000.0));
        let (cpu, rec, batches) = match &self.agent_figures {
            Some((cpu, rec, c)) => (
                format!("{cpu:.3}"),
                format!("{rec:.1}"),
                format!("{} ({})", c.batches, c.messages),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        write!(
            f,
            "{:<10} {:<9} {:>12} {:>10} {:>13} {:>15} {:>16} {:>9} {:>8}",
            self.mode.name(),
            self.agent.unwrap_or("none"),
            if self.agent.is_some() {
                format!("{}×{PORTS_PER_POD}", self.pods)
            } else {
                "-".into()
            },
            cpu,
            rec,
            batches,
            format!(
                "{}/{} ms",
                ms(self.kp_p50_hist),
                ms(self.kp_p50_log.map(|d| d.as_secs_f64()))
            ),
            format!("{} ms", ms(self.kp_mean)),
            self.kp_syncs
        )
    }
}

fn pod(i: u32) -> (String, String, String) {
    let entries: Vec<(u16, u16)> = (0..PORTS_PER_POD)
        .map(|k| ((20000 + i * PORTS_PER_POD + k) as u16, 8000 + k as u16))
        .collect();
    let ip = format!("10.3.{}.{}", i / 250, i % 250 + 1);
    (format!("p-{i}"), annotation(&entries), ip)
}

fn run_mode(mode: ProxyMode, churn: Duration) -> Vec<Row> {
    let w = World::new(&format!("bcx{}", &mode.name()[..3]));
    services::create_node(&w.rt, &w.admin, NODE, PUBLIC_IP);
    services::add_endpoint_addresses(&w.sandbox.pod_b);
    let _backend = harness::EchoServer::start(&w.sandbox.pod_b, TARGET_PORT);
    let svcs = Services::create(&w.rt, &w.admin, SERVICES);
    w.create_running_pods((0..SMALL).map(pod).collect());
    let kp = KubeProxy::start(
        &w.sandbox.node,
        &w.cluster.admin_kubeconfig,
        mode,
        NODE,
        &w.cluster.dir,
    );
    kp.quiesce();

    let mut rows = vec![measure(&w, &kp, &svcs, churn, None, SMALL)];
    eprintln!("{}", rows[0]);
    for pods in [SMALL, LARGE] {
        if pods == LARGE {
            let t0 = Instant::now();
            w.create_running_pods((SMALL..LARGE).map(pod).collect());
            eprintln!(
                "{} more pods created in {:.1} s",
                LARGE - SMALL,
                t0.elapsed().as_secs_f64()
            );
        }
        for flavor in ["nftables", "iptables"] {
            let row = measure(&w, &kp, &svcs, churn, Some(flavor), pods);
            eprintln!("{row}");
            rows.push(row);
        }
    }
    rows
}

/// One churn window, with the agent in `flavor` holding `pods` pods (or
/// without the agent).
fn measure(
    w: &World,
    kp: &KubeProxy,
    svcs: &Services,
    churn: Duration,
    flavor: Option<&'static str>,
    pods: u32,
) -> Row {
    let node = &w.sandbox.node;
    let agent = flavor.map(|f| {
        let agent = w.start_agent(&[&format!("-firewallflavor={f}")]);
        agent.wait_first_sync();
        let want = (pods * PORTS_PER_POD) as usize;
        wait_for("the agent's rules for every pod", LONG, || {
            agent_view::mappings(node, f) == want
        });
        // Let the start settle (its first commits' echoes, the events).
        std::thread::sleep(Duration::from_secs(2));
        agent
    });
    let before = agent
        .as_ref()
        .map(|a| (agent_view::cpu_seconds(a.child.id()), Counters::read(node)));
    let (hist0, logged0) = (kp.syncs(), kp.logged_syncs().len());
    let t0 = Instant::now();
    svcs.churn(&w.rt, churn, CHURN_RATE);
    kp.quiesce();
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    let hist = kp.syncs().since(&hist0);
    let mut logged: Vec<Duration> = kp.logged_syncs().split_off(logged0);
    logged.sort();

    let agent_figures = agent.as_ref().zip(before).map(|(a, (cpu0, c0))| {
        assert!(a.running(), "the agent exited:\n{}", a.log());
        let cpu = agent_view::cpu_seconds(a.child.id()) - cpu0;
        let c = Counters::read(node).since(c0);
        (cpu / minutes, c.reconciles / minutes, c)
    });
    if let (Some(agent), Some(f)) = (agent, flavor) {
        drop(agent);
        agent_view::cleanup(node, f);
    }
    Row {
        mode: kp.mode,
        agent: flavor,
        pods,
        agent_figures,
        kp_p50_hist: hist.quantile(0.5),
        kp_p50_log: (!logged.is_empty()).then(|| logged[(logged.len() - 1) / 2]),
        kp_mean: hist.mean(),
        kp_syncs: hist.count,
    }
}
