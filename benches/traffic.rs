//! The cost of a scrape of the per-mapping traffic counters (issue 25):
//! the kernel dump (nftables: the elements of `mapping_traffic`; iptables
//! with `-iptablescounters`: the rules of `<PREFIX>_COUNT`) and the
//! Prometheus text of both counters (`http::traffic::encode`), at 100,
//! 1,000 and 5,000 published ports, beside what an admin would run without
//! the agent (`nft -j list set`, `iptables-nft -t mangle -L -v -x -n`,
//! which print the same counters). No peer counts per published port.
//! Medians of repeated runs; prints a table, asserts nothing.
//!
//! Then the per-packet cost of counting: the round trip of a UDP datagram
//! to a published port and its echo (both directions cross the node)
//! beside N other mappings, the echoed mapping last in key order — the
//! iptables flavor without and with `-iptablescounters` (every DNATed
//! packet walks `<PREFIX>_COUNT` up to its rule), the nftables flavor (one
//! set lookup).
//!
//! Run as root: `cargo bench --bench traffic` (network namespaces of its own).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Netns, Sandbox, POD_A_IP};
use podnat_controller::config::{Flavor, JumpPositions};
use podnat_controller::firewall::flavors::iptables::IptablesBackend;
use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::{Backend, Names, TrafficSource};
use podnat_controller::http::traffic::encode;
use podnat_controller::model::{Families, Mapping, NatKey, PodRef, Proto, RuleSet};

const REPS: usize = 41;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `n` TCP ports of 203.0.113.7, one pod per 10 ports.
fn table(n: u32) -> RuleSet {
    let public: IpAddr = "203.0.113.7".parse().unwrap();
    let mut r = RuleSet::default();
    for i in 0..n {
        let pod = i / 10;
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip: public,
                public_port: 1024 + i as u16,
                proto: Proto::Tcp,
            },
            pod_ip: IpAddr::from([10, 1, (pod / 250) as u8, (pod % 250 + 2) as u8]),
            pod_port: 80,
            owner: PodRef::new("bench", format!("pod-{pod}")),
            span: 0,
        });
    }
    r.normalize();
    r
}

fn main() {
    scrape_rows();
    println!();
    println!("counting walk: UDP round trip through the NAT (median of {RTT_REPS}), microseconds; the echoed mapping is the last of N+1 in key order");
    println!("| N other mappings | iptables | iptables -iptablescounters | nftables |");
    println!("|---|---|---|---|");
    for n in [0u32, 1000, 5000] {
        let cells: Vec<String> = [
            (Flavor::Iptables, false),
            (Flavor::Iptables, true),
            (Flavor::Nftables, false),
        ]
        .into_iter()
        .map(|(flavor, counters)| {
            format!("{:.1}", round_trip(flavor, counters, n).as_secs_f64() * 1e6)
        })
        .collect();
        println!("| {n} | {} |", cells.join(" | "));
    }
}

const RTT_REPS: usize = 2001;

/// The median round trip of a datagram from the client to 203.0.113.7:65000
/// (pod A's echo on 7000) with `table(n)` published beside it.
fn round_trip(flavor: Flavor, counters: bool, n: u32) -> Duration {
    let sb = Sandbox::new("bwalk");
    let mut rules = table(n);
    rules.dnat.push(Mapping {
        key: NatKey {
            public_ip: "203.0.113.7".parse().unwrap(),
            public_port: 65000,
            proto: Proto::Udp,
        },
        pod_ip: POD_A_IP.parse().unwrap(),
        pod_port: 7000,
        owner: PodRef::new("bench", "echo"),
        span: 0,
    });
    rules.forward.push(podnat_controller::model::ForwardRule {
        pod_ip: POD_A_IP.parse().unwrap(),
        proto: Proto::Udp,
        pod_port: 7000,
        owner: PodRef::new("bench", "echo"),
        span: 0,
    });
    rules.normalize();
    sb.node.run(move || {
        let names = Names::new("podnat");
        let mut backend: Box<dyn Backend> = match flavor {
            Flavor::Nftables => Box::new(NftablesBackend::new(names)),
            Flavor::Iptables => Box::new(
                IptablesBackend::new(names, JumpPositions::default()).with_counters(counters),
            ),
        };
        backend.apply(&rules).unwrap();
    });
    let echo = sb
        .pod_a
        .run(|| std::net::UdpSocket::bind("0.0.0.0:7000").unwrap());
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        echo.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        while let Ok((len, from)) = echo.recv_from(&mut buf) {
            if len == 1 {
                break;
            }
            echo.send_to(&buf[..len], from).unwrap();
        }
    });
    let rtt = sb.client.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("203.0.113.7:65000").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let mut times = Vec::with_capacity(RTT_REPS);
        for _ in 0..RTT_REPS {
            let t = Instant::now();
            s.send(&[7u8; 32]).unwrap();
            s.recv(&mut buf).expect("the echo");
            times.push(t.elapsed());
        }
        s.send(&[0u8]).unwrap();
        median(times)
    });
    server.join().unwrap();
    rtt
}

fn scrape_rows() {
    println!("traffic scrape benchmark: medians of {REPS} runs, milliseconds (wall); one machine, compare within this run only");
    println!(
        "| flavor | ports | dump | encode (text) | scrape total | body KiB | the admin's listing |"
    );
    println!("|---|---|---|---|---|---|---|");
    for flavor in [Flavor::Nftables, Flavor::Iptables] {
        for n in [100u32, 1000, 5000] {
            row(flavor, n);
        }
    }
}

fn row(flavor: Flavor, n: u32) {
    let ns = Netns::new("btr");
    let rules = table(n);
    let r = rules.clone();
    let (read, text, total, kib) = ns.run(move || {
        let names = Names::new("podnat");
        let mut backend: Box<dyn Backend> = match flavor {
            Flavor::Nftables => Box::new(NftablesBackend::new(names.clone())),
            Flavor::Iptables => Box::new(
                IptablesBackend::new(names.clone(), JumpPositions::default()).with_counters(true),
            ),
        };
        backend.apply(&r).unwrap();
        let source = TrafficSource::for_flavor(flavor, names, Families::default(), true).unwrap();
        let (mut read, mut text, mut total) = (vec![], vec![], vec![]);
        let mut kib = 0.0;
        for _ in 0..REPS {
            let t = Instant::now();
            let traffic = source.read(r.dnat.len()).unwrap().unwrap();
            let t1 = t.elapsed();
            let mut body = String::new();
            encode(&mut body, &traffic, &r.dnat, false);
            let t2 = t.elapsed();
            assert_eq!(traffic.len(), r.dnat.len());
            kib = body.len() as f64 / 1024.0;
            read.push(t1);
            text.push(t2 - t1);
            total.push(t2);
        }
        (median(read), median(text), median(total), kib)
    });
    let listing: &[&str] = match flavor {
        Flavor::Nftables => &[
            "nft",
            "-j",
            "list",
            "set",
            "ip",
            "podnat",
            "mapping_traffic",
        ],
        Flavor::Iptables => &[
            "iptables-nft",
            "-t",
            "mangle",
            "-L",
            "PODNAT_COUNT",
            "-v",
            "-x",
            "-n",
        ],
    };
    let admin: Vec<Duration> = (0..REPS / 4)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .args(listing)
                .output()
                .unwrap();
            assert!(out.status.success());
            t.elapsed()
        })
        .collect();
    println!(
        "| {} | {n} | {} | {} | {} | {kib:.0} | {} |",
        if flavor == Flavor::Nftables {
            "nftables"
        } else {
            "iptables"
        },
        ms(read),
        ms(text),
        ms(total),
        ms(median(admin))
    );
}
