//! The cost of never shadowing the node's own services (issue 27): the
//! NETLINK_SOCK_DIAG dump the agent reads before each plan, on a node with
//! few and with many sockets, and what the guard adds to a full plan at
//! 5,000 mappings (the lookup of each held key and each claim in the
//! node's sockets). Medians of repeated runs on the release build; prints a
//! table, asserts nothing.
//!
//! Run as root: `cargo bench --bench guard` (network namespaces of its own).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use netns::Netns;
use podnat_controller::model::{DualStack, Families, PodRef};
use podnat_controller::net::sockets::node_services;
use podnat_controller::plan::{plan, plan_with, PlanConfig, PodFacts};

const PODS: u16 = 1000;
const PORTS_PER_POD: u16 = 5;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_n<T>(n: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

/// 1000 pods × 5 ports on the public address (ports 10000 + 5i + k).
fn pods() -> Vec<PodFacts> {
    (0..PODS)
        .map(|i| {
            let entries: Vec<String> = (0..PORTS_PER_POD)
                .map(|k| {
                    let p = 10000 + i * PORTS_PER_POD + k;
                    format!(r#"{{"srcPort":{p},"dstPort":{p}}}"#)
                })
                .collect();
            PodFacts {
                pod: PodRef::new("bench", format!("p{i}")),
                node: Some("node1".into()),
                ips: DualStack::v4(Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1)),
                created: None,
                ready: true,
                terminating: false,
                finished: false,
                annotation: Some(format!(r#"{{"entries":[{}]}}"#, entries.join(","))),
                host_network: false,
                namespace_policy: Default::default(),
            }
        })
        .collect()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "| node sockets (TCP listeners + bound UDP) | one dump of both families (median of 200) |"
    );
    println!("|---|---|");
    for sockets in [10usize, 200, 2000] {
        let ns = Netns::new("guard-bench");
        // Half TCP listeners, half bound UDP sockets, on loopback.
        let held: (Vec<TcpListener>, Vec<UdpSocket>) = ns.run(|| {
            let tcp = (0..sockets / 2)
                .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            let udp = (0..sockets / 2)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            (tcp, udp)
        });
        let t = ns.run(|| time_n(200, || node_services(Families::default()).unwrap()));
        println!("| {sockets} | {:.1} µs |", t.as_secs_f64() * 1e6);
        drop(held);
    }

    let pods = pods();
    let cfg = PlanConfig {
        node_id: "node1".into(),
        restricted_ports: [22, 53, 6443].into(),
        families: Families::default(),
        local_access: false,
        source_ranges: true,
    };
    let public = DualStack::v4(Ipv4Addr::new(203, 0, 113, 7));
    // A node's usual services: a few dozen listeners, some on ports a pod
    // claims (refused).
    let ns = Netns::new("guard-plan");
    let _socks: Vec<TcpListener> = ns.run(|| {
        (0..40)
            .map(|i| TcpListener::bind(("0.0.0.0", 10000 + i * 125)).unwrap())
            .collect()
    });
    let services = ns.run(|| node_services(Families::default()).unwrap());
    let without = time_n(21, || plan(&pods, public, &cfg));
    let with = time_n(21, || plan_with(&pods, public, &services, &cfg));
    let table = plan_with(&pods, public, &services, &cfg);
    let held = time_n(21, || {
        table
            .rules
            .dnat
            .iter()
            .filter(|m| services.serving(&m.key).is_some())
            .count()
    });
    println!();
    println!(
        "| full plan of {} mappings | time (median of 21) |",
        PODS * PORTS_PER_POD
    );
    println!("|---|---|");
    println!(
        "| without the guard | {:.2} ms |",
        without.as_secs_f64() * 1e3
    );
    println!(
        "| with the guard ({} sockets, {} entries refused) | {:.2} ms |",
        services.len(),
        table.refused.len(),
        with.as_secs_f64() * 1e3
    );
    println!(
        "| held keys after a socket change (a lookup per mapping) | {:.3} ms |",
        held.as_secs_f64() * 1e3
    );
}
