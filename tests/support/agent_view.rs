//! The running agent as seen from outside, per flavor: its /metrics
//! counters (HTTP on 8484 in the node namespace), its DNAT mappings and
//! rules in the kernel, and its CPU time from /proc.

use super::kube_proxy::{http_get, sample};
use super::netns::Netns;
use super::ruleset;

/// DNAT mappings the agent holds in the kernel: elements of its map
/// (nftables flavor) or DNAT rules of its chains (iptables flavor).
pub fn mappings(node: &Netns, flavor: &str) -> usize {
    match flavor {
        "nftables" => {
            let out = node.try_sh("nft -j list map ip podnat dnat_to_pod");
            if !out.status.success() {
                return 0;
            }
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j");
            doc["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["map"]["elem"].as_array())
                .map(Vec::len)
                .sum()
        }
        _ => ruleset::iptables_lines(node, |l| {
            l.starts_with("-A PODNAT") && l.contains("-j DNAT")
        })
        .len(),
    }
}

/// The agent's rules in the kernel: its table (nftables flavor), or its
/// chains and its jumps in the parent chains, in order (iptables flavor).
pub fn rules(node: &Netns, flavor: &str) -> Vec<String> {
    match flavor {
        "nftables" => ruleset::nft_table(node, "ip", "podnat", false),
        _ => ruleset::iptables_lines(node, |l| l.contains("PODNAT") || l.contains("podnat")),
    }
}

/// Counters since the agent started, from its /metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub reconciles: f64,
    /// Batches sent (applies with at least one message).
    pub batches: f64,
    pub messages: f64,
}

impl Counters {
    pub fn read(node: &Netns) -> Counters {
        let text = http_get(node, 8484, "/metrics").expect("the agent's /metrics");
        let get = |series: &str| {
            sample(&text, series).unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
        };
        Counters {
            reconciles: get("podnat_reconciles_total"),
            batches: get("podnat_batch_messages_count"),
            messages: get("podnat_batch_messages_sum"),
        }
    }

    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            reconciles: self.reconciles - earlier.reconciles,
            batches: self.batches - earlier.batches,
            messages: self.messages - earlier.messages,
        }
    }
}

/// User + system CPU seconds of process `pid` so far (/proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let (_, rest) = stat.rsplit_once(") ").expect("stat format");
    // rest[0] is field 3 (state): utime and stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Runs the agent's binary in `node` with `args`, which must succeed; its
/// standard output.
pub fn agent_cli(node: &Netns, args: &[&str]) -> String {
    let out = node
        .command(env!("CARGO_BIN_EXE_podnat-controller"))
        .args(args)
        .output()
        .expect("run the agent");
    assert!(
        out.status.success(),
        "podnat-controller {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `podnat-controller cleanup` in `node` (`flavor` as a run of that flavor
/// would pass it; cleanup covers both): everything the agent owns removed,
/// nothing else.
pub fn cleanup(node: &Netns, flavor: &str) {
    agent_cli(node, &["cleanup", &format!("-firewallflavor={flavor}")]);
}
