//! The Go version's rules as the oracle of the iptables flavor's text: the
//! test replays what the Go version (gutmensch/podnat-controller v0.5.2,
//! internal/firewall/iptables.go) does on a node, with `iptables-nft`
//! commands carrying its exact rulespecs (`getRule`, `ensureDefaults`,
//! `ensureJumpToChain` with `computeRulePosition`), on a crowded node with
//! foreign rules in PREROUTING, POSTROUTING and FORWARD. Then:
//! (a) takeover: the agent's first apply on that kernel sends nothing and
//!     every rule keeps its handle, whatever order the Go version's map
//!     iteration gave its rules;
//! (b) rollback: on a fresh node after the agent's apply, `iptables-nft -C`
//!     finds each of the Go version's rulespecs (so a Go version started
//!     there appends nothing beside them), and `iptables-nft-save` equals the
//!     Go-made one line for line.

mod support;

use std::net::Ipv4Addr;

use podnat_controller::config::JumpPositions;
use podnat_controller::firewall::flavors::iptables::IptablesBackend;
use podnat_controller::firewall::flavors::nftables::NftablesBackend;
use podnat_controller::firewall::{view, Backend, Names};
use podnat_controller::kube::pod;
use podnat_controller::model::{
    DualStack, Families, Family, ForwardRule, LocalPod, Mapping, NatKey, Proto, RuleSet, SnatRule,
};
use podnat_controller::plan::{self, PlanConfig};
use support::agent_view::agent_cli;
use support::netns::Netns;

/// The node's detected address for the auto entries of the fixture.
const AUTO_IP: &str = "198.51.100.5";

/// One `api.NATRule` of the Go version (the fields `getRule` reads).
#[derive(Clone, Copy)]
struct GoRule {
    proto: &'static str,
    source_ip: &'static str,
    source_port: u16,
    destination_ip: &'static str,
    destination_port: u16,
    comment: &'static str,
}

/// What the Go version holds for tests/fixtures/go-oracle-pods.json with the
/// node address 198.51.100.5: one rule per `ip:port` key.
const GO_RULES: [GoRule; 5] = [
    GoRule {
        proto: "tcp",
        source_ip: AUTO_IP,
        source_port: 25,
        destination_ip: "10.1.0.5",
        destination_port: 25,
        comment: "mail:mx-0",
    },
    GoRule {
        proto: "tcp",
        source_ip: AUTO_IP,
        source_port: 143,
        destination_ip: "10.1.0.5",
        destination_port: 143,
        comment: "mail:mx-0",
    },
    GoRule {
        proto: "tcp",
        source_ip: AUTO_IP,
        source_port: 587,
        destination_ip: "10.1.0.5",
        destination_port: 587,
        comment: "mail:mx-0",
    },
    GoRule {
        proto: "udp",
        source_ip: AUTO_IP,
        source_port: 5353,
        destination_ip: "10.1.0.7",
        destination_port: 5300,
        comment: "dns:resolver-0",
    },
    // The manual-address pod (`ifaceAuto:false`, `srcIP`).
    GoRule {
        proto: "tcp",
        source_ip: "203.0.113.7",
        source_port: 443,
        destination_ip: "10.1.0.8",
        destination_port: 8443,
        comment: "web:ingress-0",
    },
];

/// The Go version's chains, in its `p.chains` order: (name, table, jumpFrom).
const GO_CHAINS: [(&str, &str, &str); 3] = [
    ("PODNAT_FORWARD", "filter", "FORWARD"),
    ("PODNAT_PRE", "nat", "PREROUTING"),
    ("PODNAT_POST", "nat", "POSTROUTING"),
];

/// `internalNetworks`, in the Go version's order.
const GO_INTERNAL: [&str; 4] = [
    "172.16.0.0/12",
    "192.168.0.0/16",
    "10.0.0.0/8",
    "127.0.0.0/8",
];

/// `getRule(chain, rule)`, argument by argument.
fn go_rule_spec(jump_from: &str, r: &GoRule) -> Vec<String> {
    let s = |x: &str| x.to_string();
    match jump_from {
        "FORWARD" => vec![
            s("-d"),
            format!("{}/32", r.destination_ip),
            s("-p"),
            s(r.proto),
            s("-m"),
            s("conntrack"),
            s("--ctstate"),
            s("NEW"),
            s("-m"),
            s(r.proto),
            s("--dport"),
            r.destination_port.to_string(),
            s("-m"),
            s("comment"),
            s("--comment"),
            s(r.comment),
            s("-j"),
            s("ACCEPT"),
        ],
        "PREROUTING" => vec![
            s("-d"),
            format!("{}/32", r.source_ip),
            s("-p"),
            s(r.proto),
            s("-m"),
            s(r.proto),
            s("--dport"),
            r.source_port.to_string(),
            s("-m"),
            s("comment"),
            s("--comment"),
            s(r.comment),
            s("-j"),
            s("DNAT"),
            s("--to-destination"),
            format!("{}:{}", r.destination_ip, r.destination_port),
        ],
        _ => vec![
            s("-s"),
            format!("{}/32", r.destination_ip),
            s("-p"),
            s(r.proto),
            s("-m"),
            s("comment"),
            s("--comment"),
            s(r.comment),
            s("-j"),
            s("SNAT"),
            s("--to-source"),
            s(r.source_ip),
        ],
    }
}

/// `ensureDefaults`' RETURN rulespec for one internal network.
fn go_return_spec(net: &str) -> Vec<String> {
    [
        "-d",
        net,
        "-m",
        "comment",
        "--comment",
        "podnat[no_snat_for_internal]",
        "-j",
        "RETURN",
    ]
    .map(str::to_string)
    .to_vec()
}

/// `ensureJumpToChain`'s rulespec.
fn go_jump_spec(chain: &str) -> Vec<String> {
    [
        "-m",
        "comment",
        "--comment",
        "podnat[jump_to_chain]",
        "-j",
        chain,
    ]
    .map(str::to_string)
    .to_vec()
}

/// Runs `iptables-nft -t TABLE ARGS...` in `ns` without a shell, as
/// go-iptables does; returns whether it succeeded.
fn ipt(ns: &Netns, table: &str, args: &[String]) -> bool {
    let out = ns
        .command("iptables-nft")
        .args(["-w", "-t", table])
        .args(args)
        .output()
        .expect("run iptables-nft");
    out.status.success()
}

fn ipt_ok(ns: &Netns, table: &str, args: &[String]) {
    assert!(
        ipt(ns, table, args),
        "iptables-nft -t {table} {args:?} failed"
    );
}

fn with_head(head: &[&str], spec: &[String]) -> Vec<String> {
    head.iter()
        .map(|s| s.to_string())
        .chain(spec.iter().cloned())
        .collect()
}

/// `computeRulePosition` for `JumpFromPos` -2 (the default `-iptablesJump`).
fn go_rule_position(ns: &Netns, table: &str, jump_from: &str) -> i64 {
    let listed = ns.sh(&format!("iptables-nft -t {table} -S {jump_from}"));
    // The policy is the first line; rules start at 1.
    let entry_count = listed.lines().count() as i64 - 1;
    let want: i64 = -2;
    if want.abs() <= entry_count {
        entry_count + want + 1
    } else {
        entry_count
    }
}

/// `ensureJumpToChain`: the jump stays if `iptables -S` lists it at the
/// computed position, else it is deleted and inserted there.
fn go_ensure_jump(ns: &Netns, table: &str, jump_from: &str, chain: &str) {
    let pos = go_rule_position(ns, table, jump_from);
    let cmp = format!("-A {jump_from} -m comment --comment \"podnat[jump_to_chain]\" -j {chain}");
    let listed = ns.sh(&format!("iptables-nft -t {table} -S {jump_from}"));
    let at = listed.lines().position(|l| l == cmp);
    let spec = go_jump_spec(chain);
    match at {
        Some(i) if i as i64 == pos => return,
        Some(_) => ipt_ok(ns, table, &with_head(&["-D", jump_from], &spec)),
        None => {}
    }
    ipt_ok(
        ns,
        table,
        &with_head(&["-I", jump_from, &pos.to_string()], &spec),
    );
}

/// The Go version on this node: `init` (chains, defaults, the jump refresh
/// until it settles), then `reconcileRules` appending each rule of its map,
/// in `order`, to every chain with `AppendUnique`.
fn run_go_version(ns: &Netns, order: &[usize]) {
    for (chain, table, jump_from) in GO_CHAINS {
        if !ns
            .sh(&format!("iptables-nft -t {table} -S"))
            .lines()
            .any(|l| l == format!("-N {chain}"))
        {
            ipt_ok(ns, table, &["-N".to_string(), chain.to_string()]);
        }
        if jump_from == "POSTROUTING" {
            for (i, net) in GO_INTERNAL.iter().enumerate() {
                let spec = go_return_spec(net);
                if !ipt(ns, table, &with_head(&["-C", chain], &spec)) {
                    let pos = (i + 1).to_string();
                    ipt_ok(ns, table, &with_head(&["-I", chain, &pos], &spec));
                }
            }
        }
    }
    for &k in order {
        for (chain, table, jump_from) in GO_CHAINS {
            let spec = go_rule_spec(jump_from, &GO_RULES[k]);
            if !ipt(ns, table, &with_head(&["-C", chain], &spec)) {
                ipt_ok(ns, table, &with_head(&["-A", chain], &spec));
            }
        }
    }
    // The refresh goroutine, every 300 s: three rounds reach its fixpoint.
    for _ in 0..3 {
        for (chain, table, jump_from) in GO_CHAINS {
            go_ensure_jump(ns, table, jump_from, chain);
        }
    }
}

/// Foreign rules of the kinds found on real nodes, three per parent chain.
fn crowded_node(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.sh(
        "set -e
        iptables-nft -t nat -N KUBE-SERVICES
        iptables-nft -t nat -A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
        iptables-nft -t nat -A PREROUTING -d 198.51.100.10/32 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.9.9.9:443
        iptables-nft -t nat -A PREROUTING -s 10.244.0.0/16 -j RETURN
        iptables-nft -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE
        iptables-nft -t nat -A POSTROUTING -o lo -j RETURN
        iptables-nft -t nat -A POSTROUTING -m comment --comment 'cni masquerade' -j MASQUERADE
        iptables-nft -t filter -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        iptables-nft -t filter -A FORWARD -i lo -j ACCEPT
        iptables-nft -t filter -A FORWARD -s 10.244.0.0/16 -j ACCEPT",
    );
    ns
}

/// The agent's NAT table for the fixture, planned as the agent plans it.
fn agent_rules() -> RuleSet {
    let path = format!(
        "{}/tests/fixtures/go-oracle-pods.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let pods = pod::read_pods_file(std::path::Path::new(&path)).unwrap();
    let facts: Vec<_> = pods
        .iter()
        .map(|p| pod::facts(p, "bln.space/podnat"))
        .collect();
    let table = plan::plan(
        &facts,
        DualStack::v4(AUTO_IP.parse::<Ipv4Addr>().unwrap()),
        &PlanConfig {
            node_id: "node1".into(),
            restricted_ports: [22, 53, 6443].into(),
            families: Families::default(),
            local_access: false,
            source_ranges: false,
        },
    );
    assert!(table.rejected.is_empty() && table.conflicts.is_empty() && table.pending.is_empty());
    assert_eq!(table.rules.dnat.len(), GO_RULES.len());
    table.rules
}

fn names() -> Names {
    Names::new("podnat")
}

fn agent_apply(ns: &Netns, rules: &RuleSet) -> usize {
    let rules = rules.clone();
    ns.run(move || {
        IptablesBackend::new(names(), JumpPositions::default())
            .apply(&rules)
            .expect("apply")
            .messages
    })
}

/// Every rule of `ip nat` and `ip filter` with its handle.
fn with_handles(ns: &Netns) -> String {
    ns.sh("nft -a list table ip nat && nft -a list table ip filter")
}

/// `iptables-nft-save` without its comment lines (version, date).
fn save(ns: &Netns) -> Vec<String> {
    ns.sh("iptables-nft-save")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_go_versions_rules_are_taken_over_as_they_are() {
    let ns = crowded_node("go-take");
    // The Go version's map iteration order is random: not the agent's order.
    run_go_version(&ns, &[4, 3, 2, 0, 1]);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let before = sorted(save(&ns));
    let rules = agent_rules();
    // The Go version's chains carry no mark: the first apply adopts them,
    // made anew with the mark in one batch, the same rules in them.
    assert!(agent_apply(&ns, &rules) > 0, "the chains were not adopted");
    assert_eq!(sorted(save(&ns)), before, "a rule changed");
    let adopted = with_handles(&ns);
    assert_eq!(agent_apply(&ns, &rules), 0, "second apply sent messages");
    // And a second Go version run (a rollback) adds nothing.
    run_go_version(&ns, &[0, 1, 2, 3, 4]);
    assert_eq!(with_handles(&ns), adopted);
}

#[test]
fn after_the_agent_a_go_version_finds_every_rule_of_its_own() {
    let rules = agent_rules();
    let ours = crowded_node("go-ours");
    assert!(agent_apply(&ours, &rules) > 0);
    for (chain, table, jump_from) in GO_CHAINS {
        let mut specs: Vec<Vec<String>> = GO_RULES
            .iter()
            .map(|r| go_rule_spec(jump_from, r))
            .collect();
        if jump_from == "POSTROUTING" {
            specs.extend(GO_INTERNAL.iter().map(|n| go_return_spec(n)));
        }
        for spec in specs {
            assert!(
                ipt(&ours, table, &with_head(&["-C", chain], &spec)),
                "iptables-nft -t {table} -C {chain} {spec:?}: not found"
            );
        }
        let jump = go_jump_spec(chain);
        assert!(ipt(&ours, table, &with_head(&["-C", jump_from], &jump)));
    }
    // The Go version on a node of its own, its rules in the agent's order
    // (this map order gives it in all three chains at once).
    let go = crowded_node("go-made");
    run_go_version(&go, &[0, 1, 2, 3, 4]);
    let (ours_saved, go_saved) = (save(&ours), save(&go));
    assert_eq!(ours_saved, go_saved, "iptables-nft-save differs");
    assert_eq!(
        support::save::agent_iptables_save(&ours),
        view::iptables_save(&rules, &names(), Family::Ipv4),
        "the rule view differs from iptables-nft-save"
    );
    // The Go version started on the agent's node: nothing changes.
    let before = with_handles(&ours);
    run_go_version(&ours, &[3, 1, 4, 0, 2]);
    assert_eq!(with_handles(&ours), before);
}

#[test]
fn cleanup_for_go_version_leaves_exactly_the_go_layout() {
    // The agent as it runs by default plus what the Go version cannot
    // manage: local access (MARKs, hairpin MASQUERADE, nat OUTPUT), IPv6,
    // UDP on a TCP port, and an nftables table of a run of the other flavor.
    let mut rules = agent_rules();
    let tcp = rules.dnat[0].clone();
    let pod = tcp.pod_ip;
    let mut udp = tcp.clone();
    udp.key.proto = Proto::Udp;
    rules.dnat.push(udp.clone());
    rules.forward.push(ForwardRule {
        pod_ip: pod,
        proto: Proto::Udp,
        pod_port: udp.pod_port,
        owner: udp.owner.clone(),
        span: 0,
    });
    rules.snat.push(SnatRule {
        pod_ip: pod,
        proto: Proto::Udp,
        public_ip: udp.key.public_ip,
        owner: udp.owner.clone(),
    });
    rules.local.push(LocalPod {
        pod_ip: pod,
        owner: udp.owner.clone(),
    });
    let v6 = Mapping {
        key: NatKey {
            public_ip: "2001:db8::5".parse().unwrap(),
            public_port: 25,
            proto: Proto::Tcp,
        },
        pod_ip: "fd00::5".parse().unwrap(),
        pod_port: 25,
        owner: tcp.owner.clone(),
        span: 0,
    };
    rules.dnat.push(v6.clone());
    rules.forward.push(ForwardRule {
        pod_ip: v6.pod_ip,
        proto: Proto::Tcp,
        pod_port: 25,
        owner: v6.owner.clone(),
        span: 0,
    });
    // A mapping restricted to sources (`sourceRanges`), of a pod of its
    // own: the Go version would publish it to every source, so it is not
    // handed over — nor its pod's FORWARD and SNAT rules.
    let imap = Mapping {
        key: NatKey {
            public_ip: tcp.key.public_ip,
            public_port: 993,
            proto: Proto::Tcp,
        },
        pod_ip: "10.1.9.9".parse().unwrap(),
        pod_port: 993,
        owner: podnat_controller::model::PodRef::new("mail", "imap-0"),
        span: 0,
    };
    rules.dnat.push(imap.clone());
    rules.forward.push(ForwardRule {
        pod_ip: imap.pod_ip,
        proto: Proto::Tcp,
        pod_port: 993,
        owner: imap.owner.clone(),
        span: 0,
    });
    rules.snat.push(SnatRule {
        pod_ip: imap.pod_ip,
        proto: Proto::Tcp,
        public_ip: imap.key.public_ip,
        owner: imap.owner.clone(),
    });
    rules.allow.push(podnat_controller::model::SourceRule {
        key: imap.key,
        span: 0,
        source: "198.51.100.0/24".parse().unwrap(),
        owner: imap.owner.clone(),
    });
    rules.normalize();

    let ours = crowded_node("go-back");
    let go = crowded_node("go-back-go");
    run_go_version(&go, &[0, 1, 2, 3, 4]);
    let all = rules.clone();
    ours.run(move || {
        IptablesBackend::with_options(names(), JumpPositions::default(), Families::DUAL, true)
            .apply(&all)
            .expect("apply");
        NftablesBackend::with_options(names(), Families::DUAL, true)
            .apply(&all)
            .expect("apply");
    });
    assert!(save(&ours).iter().any(|l| l.contains("PODNAT_OUTPUT")));
    assert!(save(&ours)
        .iter()
        .any(|l| l.contains("-s 198.51.100.0/24") && l.contains("--dport 993")));
    let handles_before = with_handles(&ours);

    let said = agent_cli(&ours, &["cleanup", "--for-go-version"]);
    assert!(said.contains("ip iptables: local access"), "{said}");
    assert!(
        said.contains("1 mapping(s) with source allow-lists removed"),
        "{said}"
    );
    assert!(said.contains("ip6 iptables: chains"), "{said}");
    assert!(said.contains("ip nftables: table podnat"), "{said}");
    assert!(said.contains("ip6 nftables: table podnat"), "{said}");

    // The Go version's layout, line for line, and nothing else of ours: the
    // same chains too (iptables-nft-save lists every built-in chain, made or
    // not; the nat OUTPUT the agent made for local access is gone).
    assert_eq!(save(&ours), save(&go), "iptables-nft-save differs");
    let chains = |ns: &Netns| -> Vec<String> {
        let mut v: Vec<String> = ns
            .sh("nft list table ip nat; nft list table ip filter")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain "))
            .map(|l| l.trim_end_matches(" {").to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(chains(&ours), chains(&go));
    assert!(!ours.sh("ip6tables-nft-save").contains("PODNAT"));
    assert!(!ours.sh("nft list tables").contains("podnat"));
    // Nothing the Go version keeps was made anew: its mappings never stopped.
    let kept = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("10.1.0.") && l.contains("# handle"))
            .filter(|l| !l.contains("udp"))
            .map(str::to_string)
            .collect()
    };
    let after = with_handles(&ours);
    assert!(!kept(&after).is_empty());
    for line in kept(&after) {
        assert!(handles_before.contains(&line), "made anew: {line}");
    }
    // The Go version started there finds all of its rules: nothing changes.
    run_go_version(&ours, &[2, 4, 1, 0, 3]);
    assert_eq!(with_handles(&ours), after);
}
