//! The iptables flavor against the real kernel, inside namespaces each test
//! creates: iptables-nft 1.8.9 (`-save`, `-S`, `-C`, `-L`, and rules it
//! writes itself) and `nft --debug=netlink` as oracles, real TCP/UDP through
//! the NAT, foreign rules beside the agent's, drift repair through the
//! ruleset monitor, a concurrent iptables-nft writer, and size.

mod support;

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use podnat_controller::config::JumpPositions;
use podnat_controller::firewall::engine::monitor::watch_ruleset;
use podnat_controller::firewall::flavors::iptables::position::jump_position;
use podnat_controller::firewall::flavors::iptables::IptablesBackend;
use podnat_controller::firewall::{view, ApplyReport, Backend};
use podnat_controller::model::{Family, Proto, RuleSet};
use support::netns::{Netns, Sandbox, POD_B_IP, PUBLIC_IP};
use support::rules::{bulk, mail, names, publish, publish_range};
use support::save::{agent_chain_decls, chain_decls, netlink_debug, write_with};

const JUMP: &str = "\"podnat[jump_to_chain]\"";

fn jumps(forward: i32, prerouting: i32, postrouting: i32) -> JumpPositions {
    JumpPositions {
        forward,
        prerouting,
        postrouting,
        ..JumpPositions::default()
    }
}

fn apply_with(ns: &Netns, rules: &RuleSet, j: JumpPositions) -> ApplyReport {
    let rules = rules.clone();
    ns.run(move || IptablesBackend::new(names(), j).apply(&rules))
        .unwrap_or_else(|e| panic!("apply in {}: {e}", ns.name))
}

fn apply(ns: &Netns, rules: &RuleSet) -> ApplyReport {
    apply_with(ns, rules, JumpPositions::default())
}

/// The agent's part of `iptables-nft-save` (its chains, its rules, its jump
/// lines), in the order the tool prints them: what the view must equal.
fn agent_save(ns: &Netns) -> String {
    let mut out = String::new();
    for t in ["nat", "filter"] {
        out.push_str(&format!("*{t}\n"));
        for l in ns.sh(&format!("iptables-nft-save -t {t}")).lines() {
            if l.starts_with(":PODNAT_") || l.starts_with("-A PODNAT_") || l.contains(JUMP) {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn assert_kernel_holds(ns: &Netns, rules: &RuleSet) {
    assert_eq!(
        agent_save(ns),
        view::iptables_save(rules, &names(), Family::Ipv4)
    );
}

/// `iptables-nft -S` of one chain, without the policy line.
fn chain_rules(ns: &Netns, table: &str, chain: &str) -> Vec<String> {
    ns.sh(&format!("iptables-nft -t {table} -S {chain}"))
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

/// The 1-based positions of the agent's jump in a parent chain, and the
/// other rules in order.
fn jump_positions(ns: &Netns, table: &str, chain: &str) -> (Vec<usize>, Vec<String>) {
    let rules = chain_rules(ns, table, chain);
    let at = rules
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains(JUMP))
        .map(|(i, _)| i + 1)
        .collect();
    let others = rules.into_iter().filter(|l| !l.contains(JUMP)).collect();
    (at, others)
}

#[test]
fn iptables_nft_reads_the_rules_as_its_own() {
    let ns = Netns::new("ipt-oracle");
    let rules = mail();
    let first = apply(&ns, &rules);
    assert!(first.messages > 0 && first.rebuilt);
    assert_kernel_holds(&ns, &rules);

    // -S, -L and -save accept every chain: no "incompatible" rule anywhere.
    for cmd in [
        "iptables-nft -t nat -S",
        "iptables-nft -t filter -S",
        "iptables-nft -t nat -L -n -v",
        "iptables-nft -t filter -L -n -v",
        "iptables-nft-save",
    ] {
        let out = ns.try_sh(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd}: {stderr}");
        assert!(!stderr.contains("incompatible"), "{cmd}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("incompatible"));
    }

    // `-C` finds every rule of the view, jumps included.
    let view = view::iptables_save(&rules, &names(), Family::Ipv4);
    let mut table = "nat";
    let mut checked = 0;
    for l in view.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter" };
        }
        if let Some(spec) = l.strip_prefix("-A ") {
            ns.sh(&format!("iptables-nft -t {table} -C {spec}"));
            checked += 1;
        }
    }
    assert_eq!(checked, 3 + 4 + 2 + 3 + 3);

    // The same rules written by iptables-nft itself, line by line, give the
    // same expressions (and the same -save output).
    let twin = Netns::new("ipt-twin");
    write_with(&twin, "iptables-nft", &view);
    for t in ["nat", "filter"] {
        let ours = netlink_debug(&ns, "ip", t);
        assert!(ours.contains("[ match name comment rev 0 ]"), "{ours}");
        assert_eq!(ours, netlink_debug(&twin, "ip", t), "table {t}");
    }
    assert_eq!(agent_save(&ns), agent_save(&twin));
    // Tables and base chains made as iptables-nft makes them: only the base
    // chains in use, with iptables-nft's hooks, priorities and policies.
    // The agent's chains also carry its mark (nft shows it as a comment;
    // iptables-nft-save does not).
    assert_eq!(agent_chain_decls(&ns, "ip"), chain_decls(&twin, "ip"));
    // ...which iptables-nft's listing does not show either.
    let list = "iptables-nft -t nat -L -n -v && iptables-nft -t filter -L -n -v";
    assert_eq!(ns.sh(list), twin.sh(list));
    assert_eq!(
        chain_decls(&ns, "ip").len(),
        6,
        "{:?}",
        chain_decls(&ns, "ip")
    );

    // What the agent reads back from iptables-nft's rules is the rule set.
    let back = twin.run(|| {
        IptablesBackend::new(names(), JumpPositions::default())
            .read()
            .unwrap()
    });
    assert_eq!(back, rules);
    // ...and it changes nothing there but the marks: the first apply makes
    // the unmarked chains and base chains anew (one batch), the same rules
    // in them; the next sends nothing.
    let text = agent_save(&twin);
    assert!(apply(&twin, &rules).rebuilt);
    assert_eq!(agent_save(&twin), text);
    assert_eq!(
        agent_chain_decls(&twin, "ip"),
        chain_decls(&ns, "ip")
            .iter()
            .map(|d| d.replace(support::save::MARK, ""))
            .collect::<Vec<_>>()
    );
    assert_eq!(apply(&twin, &rules).messages, 0);
}

#[test]
fn tcp_udp_snat_and_internal_traffic() {
    let sb = Sandbox::new("ipt-traf");
    apply(&sb.node, &mail());

    support::traffic::check_mail_traffic(&sb);

    // The counters iptables-nft shows moved: the traffic went through the
    // agent's rules, not around them.
    let listing = sb.node.sh("iptables-nft -t nat -L PODNAT_PRE -n -v -x");
    assert!(
        listing
            .lines()
            .any(|l| l.contains("dpt:25") && !l.trim_start().starts_with('0')),
        "{listing}"
    );
}

/// Foreign rules of the kinds found on real nodes (Cilium, kube-proxy,
/// plain DNAT/MASQUERADE/ACCEPT), per parent chain.
const FOREIGN_CHAINS: [(&str, &str); 6] = [
    ("nat", "CILIUM_PRE_nat"),
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-POSTROUTING"),
    ("nat", "CILIUM_POST_nat"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "DOCKER-USER"),
];

const FOREIGN: [(&str, &str, [&str; 4]); 3] = [
    (
        "nat",
        "PREROUTING",
        [
            "-m comment --comment \"cilium-feeder: CILIUM_PRE_nat\" -j CILIUM_PRE_nat",
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-d 198.51.100.10/32 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.9.9.9:443",
            "-s 10.244.0.0/16 -j RETURN",
        ],
    ),
    (
        "nat",
        "POSTROUTING",
        [
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE",
            "-j CILIUM_POST_nat",
            "-o lo -j RETURN",
        ],
    ),
    (
        "filter",
        "FORWARD",
        [
            "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-j DOCKER-USER",
            "-i lo -j ACCEPT",
        ],
    ),
];

fn add_foreign(ns: &Netns, n: usize) {
    let mut script = String::from("set -e\n");
    for (t, c) in FOREIGN_CHAINS {
        script.push_str(&format!("iptables-nft -t {t} -N {c}\n"));
    }
    for (t, chain, specs) in FOREIGN {
        for s in &specs[..n] {
            script.push_str(&format!("iptables-nft -t {t} -A {chain} {s}\n"));
        }
    }
    ns.sh(&script);
}

/// Each parent chain holds exactly one jump, at its computed position, and
/// the foreign rules in their order.
fn assert_jumps_at(ns: &Netns, j: JumpPositions, foreign: &[Vec<String>; 3]) {
    for (i, (t, chain, _)) in FOREIGN.iter().enumerate() {
        let requested = match *chain {
            "PREROUTING" => j.prerouting,
            "POSTROUTING" => j.postrouting,
            _ => j.forward,
        };
        let (at, others) = jump_positions(ns, t, chain);
        assert_eq!(
            at,
            vec![jump_position(requested, others.len())],
            "{chain} with {} foreign rules, requested {requested}",
            others.len()
        );
        assert_eq!(
            others, foreign[i],
            "{chain}: foreign rules intact, in order"
        );
    }
}

fn foreign_listing(ns: &Netns) -> [Vec<String>; 3] {
    std::array::from_fn(|i| {
        let (t, chain, _) = FOREIGN[i];
        chain_rules(ns, t, chain)
            .into_iter()
            .filter(|l| !l.contains(JUMP))
            .collect()
    })
}

#[test]
fn jumps_land_at_their_position_beside_foreign_rules() {
    let rules = mail();
    for n in 0..=4 {
        let ns = Netns::new(&format!("ipt-pos{n}"));
        add_foreign(&ns, n);
        let foreign = foreign_listing(&ns);
        let save_before = ns.sh("iptables-nft-save | grep -v '^#'");
        for r in -2..=2 {
            // Different requests per chain, so a mixed-up mapping shows.
            let j = jumps(r, -r, if r == 0 { 1 } else { r });
            let rep = apply_with(&ns, &rules, j);
            assert!(
                rep.messages > 0 || r > -2,
                "the first apply creates everything"
            );
            assert_jumps_at(&ns, j, &foreign);
            assert_kernel_holds(&ns, &rules);
            // One apply puts the jumps in place; the next changes nothing.
            assert_eq!(apply_with(&ns, &rules, j).messages, 0, "n={n} r={r}");
        }
        // Cleanup removes the agent's chains and jumps, nothing else.
        let removed = ns.run(|| {
            IptablesBackend::new(names(), JumpPositions::default())
                .cleanup()
                .unwrap()
        });
        assert!(!removed.is_empty(), "{removed:?}");
        if n > 0 {
            assert_eq!(ns.sh("iptables-nft-save | grep -v '^#'"), save_before);
        }
        assert_eq!(foreign_listing(&ns), foreign);
        assert!(!ns.sh("iptables-nft-save").contains("PODNAT"));
    }
}

#[test]
fn duplicate_and_misplaced_jumps_are_repaired() {
    let ns = Netns::new("ipt-dup");
    add_foreign(&ns, 3);
    let foreign = foreign_listing(&ns);
    let rules = mail();
    let j = JumpPositions::default();
    apply_with(&ns, &rules, j);
    // A second jump (as an older agent might have left), a jump without the
    // comment, and a moved one.
    ns.sh(&format!(
        "iptables-nft -t nat -I PREROUTING 1 -m comment --comment {JUMP} -j PODNAT_PRE && \
         iptables-nft -t nat -A POSTROUTING -j PODNAT_POST && \
         iptables-nft -t filter -D FORWARD -m comment --comment {JUMP} -j PODNAT_FORWARD && \
         iptables-nft -t filter -I FORWARD 1 -m comment --comment {JUMP} -j PODNAT_FORWARD"
    ));
    let rep = apply_with(&ns, &rules, j);
    assert!(rep.messages > 0);
    assert_jumps_at(&ns, j, &foreign);
    assert_eq!(apply_with(&ns, &rules, j).messages, 0);
}

#[test]
fn foreign_and_stale_rules_in_the_agents_chains_are_replaced() {
    let ns = Netns::new("ipt-stale");
    let rules = mail();
    apply(&ns, &rules);
    let handles_before = ns.sh("nft -a list chain ip nat PODNAT_POST");
    ns.sh("iptables-nft -t nat -A PODNAT_PRE -j ACCEPT && \
         iptables-nft -t nat -I PODNAT_PRE 1 -d 203.0.113.7/32 -p tcp -m tcp --dport 587 \
            -m comment --comment mail:mx-0 -j DNAT --to-destination 10.1.0.5:587 && \
         iptables-nft -t nat -A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 99 \
            -m comment --comment gone:pod -j DNAT --to-destination 10.1.0.9:99 && \
         iptables-nft -t filter -A PODNAT_FORWARD -j ACCEPT");
    let rep = apply(&ns, &rules);
    // Four deletes (ACCEPT, out-of-order 587 kept first → the later copy
    // goes, stale 99, filter ACCEPT): nothing else.
    assert_eq!(rep.messages, 4, "{rep:?}");
    assert_eq!(rep.removed_dnat.len(), 1, "{rep:?}");
    assert_kernel_holds(&ns, &rules);
    assert_eq!(
        ns.sh("nft -a list chain ip nat PODNAT_POST"),
        handles_before,
        "an untouched chain keeps its handles"
    );
}

#[test]
fn second_apply_sends_nothing_and_changes_touch_only_themselves() {
    let ns = Netns::new("ipt-idem");
    add_foreign(&ns, 2);
    let save_before = ns.sh("iptables-nft-save | grep -v '^#'");
    let rules = mail();
    apply(&ns, &rules);
    // A fresh backend (no cache) and a warm one both send nothing.
    assert_eq!(apply(&ns, &rules).messages, 0);
    let r2 = rules.clone();
    let (a, b) = ns.run(move || {
        let mut be = IptablesBackend::new(names(), JumpPositions::default());
        (be.apply(&r2).unwrap(), be.apply(&r2).unwrap())
    });
    assert_eq!((a.messages, b.messages), (0, 0));
    assert!(b.cache_hit, "the second apply used the remembered state");

    // Adding one mapping: DNAT + FORWARD (+ SNAT for a new pod) only, in
    // sorted place, and the existing rules keep their handles.
    let handles =
        |ns: &Netns| ns.sh("nft -a list table ip nat | grep -o 'dnat to [0-9.:]* # handle [0-9]*'");
    let before = handles(&ns);
    let mut more = rules.clone();
    publish(
        &mut more,
        "web:w-1",
        PUBLIC_IP,
        443,
        Proto::Tcp,
        POD_B_IP,
        8443,
    );
    let (add, remove) = ns.run(|| {
        let mut be = IptablesBackend::new(names(), JumpPositions::default());
        let add = be.apply(&more).unwrap();
        // Removing it again right away: the kernel echoed the new rules'
        // handles, so the remembered state suffices (no re-read).
        let remove = be.apply(&rules).unwrap();
        (add, remove)
    });
    assert_eq!(add.messages, 3, "{add:?}");
    assert_eq!(add.added_dnat.len(), 1);
    assert_eq!(remove.messages, 3, "{remove:?}");
    assert!(remove.cache_hit, "{remove:?}");
    assert_eq!(handles(&ns), before, "unchanged rules keep their handles");
    assert_kernel_holds(&ns, &rules);

    // Cleanup: chains and jumps go, everything else stays as it was.
    let removed = ns.run(|| {
        IptablesBackend::new(names(), JumpPositions::default())
            .cleanup()
            .unwrap()
    });
    assert!(!removed.is_empty(), "{removed:?}");
    assert_eq!(ns.sh("iptables-nft-save | grep -v '^#'"), save_before);
    let again = ns.run(|| {
        IptablesBackend::new(names(), JumpPositions::default())
            .cleanup()
            .unwrap()
    });
    assert!(again.is_empty(), "nothing left to remove: {again:?}");
}

#[test]
fn dry_run_is_iptables_restore_input_for_the_same_change() {
    // Two namespaces in the same state; one gets the agent's apply, the other
    // the dry run's lines through iptables-nft-restore: same result.
    let mut before = mail();
    publish(
        &mut before,
        "old:gone",
        PUBLIC_IP,
        7000,
        Proto::Udp,
        "10.1.2.9",
        7,
    );
    let mut after = mail();
    publish_range(
        &mut after,
        "voip:pbx",
        PUBLIC_IP,
        10000,
        99,
        Proto::Udp,
        "10.1.2.8",
        20000,
    );
    publish(
        &mut after,
        "web:w-1",
        PUBLIC_IP,
        443,
        Proto::Tcp,
        POD_B_IP,
        8443,
    );
    publish(
        &mut after,
        "a:first",
        PUBLIC_IP,
        1,
        Proto::Tcp,
        "10.1.3.3",
        1,
    );
    let j_before = jumps(-1, 1, -1);
    let j_after = jumps(1, -2, 2);
    let agent = Netns::new("ipt-dry-a");
    let tool = Netns::new("ipt-dry-t");
    for ns in [&agent, &tool] {
        add_foreign(ns, 3);
        apply_with(ns, &before, j_before);
        ns.sh("iptables-nft -t nat -A PODNAT_PRE -j ACCEPT");
    }
    let (text, empty) = tool.run(|| {
        let mut be = IptablesBackend::new(names(), j_after);
        (
            be.dry_run(&after, false).unwrap(),
            be.dry_run(&after, true).unwrap(),
        )
    });
    assert!(text.contains("-D PODNAT_PRE -d 203.0.113.7/32 -p udp -m udp --dport 7000"));
    assert!(text.contains("-I PODNAT_PRE 1 -d 203.0.113.7/32 -p tcp -m tcp --dport 1 "));
    assert!(
        text.contains("--dport 10000:10099 -m comment --comment \"voip:pbx\" -j DNAT --to-destination 10.1.2.8:20000-20099/10000"),
        "{text}"
    );
    assert!(
        empty.starts_with("*nat\n-N PODNAT_PRE\n-N PODNAT_POST\n"),
        "{empty}"
    );
    let restore = tool
        .command("iptables-nft-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    restore
        .stdin
        .as_ref()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = restore.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    apply_with(&agent, &after, j_after);
    assert_eq!(agent_save(&tool), agent_save(&agent), "dry run:\n{text}");
    assert_eq!(
        tool.sh("iptables-nft-save | grep -v '^#'"),
        agent.sh("iptables-nft-save | grep -v '^#'")
    );
    assert_eq!(apply_with(&tool, &after, j_after).messages, 0);
}

/// Runs `f` on a thread of its own inside `ns` (sockets made there stay in
/// `ns`), without waiting for it.
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// The reconcile loop in miniature: every ruleset notification → apply.
struct RepairLoop {
    stop: Arc<AtomicBool>,
    reports: Arc<Mutex<Vec<ApplyReport>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RepairLoop {
    fn start(ns: &Netns, rules: RuleSet, j: JumpPositions) -> RepairLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (stop2, reports2) = (Arc::clone(&stop), Arc::clone(&reports));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = spawn_in(ns, move || {
            let (tx, rx) = mpsc::channel();
            let mut be = IptablesBackend::new(names(), j);
            let watch = watch_ruleset(be.interest(), move || {
                let _ = tx.send(());
            })
            .unwrap();
            let tracker = watch.tracker();
            be.attach_tracker(watch.tracker());
            reports2.lock().unwrap().push(be.apply(&rules).unwrap());
            ready_tx.send(()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    while rx.try_recv().is_ok() {}
                    if !tracker.take_reasons().ours {
                        continue;
                    }
                    let rep = be.apply(&rules).expect("repair apply");
                    reports2.lock().unwrap().push(rep);
                }
            }
            watch.stop();
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        RepairLoop {
            stop,
            reports,
            thread: Some(thread),
        }
    }

    fn applies(&self) -> Vec<ApplyReport> {
        self.reports.lock().unwrap().clone()
    }
}

impl Drop for RepairLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.unwrap();
            }
        }
    }
}

/// Polls `ok` until it holds; the time it took, or a panic after `limit`.
fn within(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what} not repaired within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn drift_is_repaired_within_a_second_and_settles() {
    let ns = Netns::new("ipt-drift");
    add_foreign(&ns, 2);
    let foreign = foreign_listing(&ns);
    let rules = mail();
    let j = JumpPositions::default();
    let lp = RepairLoop::start(&ns, rules.clone(), j);
    assert_kernel_holds(&ns, &rules);
    let second = Duration::from_secs(1);

    ns.sh("iptables-nft -t nat -F PODNAT_PRE");
    let t_flush = within(second, "flushed PODNAT_PRE", || {
        agent_save(&ns) == view::iptables_save(&rules, &names(), Family::Ipv4)
    });

    // Moved to the end in one transaction (one commit, one repair).
    ns.sh(&format!(
        "printf '%s\\n' '*nat' \
           '-D PREROUTING -m comment --comment {JUMP} -j PODNAT_PRE' \
           '-A PREROUTING -m comment --comment {JUMP} -j PODNAT_PRE' COMMIT \
         | iptables-nft-restore --noflush"
    ));
    let t_move = within(second, "moved jump", || {
        jump_positions(&ns, "nat", "PREROUTING").0 == vec![jump_position(-2, 2)]
    });
    assert_jumps_at(&ns, j, &foreign);

    ns.sh("iptables-nft -t filter -D PODNAT_FORWARD 1");
    let t_del = within(second, "deleted rule", || {
        agent_save(&ns) == view::iptables_save(&rules, &names(), Family::Ipv4)
    });
    eprintln!("repaired: flush {t_flush:?}, moved jump {t_move:?}, deleted rule {t_del:?}");

    // The repairs' own commits wake nothing: the first apply and one per
    // drift, each of which sent its repair, and nothing after them.
    std::thread::sleep(Duration::from_millis(600));
    let applies = lp.applies();
    assert_eq!(
        applies.len(),
        1 + 3,
        "the first apply and one per drift, none for the agent's own commits: {applies:?}"
    );
    assert!(applies.iter().all(|r| r.messages > 0), "{applies:?}");
    drop(lp);
    assert_kernel_holds(&ns, &rules);
}

#[test]
fn a_concurrent_iptables_writer_never_breaks_an_apply() {
    let ns = Netns::new("ipt-race");
    add_foreign(&ns, 2);
    let foreign = foreign_listing(&ns);
    let name = ns.name.clone();
    let writer = std::thread::spawn(move || {
        // Head inserts and appends: `-I chain N` with N > 1 names the rule
        // now at N by its handle, and iptables-nft's own retry after a
        // generation clash keeps that handle; when it was the agent's jump,
        // moved meanwhile, iptables-nft fails with ENOENT (its limit, seen
        // while writing this test).
        let script = "i=0; while [ $i -lt 150 ]; do \
            iptables-nft -t nat -I PREROUTING 1 -j ACCEPT && \
            iptables-nft -t filter -A FORWARD -j ACCEPT && \
            iptables-nft -t nat -D PREROUTING -j ACCEPT && \
            iptables-nft -t filter -D FORWARD -j ACCEPT || exit 1; i=$((i+1)); done";
        std::process::Command::new("ip")
            .args(["netns", "exec", &name, "sh", "-c", script])
            .output()
            .unwrap()
    });
    let rules = mail();
    let r2 = rules.clone();
    let (retries, applies, last_j) = ns.run(move || {
        let mut be = IptablesBackend::new(names(), JumpPositions::default());
        let mut retries = 0;
        let mut applies = 0;
        let mut last = JumpPositions::default();
        let start = Instant::now();
        let mut i = 0i32;
        while start.elapsed() < Duration::from_secs(3) {
            let r = i % 5 - 2;
            last = jumps(r, -r, r);
            be.set_jump_positions(last);
            let rep = be.apply(&r2).unwrap_or_else(|e| panic!("apply {i}: {e}"));
            retries += rep.retries;
            applies += 1;
            i += 1;
        }
        (retries, applies, last)
    });
    let w = writer.join().unwrap();
    assert!(
        w.status.success(),
        "the other writer failed: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    // The writer's last change may have shifted the jump; the next apply (the
    // monitor would trigger it) puts it back.
    apply_with(&ns, &rules, last_j);
    assert_jumps_at(&ns, last_j, &foreign);
    assert_kernel_holds(&ns, &rules);
    eprintln!("{applies} applies racing iptables-nft: {retries} generation retries");
}

#[test]
fn five_thousand_ports_in_one_batch() {
    let ns = Netns::new("ipt-big");
    let rules = bulk(5000);
    assert_eq!(rules.len(), 15000);
    let mut one_more = rules.clone();
    publish(
        &mut one_more,
        "bulk:extra",
        PUBLIC_IP,
        9999,
        Proto::Tcp,
        "10.3.0.1",
        80,
    );
    let r = rules.clone();
    let nsr = &ns;
    let (first, back, add1, del1, foreign, again, t) = ns.run(move || {
        let mut be = IptablesBackend::new(names(), JumpPositions::default());
        let mut t = Vec::new();
        let mut timed = |what: &'static str, f: &mut dyn FnMut() -> ApplyReport| {
            let start = Instant::now();
            let rep = f();
            t.push((what, start.elapsed()));
            rep
        };
        let first = timed("apply 5000 ports", &mut || be.apply(&r).unwrap());
        let start = Instant::now();
        let back = be.read().unwrap();
        let t_read = start.elapsed();
        let add1 = timed("add 1 at 5000", &mut || be.apply(&one_more).unwrap());
        let del1 = timed("remove it", &mut || be.apply(&r).unwrap());
        // Somebody else commits (as kube-proxy does all the time): the cache
        // is stale, the next apply reads the agent's chains again.
        nsr.sh("iptables-nft -t nat -A PREROUTING -j ACCEPT");
        let foreign = timed("re-read after a foreign commit", &mut || {
            be.apply(&r).unwrap()
        });
        let again = timed("fresh backend, nothing to do", &mut || {
            IptablesBackend::new(names(), JumpPositions::default())
                .apply(&r)
                .unwrap()
        });
        t.insert(1, ("read back", t_read));
        (first, back, add1, del1, foreign, again, t)
    });
    eprintln!(
        "5000 ports (15000 rules): {} messages, {} bytes in one batch",
        first.messages, first.bytes
    );
    for (what, d) in &t {
        eprintln!("  {what}: {d:?}");
    }
    assert_eq!(back, rules);
    // 15000 rules, 4 returns, 3 jumps; tables and chains.
    assert!(first.messages >= 15000 + 4 + 3 + 3, "{}", first.messages);
    assert_eq!(add1.messages, 3);
    assert!(add1.cache_hit, "read() left every handle in the cache");
    assert_eq!(del1.messages, 3);
    assert!(
        del1.cache_hit,
        "the added rules' handles came back as echoes"
    );
    // Appended after the jump, the foreign rule leaves it where -2 wants it.
    assert!(!foreign.cache_hit);
    assert_eq!(foreign.messages, 0, "{foreign:?}");
    assert_eq!(again.messages, 0);
    let save = ns.sh("iptables-nft-save");
    assert_eq!(save.matches("-j DNAT --to-destination").count(), 5000);
    assert_eq!(save.matches("-j SNAT --to-source").count(), 5000);
    assert_eq!(save.matches("--ctstate NEW").count(), 5000);
    assert_kernel_holds(&ns, &rules);

    // The same 15000 rules loaded by iptables-nft-restore: the agent reads
    // them as its own and has nothing to change.
    let twin = Netns::new("ipt-big-twin");
    let file = std::env::temp_dir().join(format!("{}.rules", twin.name));
    std::fs::write(&file, view::iptables_save(&rules, &names(), Family::Ipv4)).unwrap();
    let start = Instant::now();
    twin.sh(&format!(
        "iptables-nft-restore --noflush < {}",
        file.display()
    ));
    let t_restore = start.elapsed();
    let _ = std::fs::remove_file(&file);
    eprintln!("  iptables-nft-restore of the same rules: {t_restore:?}");
    // Made without the agent's mark: the first apply adopts the chains (made
    // anew, marked, in one batch), the next sends nothing.
    let (back, adopt, rep) = twin.run(|| {
        let mut be = IptablesBackend::new(names(), JumpPositions::default());
        let back = be.read().unwrap();
        (back, be.apply(&rules).unwrap(), be.apply(&rules).unwrap())
    });
    assert_eq!(back, rules);
    assert!(adopt.rebuilt, "{adopt:?}");
    assert!(adopt.added_dnat.is_empty() && adopt.removed_dnat.is_empty());
    assert_eq!(rep.messages, 0);
}
