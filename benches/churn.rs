//! Churn benchmark: full install of N ports (3 rules or elements each), add 1
//! and delete 1 port with N installed — ours (both flavors) beside the peers, in one run,
//! each in fresh network namespaces. Prints medians and ratios; asserts
//! nothing. Run: `cargo bench --bench churn` (root; ~10 min).
//!
//! Peers: (A) one `iptables-nft` process per rule, `-C` then `-A` (what the
//! Go version did through go-iptables), (B) `iptables-nft-restore --noflush`,
//! (C) `nft -f` with one rule per mapping, (M) `nft -f` with the same maps as
//! ours. The floor is the kernel's own time for our batch: encoded once,
//! only send + answers timed.

#[path = "churn/loop_rows.rs"]
mod churn_loop;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::Netns;
use podnat_controller::config::JumpPositions;
use podnat_controller::firewall::flavors::iptables::IptablesBackend;
use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::{view, Backend, Changes, Names};
use podnat_controller::model::{
    Family, ForwardRule, Mapping, NatKey, PodRef, Proto, RuleSet, SnatRule,
};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const REPS: usize = 5;
/// Runs of our own add/delete rows and their floors: a change of 0.05–0.1 ms
/// on a shared machine varies by ±20 % from run to run, and five runs left
/// the ratio to its floor swinging by 0.2; these cost a second per size.
const CHANGE_REPS: usize = 21;

/// A commit that deleted rules leaves their destructors to a kernel work item
/// that runs after an RCU grace period, and the next rule with an xt-compat
/// match or target (every rule of the iptables flavor and of iptables-nft)
/// waits for that work first (nft_compat.c, `nft_compat_wait_for_destructors`):
/// 5–20 ms here. Every timed operation starts on a settled kernel, so a
/// figure is that operation's own cost, not its predecessor's grace period.
/// The wait spins rather than sleeps: a CPU woken from idle would add its
/// wake-up and cold caches to a figure of a few microseconds.
const SETTLE: Duration = Duration::from_millis(50);

pub fn settle() {
    let t = Instant::now();
    while t.elapsed() < SETTLE {
        std::hint::spin_loop();
    }
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// Ports 0..n, each its own pod: one DNAT, one SNAT, one FORWARD.
fn table(n: u32) -> RuleSet {
    table_of(n, PUBLIC.into(), |i| pod_ip(i).into())
}

/// `table` for a public address and pod addresses of any family.
fn table_of(n: u32, public: IpAddr, pod: fn(u32) -> IpAddr) -> RuleSet {
    let mut r = RuleSet::default();
    for i in 0..n {
        let owner = PodRef::new("bench", format!("p-{i}"));
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip: public,
                public_port: 10000 + i as u16,
                proto: Proto::Tcp,
            },
            pod_ip: pod(i),
            pod_port: 80,
            owner: owner.clone(),
            span: 0,
        });
        r.snat.push(SnatRule {
            pod_ip: pod(i),
            proto: Proto::Tcp,
            public_ip: public,
            owner: owner.clone(),
        });
        r.forward.push(ForwardRule {
            pod_ip: pod(i),
            proto: Proto::Tcp,
            pod_port: 80,
            owner,
            span: 0,
        });
    }
    r.normalize();
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One peer process on a settled kernel, timed from spawn to exit.
fn timed(ns: &Netns, mut cmd: Command) -> Duration {
    settle();
    ns.run(move || {
        let t = Instant::now();
        let out = cmd.output().expect("spawn peer");
        let d = t.elapsed();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
}

fn stdin_cmd(program: &str, args: &[&str], file: &str) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(std::fs::File::open(file).unwrap());
    c
}

fn tmpfile(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("podnat-bench-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

// --- iptables text of N ports (peer A/B) ---
fn ipt_lines(n_from: u32, n_to: u32) -> Vec<(String, String)> {
    ipt_lines_of(&table(n_to), n_from, n_to, |i| pod_ip(i).into())
}

/// (table, `-A ...` line) of ports n_from..n_to of `t`, as
/// iptables-nft-save (ip6tables-nft-save) prints them.
fn ipt_lines_of(
    t: &RuleSet,
    n_from: u32,
    n_to: u32,
    pod: fn(u32) -> IpAddr,
) -> Vec<(String, String)> {
    let names = Names::new("podnat");
    let mut out = Vec::new();
    for i in n_from..n_to {
        let ip = pod(i);
        let d = t.dnat.iter().find(|m| m.pod_ip == ip).unwrap();
        let s = t.snat.iter().find(|s| s.pod_ip == ip).unwrap();
        let f = t.forward.iter().find(|f| f.pod_ip == ip).unwrap();
        out.push(("nat".to_string(), view::ipt_dnat(&names, d, None)));
        out.push(("nat".to_string(), view::ipt_snat(&names, s)));
        out.push(("filter".to_string(), view::ipt_forward(&names, f)));
    }
    out
}

/// The peers' chains hang off the base chains as ours do (and as the Go
/// version's did): a chain no base chain reaches filters nothing, and its
/// rules cost the kernel less — a commit that adds a rule with a NAT target
/// validates every rule reachable from the table's base chains (5 ms more
/// per add at 5,000 ports here, `nf_tables_validate`).
fn peer_jumps() -> [(&'static str, String); 3] {
    let n = Names::new("podnat");
    [
        ("nat", view::ipt_jump(&n, "PREROUTING", &n.pre)),
        ("nat", view::ipt_jump(&n, "POSTROUTING", &n.post)),
        ("filter", view::ipt_jump(&n, "FORWARD", &n.forward)),
    ]
}

fn restore_file(lines: &[(String, String)], delete: bool, with_chains: bool) -> String {
    let mut s = String::new();
    for tbl in ["nat", "filter"] {
        let _ = writeln!(s, "*{tbl}");
        if with_chains {
            if tbl == "nat" {
                s.push_str(":PODNAT_PRE - [0:0]\n:PODNAT_POST - [0:0]\n");
            } else {
                s.push_str(":PODNAT_FORWARD - [0:0]\n");
            }
            for (t, jump) in peer_jumps() {
                if t == tbl {
                    let _ = writeln!(s, "{jump}");
                }
            }
        }
        for (t, l) in lines {
            if t == tbl {
                let l = if delete {
                    l.replacen("-A ", "-D ", 1)
                } else {
                    l.clone()
                };
                let _ = writeln!(s, "{l}");
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// iptables-save text → argv for iptables-nft (quotes around the comment).
fn ipt_argv(table: &str, line: &str, op: &str) -> Vec<String> {
    let mut v = vec!["-t".to_string(), table.to_string()];
    let mut rest = line.to_string();
    let mut parts = Vec::new();
    while !rest.is_empty() {
        rest = rest.trim_start().to_string();
        if let Some(stripped) = rest.strip_prefix('"') {
            let end = stripped.find('"').unwrap();
            parts.push(stripped[..end].to_string());
            rest = stripped[end + 1..].to_string();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            parts.push(rest[..end].to_string());
            rest = rest[end..].to_string();
        }
    }
    parts[0] = op.to_string();
    v.extend(parts);
    v
}

// --- nft text (peers C and M) ---
const C_HEAD: &str = "table ip podnatc {\n\tchain c_pre { type nat hook prerouting priority dstnat - 1; policy accept; }\n\tchain c_post { type nat hook postrouting priority srcnat - 1; policy accept; }\n\tchain c_fwd { type filter hook forward priority filter - 1; policy accept; }\n}\n";

fn c_rules(n_from: u32, n_to: u32) -> String {
    let mut s = String::new();
    for i in n_from..n_to {
        let p = 10000 + i;
        let ip = pod_ip(i);
        let _ = writeln!(s, "add rule ip podnatc c_pre ip daddr {PUBLIC} tcp dport {p} counter dnat to {ip}:80 comment \"bench:p-{i}\"");
        let _ = writeln!(s, "add rule ip podnatc c_post ip saddr {ip} meta l4proto tcp counter snat to {PUBLIC} comment \"bench:p-{i}\"");
        let _ = writeln!(s, "add rule ip podnatc c_fwd ip daddr {ip} tcp dport 80 ct state new counter accept comment \"bench:p-{i}\"");
    }
    s
}

fn m_elements(verb: &str, i: u32) -> String {
    m_elements_of(verb, "ip", PUBLIC.into(), pod_ip(i).into(), i)
}

/// Port `i`'s three elements in the table `fam podnat` (`ip` or `ip6`).
fn m_elements_of(verb: &str, fam: &str, public: IpAddr, ip: IpAddr, i: u32) -> String {
    let p = 10000 + i;
    if verb == "add" {
        format!(
            "add element {fam} podnat dnat_to_pod {{ {public} . tcp . {p} comment \"bench:p-{i}\" : {ip} . 80 }}\n\
             add element {fam} podnat snat_to_public {{ {ip} . tcp comment \"bench:p-{i}\" : {public} }}\n\
             add element {fam} podnat forward_allowed {{ {ip} . tcp . 80 comment \"bench:p-{i}\" }}\n"
        )
    } else {
        format!(
            "delete element {fam} podnat dnat_to_pod {{ {public} . tcp . {p} }}\n\
             delete element {fam} podnat snat_to_public {{ {ip} . tcp }}\n\
             delete element {fam} podnat forward_allowed {{ {ip} . tcp . 80 }}\n"
        )
    }
}

#[derive(Default, Clone)]
struct Row {
    ours: Option<Duration>,
    floor: Option<Duration>,
    ours_ipt: Option<Duration>,
    floor_ipt: Option<Duration>,
    a: Option<Duration>,
    b: Option<Duration>,
    c: Option<Duration>,
    m: Option<Duration>,
    /// The same work through the reconcile loop (churn/loop_rows.rs).
    loop_nft: Option<Duration>,
    loop_ipt: Option<Duration>,
    note: String,
}

/// The three workloads with one of our backends: wall time of `apply`
/// (warm backend) and the kernel's floor (`send_prepared` of a pre-encoded
/// batch). `prepare`/`send_prepared` are the backend's own.
macro_rules! measure_ours {
    ($be:expr, $base:expr, $plus:expr) => {{
        let be = &mut $be;
        let (base, plus) = (&$base, &$plus);
        let (mut install, mut install_floor, mut add, mut add_floor, mut del, mut del_floor) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..REPS {
            be.cleanup().unwrap();
            settle();
            let t = Instant::now();
            be.apply(base).unwrap();
            install.push(t.elapsed());
            be.cleanup().unwrap();
            let batch = be.prepare(base).unwrap().unwrap();
            settle();
            let t = Instant::now();
            be.send_prepared(batch).unwrap();
            install_floor.push(t.elapsed());
        }
        be.apply(base).unwrap(); // warm the generation cache
                                 // As the agent does: one pod's changes, never the whole table.
        let (grow, shrink) = (Changes::between(base, plus), Changes::between(plus, base));
        for _ in 0..CHANGE_REPS {
            // The firewall thread receives the changes it applies (moved
            // from the pass); the copy is made before the clock starts.
            let (g, s) = (grow.clone(), shrink.clone());
            settle();
            let t = Instant::now();
            let r = be.apply_changes(g).unwrap();
            add.push(t.elapsed());
            assert!(r.is_some(), "the change applies on top of the last commit");
            settle();
            let t = Instant::now();
            let r = be.apply_changes(s).unwrap();
            del.push(t.elapsed());
            assert!(r.is_some(), "the change applies on top of the last commit");
            let batch = be.prepare(plus).unwrap().unwrap();
            settle();
            let t = Instant::now();
            be.send_prepared(batch).unwrap();
            add_floor.push(t.elapsed());
            let batch = be.prepare(base).unwrap().unwrap();
            settle();
            let t = Instant::now();
            be.send_prepared(batch).unwrap();
            del_floor.push(t.elapsed());
            be.apply(base).unwrap();
        }
        [
            (median(install), median(install_floor)),
            (median(add), median(add_floor)),
            (median(del), median(del_floor)),
        ]
    }};
}

#[path = "churn/v6.rs"]
mod v6;

fn ours(n: u32) -> [Row; 3] {
    let base = table(n);
    let plus = table(n + 1);
    let ns = Netns::new("bo");
    let (b2, p2) = (base.clone(), plus.clone());
    let nft = ns.run(move || {
        let mut be = NftablesBackend::new(Names::new("podnat"));
        measure_ours!(be, b2, p2)
    });
    let ns = Netns::new("bi");
    let ipt = ns.run(move || {
        let mut be = IptablesBackend::new(Names::new("podnat"), JumpPositions::default());
        measure_ours!(be, base, plus)
    });
    let row = |i: usize| Row {
        ours: Some(nft[i].0),
        floor: Some(nft[i].1),
        ours_ipt: Some(ipt[i].0),
        floor_ipt: Some(ipt[i].1),
        ..Row::default()
    };
    [row(0), row(1), row(2)]
}

/// One range change (`base` → `moved`) and back, `CHANGE_REPS` times, on a
/// backend: median of ours and of the floor (the same batch, prepared).
macro_rules! measure_ranges {
    ($be:expr, $base:expr, $moved:expr) => {{
        let (mut be, base, moved) = ($be, $base, $moved);
        be.apply(&base).unwrap();
        // An install beyond the echo limit (the iptables flavor at 5,000)
        // leaves the handles unknown: read once, as the agent's first
        // change after it would.
        be.read().unwrap();
        let (go, back) = (
            Changes::between(&base, &moved),
            Changes::between(&moved, &base),
        );
        let (mut ours, mut floor) = (vec![], vec![]);
        for _ in 0..CHANGE_REPS {
            let g = go.clone();
            settle();
            let t = Instant::now();
            let r = be.apply_changes(g).unwrap();
            ours.push(t.elapsed());
            assert!(r.is_some(), "the change applies on top of the last commit");
            be.apply_changes(back.clone()).unwrap().unwrap();
            let batch = be.prepare(&moved).unwrap().unwrap();
            settle();
            let t = Instant::now();
            be.send_prepared(batch).unwrap();
            floor.push(t.elapsed());
            be.apply(&base).unwrap();
        }
        (median(ours), median(floor))
    }};
}

/// Source allow-lists (issue 25), both flavors: every port of `table(n)`
/// restricted to one range, then one port's range replaced by two others
/// (`apply_changes`: one range out, two in; in the iptables flavor one DNAT
/// rule out, two in) — beside the kernel's floor for the same batch. No
/// peer offers it. Medians of `CHANGE_REPS`: (nftables, iptables), each
/// (ours, floor).
type Pair = (Duration, Duration);
fn ranges_row(n: u32) -> (Pair, Pair) {
    use podnat_controller::model::SourceRule;
    let restrict = |t: &mut RuleSet, i: u32, ranges: &[&str]| {
        let key = t.dnat[i as usize].key;
        let owner = t.dnat[i as usize].owner.clone();
        t.allow.retain(|a| a.key != key);
        for r in ranges {
            t.allow.push(SourceRule {
                key,
                span: 0,
                source: r.parse().unwrap(),
                owner: owner.clone(),
            });
        }
        t.normalize();
    };
    let mut base = table(n);
    for i in 0..n {
        restrict(&mut base, i, &["198.51.100.0/24"]);
    }
    let mut moved = base.clone();
    restrict(&mut moved, n / 2, &["192.0.2.0/25", "203.0.113.128/25"]);
    let ns = Netns::new("br");
    let (b, m) = (base.clone(), moved.clone());
    let nft = ns.run(move || {
        let be = NftablesBackend::new(Names::new("podnat"));
        measure_ranges!(be, b, m)
    });
    let ns = Netns::new("bri");
    let ipt = ns.run(move || {
        let be = IptablesBackend::new(Names::new("podnat"), JumpPositions::default());
        measure_ranges!(be, base, moved)
    });
    (nft, ipt)
}

/// Port ranges (issue 25), both flavors: one pod's 1,000-port UDP range
/// (one mapping, `apply_changes`) added to and deleted from `table(n)`,
/// beside the kernel's floor for the same batch. nftables: 1,000 DNAT,
/// 1,000 counted and 1,000 FORWARD elements and an SNAT element, beside
/// `nft -f` adding / deleting the same elements (M); iptables: one DNAT
/// rule with a port offset, one FORWARD rule and an SNAT rule, beside
/// `iptables-nft-restore --noflush` of the same lines (B). No peer
/// publishes a range with an offset. Per work (add, delete).
struct RangeRow {
    nft: Pair,
    m: Duration,
    ipt: Pair,
    b: Duration,
}

fn port_range_rows(n: u32) -> [RangeRow; 2] {
    const FIRST: u16 = 40000;
    const SPAN: u16 = 999;
    let base = table(n);
    let mut plus = base.clone();
    let owner = PodRef::new("bench", "rtp");
    let ip = pod_ip(n);
    plus.dnat.push(Mapping {
        key: NatKey {
            public_ip: PUBLIC.into(),
            public_port: FIRST,
            proto: Proto::Udp,
        },
        pod_ip: ip.into(),
        pod_port: 20000,
        owner: owner.clone(),
        span: SPAN,
    });
    plus.snat.push(SnatRule {
        pod_ip: ip.into(),
        proto: Proto::Udp,
        public_ip: PUBLIC.into(),
        owner: owner.clone(),
    });
    plus.forward.push(ForwardRule {
        pod_ip: ip.into(),
        proto: Proto::Udp,
        pod_port: 20000,
        owner,
        span: SPAN,
    });
    plus.normalize();
    let ns = Netns::new("bpr");
    let (b, p) = (base.clone(), plus.clone());
    let (add, del) = ns.run(move || {
        let be = || NftablesBackend::new(Names::new("podnat"));
        (
            measure_ranges!(be(), b.clone(), p.clone()),
            measure_ranges!(be(), p, b),
        )
    });
    let ns = Netns::new("bpri");
    let (b, p) = (base.clone(), plus.clone());
    let (add_ipt, del_ipt) = ns.run(move || {
        let be = || IptablesBackend::new(Names::new("podnat"), JumpPositions::default());
        (
            measure_ranges!(be(), b.clone(), p.clone()),
            measure_ranges!(be(), p, b),
        )
    });
    // B: the range's three rules through iptables-nft-restore.
    let names = Names::new("podnat");
    let range = |t: &RuleSet| -> Vec<(String, String)> {
        let d = t.dnat.iter().find(|m| m.span > 0).unwrap();
        let s = t.snat.iter().find(|s| s.pod_ip == d.pod_ip).unwrap();
        let f = t.forward.iter().find(|f| f.span > 0).unwrap();
        vec![
            ("nat".to_string(), view::ipt_dnat(&names, d, None)),
            ("nat".to_string(), view::ipt_snat(&names, s)),
            ("filter".to_string(), view::ipt_forward(&names, f)),
        ]
    };
    let mut b_rows: [Row; 3] = Default::default();
    restore_rows(
        "bprb",
        "iptables-nft",
        &ipt_lines(0, n),
        &range(&plus),
        &mut b_rows,
    );
    // M: the same elements through `nft -f`, on the same table.
    let (mut dnat, mut counted, mut fwd) = (vec![], vec![], vec![]);
    let comment = format!("{FIRST}-{} bench:rtp", FIRST + SPAN);
    for i in 0..=SPAN {
        let port = FIRST + i;
        dnat.push(format!(
            "{PUBLIC} . udp . {port} comment \"{comment}\" : {ip} . {}",
            20000 + i
        ));
        counted.push(format!("{PUBLIC} . udp . {port} comment \"{comment}\""));
        fwd.push(format!(
            "{ip} . udp . {} comment \"{}-{} bench:rtp\"",
            20000 + i,
            20000,
            20000 + SPAN
        ));
    }
    let keys = |v: &[String]| -> String {
        v.iter()
            .map(|e| e.split(" comment").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let add_text = format!(
        "add element ip podnat dnat_to_pod {{ {} }}\nadd element ip podnat mapping_traffic {{ {} }}\nadd element ip podnat forward_allowed {{ {} }}\nadd element ip podnat snat_to_public {{ {ip} . udp comment \"bench:rtp\" : {PUBLIC} }}\n",
        dnat.join(", "),
        counted.join(", "),
        fwd.join(", ")
    );
    let del_text = format!(
        "delete element ip podnat dnat_to_pod {{ {} }}\ndelete element ip podnat mapping_traffic {{ {} }}\ndelete element ip podnat forward_allowed {{ {} }}\ndelete element ip podnat snat_to_public {{ {ip} . udp }}\n",
        keys(&dnat),
        keys(&counted),
        keys(&fwd)
    );
    let full = view::nft(&base, &Names::new("podnat"), Family::Ipv4);
    let mut m: [Row; 3] = Default::default();
    nft_map_rows("bprm", "ip", &full, &add_text, &del_text, &mut m);
    [
        RangeRow {
            nft: add,
            m: m[1].m.unwrap_or_default(),
            ipt: add_ipt,
            b: b_rows[1].b.unwrap_or_default(),
        },
        RangeRow {
            nft: del,
            m: m[2].m.unwrap_or_default(),
            ipt: del_ipt,
            b: b_rows[2].b.unwrap_or_default(),
        },
    ]
}

fn peer_a(n: u32, rows: &mut [Row; 3]) {
    let ns = Netns::new("ba");
    ns.sh("iptables-nft -t nat -N PODNAT_PRE && iptables-nft -t nat -N PODNAT_POST && iptables-nft -t filter -N PODNAT_FORWARD");
    for (t, jump) in peer_jumps() {
        let argv = ipt_argv(t, &jump, "-A");
        let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
        ns.sh(&format!("iptables-nft {}", quoted.join(" ")));
    }
    let lines = ipt_lines(0, n);
    let run_one = |table: &str, line: &str| -> Duration {
        // go-iptables AppendUnique: `-C` (exit 1 when missing), then `-A`.
        let check = ipt_argv(table, line, "-C");
        let add = ipt_argv(table, line, "-A");
        ns.run(|| {
            let t = Instant::now();
            let _ = Command::new("iptables-nft").args(&check).output().unwrap();
            let st = Command::new("iptables-nft").args(&add).output().unwrap();
            let d = t.elapsed();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            d
        })
    };
    // The full install is O(n²) process work: a few reps only where it is
    // bearable (its figure at 5000 would take the better part of an hour).
    let install_reps = match n {
        0..=100 => REPS,
        101..=1000 => 1,
        _ => 0,
    };
    let mut install = vec![];
    for rep in 0..install_reps.max(1) {
        if rep > 0 || install_reps == 0 {
            ns.sh("iptables-nft -t nat -F PODNAT_PRE; iptables-nft -t nat -F PODNAT_POST; iptables-nft -t filter -F PODNAT_FORWARD");
        }
        if install_reps == 0 {
            // Fill by restore (untimed) so add/delete 1 are measured at n.
            let f = tmpfile("a-fill", &restore_file(&lines, false, false));
            timed(&ns, stdin_cmd("iptables-nft-restore", &["--noflush"], &f));
            break;
        }
        let mut total = Duration::ZERO;
        for (t, l) in &lines {
            total += run_one(t, l);
        }
        install.push(total);
    }
    if !install.is_empty() {
        rows[0].a = Some(median(install));
        if install_reps < REPS {
            rows[0].note.push_str(&format!(" A: {install_reps} rep(s)"));
        }
    } else {
        rows[0].note.push_str(" A: skipped (O(n²) processes)");
    }
    let extra = ipt_lines(n, n + 1);
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        settle();
        add.push(extra.iter().map(|(t, l)| run_one(t, l)).sum());
        settle();
        let t0: Duration = extra
            .iter()
            .map(|(t, l)| {
                let argv = ipt_argv(t, l, "-D");
                ns.run(|| {
                    let t = Instant::now();
                    let st = Command::new("iptables-nft").args(&argv).output().unwrap();
                    assert!(st.status.success());
                    t.elapsed()
                })
            })
            .sum();
        del.push(t0);
    }
    rows[1].a = Some(median(add));
    rows[2].a = Some(median(del));
}

fn peer_b(n: u32, rows: &mut [Row; 3]) {
    restore_rows(
        "bb",
        "iptables-nft",
        &ipt_lines(0, n),
        &ipt_lines(n, n + 1),
        rows,
    );
}

/// Peer B's three workloads with `<tool>-restore --noflush` (`tool`:
/// iptables-nft or ip6tables-nft): install `full`, add and delete `one`.
fn restore_rows(
    tag: &str,
    tool: &str,
    full: &[(String, String)],
    one: &[(String, String)],
    rows: &mut [Row; 3],
) {
    let ns = Netns::new(tag);
    let full = tmpfile(&format!("{tag}-full"), &restore_file(full, false, true));
    let add1 = tmpfile(&format!("{tag}-add"), &restore_file(one, false, false));
    let del1 = tmpfile(&format!("{tag}-del"), &restore_file(one, true, false));
    let restore = format!("{tool}-restore");
    let cmd = |f: &str| stdin_cmd(&restore, &["--noflush"], f);
    let mut install = vec![];
    for _ in 0..REPS {
        ns.sh(&format!(
            "{tool} -t nat -F; {tool} -t nat -X; {tool} -t filter -F; {tool} -t filter -X; true"
        ));
        install.push(timed(&ns, cmd(&full)));
    }
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        add.push(timed(&ns, cmd(&add1)));
        del.push(timed(&ns, cmd(&del1)));
    }
    rows[0].b = Some(median(install));
    rows[1].b = Some(median(add));
    rows[2].b = Some(median(del));
}

fn peer_c(n: u32, rows: &mut [Row; 3]) {
    let ns = Netns::new("bc");
    let full = tmpfile("c-full", &format!("{C_HEAD}{}", c_rules(0, n)));
    let add1 = tmpfile("c-add", &c_rules(n, n + 1));
    let mut install = vec![];
    for _ in 0..REPS {
        ns.sh("nft delete table ip podnatc 2>/dev/null; true");
        install.push(timed(&ns, {
            let mut c = Command::new("nft");
            c.args(["-f", &full]);
            c
        }));
    }
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        add.push(timed(&ns, {
            let mut c = Command::new("nft");
            c.args(["-f", &add1]);
            c
        }));
        // Handles of the three new rules (untimed), then delete them.
        let listing = ns.sh("nft -a list table ip podnatc");
        let marker = format!("\"bench:p-{n}\"");
        let mut text = String::new();
        let mut chain = "";
        for line in listing.lines() {
            let l = line.trim();
            if let Some(c) = l.strip_prefix("chain ") {
                chain = c.split_whitespace().next().unwrap_or("");
            }
            if l.contains(&marker) {
                let h = l.rsplit("# handle ").next().unwrap();
                let _ = writeln!(text, "delete rule ip podnatc {chain} handle {h}");
            }
        }
        let f = tmpfile("c-del", &text);
        del.push(timed(&ns, {
            let mut c = Command::new("nft");
            c.args(["-f", &f]);
            c
        }));
    }
    rows[0].c = Some(median(install));
    rows[1].c = Some(median(add));
    rows[2].c = Some(median(del));
}

fn peer_m(n: u32, rows: &mut [Row; 3]) {
    let full = view::nft(&table(n), &Names::new("podnat"), Family::Ipv4);
    let (add, del) = (m_elements("add", n), m_elements("delete", n));
    nft_map_rows("bm", "ip", &full, &add, &del, rows);
}

/// Peer M's three workloads with `nft -f` on the table `fam podnat`.
fn nft_map_rows(tag: &str, fam: &str, full: &str, add: &str, del: &str, rows: &mut [Row; 3]) {
    let ns = Netns::new(tag);
    let full = tmpfile(&format!("{tag}-full"), full);
    let add1 = tmpfile(&format!("{tag}-add"), add);
    let del1 = tmpfile(&format!("{tag}-del"), del);
    let nft = |f: &str| {
        let mut c = Command::new("nft");
        c.args(["-f", f]);
        c
    };
    let mut install = vec![];
    for _ in 0..REPS {
        ns.sh(&format!("nft delete table {fam} podnat 2>/dev/null; true"));
        install.push(timed(&ns, nft(&full)));
    }
    let (mut add, mut del) = (vec![], vec![]);
    for _ in 0..REPS {
        add.push(timed(&ns, nft(&add1)));
        del.push(timed(&ns, nft(&del1)));
    }
    rows[0].m = Some(median(install));
    rows[1].m = Some(median(add));
    rows[2].m = Some(median(del));
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3}", d.as_secs_f64() * 1e3))
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then this must not spend ten minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("churn: run with `cargo bench --bench churn`");
        return;
    }
    let sizes: Vec<u32> = std::env::var("CHURN_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000, 5000]);
    println!("churn benchmark: medians of {REPS} runs ({CHANGE_REPS} for our add/delete rows and their floors), milliseconds (wall); one machine, compare within this run only");
    println!(
        "| work | ours nftables | its floor | loop nftables | ours iptables | its floor | loop iptables | A iptables per rule | B restore | C nft rules | M nft maps | nft/floor | ipt/floor | ipt/B | nft/M | loop/apply nft | loop/apply ipt | notes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // CHURN_OURS_ONLY=1 skips the peers (a quick look at our own figures).
    let peers = std::env::var("CHURN_OURS_ONLY").is_err();
    for &n in &sizes {
        let mut rows = ours(n);
        for (r, (nft, ipt)) in rows.iter_mut().zip(churn_loop::loop_rows(n)) {
            r.loop_nft = Some(nft);
            r.loop_ipt = Some(ipt);
        }
        if peers {
            peer_a(n, &mut rows);
            peer_b(n, &mut rows);
            peer_c(n, &mut rows);
            peer_m(n, &mut rows);
        }
        print_rows("", n, &rows);
    }
    // Source allow-lists (issue 25).
    for &n in &sizes {
        let ((ours, floor), (ours_ipt, floor_ipt)) = ranges_row(n);
        println!(
            "| change 1 port's source ranges at {n} (all {n} restricted) | {} | {} | | {} | {} | | | | | | {} | {} | | | | | no peer has source ranges |",
            ms(Some(ours)),
            ms(Some(floor)),
            ms(Some(ours_ipt)),
            ms(Some(floor_ipt)),
            ratio(Some(ours), Some(floor)),
            ratio(Some(ours_ipt), Some(floor_ipt))
        );
    }
    // Port ranges (issue 25), both flavors.
    for &n in &sizes {
        for (work, r) in ["add", "delete"].iter().zip(port_range_rows(n)) {
            println!(
                "| {work} one 1,000-port range at {n} | {} | {} | | {} | {} | | | {} | | {} | {} | {} | {} | {} | | | nftables 3,001 elements, iptables 3 rules; no peer publishes a range with an offset (B, M: the same rules / elements by restore / nft -f) |",
                ms(Some(r.nft.0)),
                ms(Some(r.nft.1)),
                ms(Some(r.ipt.0)),
                ms(Some(r.ipt.1)),
                ms(Some(r.b)),
                ms(Some(r.m)),
                ratio(Some(r.nft.0), Some(r.nft.1)),
                ratio(Some(r.ipt.0), Some(r.ipt.1)),
                ratio(Some(r.ipt.0), Some(r.b)),
                ratio(Some(r.nft.0), Some(r.m))
            );
        }
    }
    // IPv6 (issue 15): the same work on ip6 tables, beside
    // ip6tables-nft-restore (B) and nft -f with maps (M).
    let sizes6: Vec<u32> = std::env::var("CHURN_SIZES6")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000]);
    for n in sizes6 {
        print_rows("IPv6 ", n, &v6::rows6(n, peers));
    }
}

fn print_rows(prefix: &str, n: u32, rows: &[Row; 3]) {
    for (label, r) in ["install", "add 1", "delete 1"].iter().zip(rows.iter()) {
        let work = if *label == "install" {
            format!("{prefix}install {n} ports")
        } else {
            format!("{prefix}{label} port at {n}")
        };
        println!(
            "| {work} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{} |",
            ms(r.ours),
            ms(r.floor),
            ms(r.loop_nft),
            ms(r.ours_ipt),
            ms(r.floor_ipt),
            ms(r.loop_ipt),
            ms(r.a),
            ms(r.b),
            ms(r.c),
            ms(r.m),
            ratio(r.ours, r.floor),
            ratio(r.ours_ipt, r.floor_ipt),
            ratio(r.ours_ipt, r.b),
            ratio(r.ours, r.m),
            ratio(r.loop_nft, r.ours),
            ratio(r.loop_ipt, r.ours_ipt),
            r.note
        );
    }
}
