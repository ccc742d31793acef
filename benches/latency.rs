//! Agent latency and footprint against the real apiserver (tests/cluster) and
//! the kernel (a netns sandbox), with the release binary:
//! 1. status update that gives a pod its IP → its DNAT element in the kernel,
//!    p50/p99 over 200 pods, one after another;
//! 2. 1000 annotated pods (5 ports each) created at once → all 5000 elements
//!    in the kernel; then a fresh agent's start → first sync with them;
//! 3. the agent's peak RSS (VmHWM) holding those 1000 pods / 5000 ports.
//!
//! Prints figures; asserts nothing. Run as root: `cargo bench --bench latency`.

#[path = "../tests/agent/harness.rs"]
mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness::{annotation, wait_for, Agent, World, NODE};
use podnat_controller::firewall::nftables::NftablesBackend;
use podnat_controller::firewall::{Backend, Names};
use support::netns::Netns;

const LATENCY_PODS: u16 = 200;
const BULK_PODS: u32 = 1000;
const PORTS_PER_POD: u32 = 5;
const LONG: Duration = Duration::from_secs(600);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this must not start clusters and measure.
    if !std::env::args().any(|a| a == "--bench") {
        println!("latency: run with `cargo bench --bench latency`");
        return;
    }
    latency();
    bulk();
}

/// Public ports in the kernel's DNAT map, read over netlink in the node
/// namespace (a dump per call; cheap next to the agent's own work).
fn kernel_ports(node: &Netns) -> BTreeSet<u16> {
    node.run(|| {
        NftablesBackend::new(Names::new("podnat"))
            .read()
            .map(|r| r.dnat.iter().map(|m| m.key.public_port).collect())
            .unwrap_or_default()
    })
}

/// Polls from a thread inside `node` until `port` is in the DNAT map.
fn wait_port(node: &Netns, port: u16) -> Instant {
    node.run(|| {
        let mut backend = NftablesBackend::new(Names::new("podnat"));
        let deadline = Instant::now() + LONG;
        loop {
            if let Ok(r) = backend.read() {
                if r.dnat.iter().any(|m| m.key.public_port == port) {
                    return Instant::now();
                }
            }
            assert!(Instant::now() < deadline, "port {port} never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency() {
    let w = World::new("blat");
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let mut samples = Vec::new();
    for i in 0..LATENCY_PODS {
        let name = format!("lat-{i}");
        let port = 10000 + i;
        w.create_pod(&name, NODE, Some(&annotation(&[(port, 80)])));
        let t0 = Instant::now();
        w.set_running(&name, &pod_ip(u32::from(i)).to_string());
        samples.push(wait_port(&w.sandbox.node, port) - t0);
    }
    samples.sort();
    println!(
        "status update → DNAT element in the kernel, {} pods one by one: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 1.0)),
    );
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 3, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn bulk() {
    let w = World::new("bbulk");
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let want: BTreeSet<u16> = (0..BULK_PODS * PORTS_PER_POD)
        .map(|p| 20000 + p as u16)
        .collect();

    let t0 = Instant::now();
    w.create_running_pods(
        (0..BULK_PODS)
            .map(|i| {
                let entries: Vec<(u16, u16)> = (0..PORTS_PER_POD)
                    .map(|k| ((20000 + i * PORTS_PER_POD + k) as u16, 8000 + k as u16))
                    .collect();
                (
                    format!("bulk-{i}"),
                    annotation(&entries),
                    pod_ip(i).to_string(),
                )
            })
            .collect(),
    );
    let created = t0.elapsed();
    wait_for("all bulk ports in the kernel", LONG, || {
        kernel_ports(&w.sandbox.node).is_superset(&want)
    });
    let converged = t0.elapsed();
    println!(
        "{BULK_PODS} pods × {PORTS_PER_POD} ports created at once (32 clients): API calls done after {:.2} s, all {} elements in the kernel after {:.2} s",
        created.as_secs_f64(),
        want.len(),
        converged.as_secs_f64()
    );
    print_memory(&agent, "the agent that followed the creation");
    let batches = agent.count("applied one batch");
    println!("  batches it applied meanwhile: {batches}");

    // A fresh agent starting with all of them in the cluster.
    drop(agent);
    let t0 = Instant::now();
    let fresh = w.start_agent(&[]);
    fresh.wait_first_sync();
    println!(
        "fresh agent with {BULK_PODS} pods / {} ports present (kernel already holds them): start → first sync {:.2} s",
        want.len(),
        t0.elapsed().as_secs_f64()
    );
    print_memory(&fresh, "a fresh agent after its first sync");
}

fn print_memory(agent: &Agent, what: &str) {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.trim_start_matches(name).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "  {what}: peak RSS (VmHWM) {}, RSS now {}",
        field("VmHWM:"),
        field("VmRSS:")
    );
}
