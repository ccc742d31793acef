//! The cost of a scrape of the per-mapping traffic counters (issue 25):
//! the kernel dump (nftables: the elements of `mapping_traffic`; iptables
//! with `-iptablescounters`: the rules of `<PREFIX>_COUNT`) and the
//! Prometheus text of both counters (`http::traffic::encode`), at 100,
//! 1,000 and 5,000 published ports, beside what an admin would run without
//! the agent (`nft -j list set`, `iptables-nft -t mangle -L -v -x -n`,
//! which print the same counters). No peer counts per published port.
//! Medians of repeated runs; prints a table, asserts nothing.
//!
//! Run as root: `cargo bench --bench traffic` (network namespaces of its own).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::Netns;
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
