//! Agent latency and footprint against the real apiserver (tests/cluster) and
//! the kernel (a netns sandbox), with the release binary:
//! 1. status update that gives a pod its IP → its DNAT element in the kernel,
//!    p50/p99 over 200 pods, one after another;
//! 2. 1000 annotated pods (5 ports each) created at once → all 5000 elements
//!    in the kernel; then a fresh agent's start → first sync with them;
//! 3. the agent's peak RSS (VmHWM) holding those 1000 pods / 5000 ports,
//!    and its resident set once settled after the burst;
//! 4. an idle agent's resident set: 10 pods × 5 ports, settled.
//!
//! Prints figures; asserts nothing. Run as root: `cargo bench --bench latency`
//! (`-- idle bulk` for some of the parts).

#[path = "../tests/agent/harness.rs"]
mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness::{annotation, wait_for, Agent, World, NODE};
use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::wire::netlink;
use podnat_controller::firewall::{Backend, Names};
use support::netns::Netns;

const LATENCY_PODS: u16 = 200;
const BULK_PODS: u32 = 1000;
const PORTS_PER_POD: u32 = 5;
const LONG: Duration = Duration::from_secs(600);
const IDLE_PODS: u32 = 10;
/// How long the agent is left alone before its "steady" resident set is
/// read: past the debounce, the state store's write and the events.
const SETTLE: Duration = Duration::from_secs(5);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this must not start clusters and measure.
    if !std::env::args().any(|a| a == "--bench") {
        println!("latency: run with `cargo bench --bench latency`");
        return;
    }
    // `cargo bench --bench latency -- idle bulk` runs only those parts.
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let parts: [(&str, fn()); 3] = [("idle", idle), ("latency", latency), ("bulk", bulk)];
    for (name, part) in parts {
        if names.is_empty() || names.iter().any(|n| n == name) {
            part();
        }
    }
}

/// Public ports in the kernel's DNAT map, read over netlink in the node
/// namespace (a dump per call; cheap next to the agent's own work).
fn kernel_ports(node: &Netns) -> BTreeSet<u16> {
    node.run(|| {
        // The agent's layout: -localaccess is on by default.
        NftablesBackend::with_options(Names::new("podnat"), Default::default(), true)
            .read()
            .map(|r| r.dnat.iter().map(|m| m.key.public_port).collect())
            .unwrap_or_default()
    })
}

/// Listens for nf_tables notifications in `node` (subscribed before the
/// change is made, so nothing is missed) and returns when one adds a DNAT
/// element for TCP `port` — without dumping the table, which at 5000 ports
/// would load the machine the agent is measured on.
struct PortWatch {
    fd: std::os::fd::OwnedFd,
}

impl PortWatch {
    fn new(node: &Netns) -> PortWatch {
        let fd = node.run(|| {
            netlink::open_netfilter_socket(1 << (netlink::sys::NFNLGRP_NFTABLES - 1))
                .expect("subscribe")
        });
        PortWatch { fd }
    }

    fn wait(&self, port: u16) -> Instant {
        use std::os::fd::AsRawFd;
        // The element key ends in `tcp . port`: [6,0,0,0] then the port in
        // network order padded to 4 bytes.
        let [hi, lo] = port.to_be_bytes();
        let needle = [6u8, 0, 0, 0, hi, lo, 0, 0];
        let newsetelem =
            ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | netlink::sys::NFT_MSG_NEWSETELEM as u16;
        let mut buf = vec![0u8; 1 << 20];
        let deadline = Instant::now() + LONG;
        loop {
            assert!(Instant::now() < deadline, "port {port} never arrived");
            let n = match nix::sys::socket::recv(
                self.fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("reading notifications: {e}"),
            };
            let found = netlink::parse_all(&buf[..n]).any(|m| {
                m.msg_type == newsetelem && m.attrs.windows(needle.len()).any(|w| w == needle)
            });
            if found {
                return Instant::now();
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// 1000 running pods × 5 ports, created at once; returns the ports.
fn install_bulk(w: &World) -> BTreeSet<u16> {
    install_pods(w, BULK_PODS)
}

/// `count` running pods × 5 ports, created at once; returns the ports.
fn install_pods(w: &World, count: u32) -> BTreeSet<u16> {
    let want: BTreeSet<u16> = (0..count * PORTS_PER_POD)
        .map(|p| 20000 + p as u16)
        .collect();
    w.create_running_pods(
        (0..count)
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
    want
}

/// An agent with a few pods, left alone: what a quiet node pays.
fn idle() {
    let w = World::new("bidle");
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let want = install_pods(&w, IDLE_PODS);
    wait_for("the idle pods' ports in the kernel", LONG, || {
        kernel_ports(&w.sandbox.node).is_superset(&want)
    });
    std::thread::sleep(SETTLE);
    print_memory(
        &agent,
        &format!("idle agent, {IDLE_PODS} pods × {PORTS_PER_POD} ports, settled"),
    );
}

fn latency() {
    let w = World::new("blat");
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let installed = install_bulk(&w);
    wait_for("all bulk ports in the kernel", LONG, || {
        kernel_ports(&w.sandbox.node).is_superset(&installed)
    });
    let watch = PortWatch::new(&w.sandbox.node);
    let mut samples = Vec::new();
    for i in 0..LATENCY_PODS {
        let name = format!("lat-{i}");
        let port = 10000 + i;
        w.create_pod(&name, NODE, Some(&annotation(&[(port, 80)])));
        let t0 = Instant::now();
        w.set_running(&name, &pod_ip(BULK_PODS + u32::from(i)).to_string());
        samples.push(watch.wait(port) - t0);
    }
    samples.sort();
    println!(
        "status update → DNAT element in the kernel, {} pods one by one beside {} installed ports: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        installed.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 1.0)),
    );
    print_memory(&agent, "this agent (1000 pods × 5 ports + 200 pods)");
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 3, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn bulk() {
    let w = World::new("bbulk");
    let agent = w.start_agent(&[]);
    agent.wait_first_sync();
    let t0 = Instant::now();
    let want = install_bulk(&w);
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
    std::thread::sleep(SETTLE);
    print_memory(&agent, "the same agent, settled after the burst");
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
    // PODNAT_SMAPS_DIR=DIR keeps each reading's /proc/PID/smaps: which
    // mappings (heap, a thread's arena, the binary) hold the memory.
    if let Ok(dir) = std::env::var("PODNAT_SMAPS_DIR") {
        let _ = std::fs::copy(
            format!("/proc/{}/smaps", agent.child.id()),
            format!("{dir}/{}", what.replace(' ', "_")),
        );
    }
    println!(
        "  {what}: peak RSS (VmHWM) {}, RSS now {} (anonymous {}, file {}), threads {}",
        field("VmHWM:"),
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
        field("Threads:"),
    );
}
