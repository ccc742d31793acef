//! Foreign tables of every shape beside each flavor (issue 12, item 1, and
//! its bad inputs), with the agent binary in one-shot mode (`--pods-file`)
//! in a namespace of the test's own: kube-proxy's `ip kube-proxy` (chains,
//! sets, maps, verdict maps), iptables-nft `nat`/`filter` with KUBE-*,
//! DOCKER-*, CILIUM_* chains, a firewalld-like `inet` table, `ip6` tables,
//! tables named like our chains, and tables or chains named exactly like
//! ours in another family. What must hold: a second apply sends 0 messages
//! and keeps our handles; the foreign ruleset is byte-identical (handles
//! included) after apply and after cleanup; a foreign rule inserted into our
//! chain is removed; a foreign jump to our chain from a foreign chain is
//! left alone.

mod support;

use support::agent_view;
use support::netns::Netns;
use support::ruleset::diff;

/// Panics with what differs.
fn same(want: &[String], got: &[String], what: &str) {
    assert!(want == got, "{what}: {}", diff(want, got));
}

const FOREIGN_NFT: &str = r#"nft -f - <<'EOF'
table ip kube-proxy {
	set cluster-ips {
		type ipv4_addr
		elements = { 10.0.0.1, 10.0.0.10 }
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.0.0.10 . tcp . 80 : goto service-abc }
	}
	map no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.0.0.99 . tcp . 80 : drop }
	}
	map affinity {
		type ipv4_addr : ipv4_addr
		elements = { 10.0.0.10 : 10.1.1.10 }
	}
	chain service-abc {
		ip daddr 10.0.0.10 tcp dport 80 dnat to 10.1.1.10:8080
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain filter-forward {
		type filter hook forward priority -110; policy accept;
		ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
	}
	chain prerouting {
		counter
	}
}
table inet firewalld {
	chain filter_INPUT {
		type filter hook input priority filter + 10; policy accept;
		ct state established,related accept
		tcp dport 22 accept
	}
	chain filter_FORWARD {
		type filter hook forward priority filter + 10; policy accept;
		ct state established,related accept
	}
	chain nat_PREROUTING {
		type nat hook prerouting priority dstnat + 10; policy accept;
	}
}
table ip6 foreign6 {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 25 counter
	}
}
table ip6 podnat {
	chain prerouting {
		type nat hook prerouting priority -101; policy accept;
		counter
	}
}
table inet podnat {
	chain forward {
		type filter hook forward priority -1; policy accept;
		counter
	}
}
table ip prerouting {
	chain dnat_to_pod {
		counter
	}
}
table ip PODNAT_PRE {
	chain PODNAT_PRE {
		counter
	}
}
table ip foo {
	chain prerouting {
		counter
	}
	chain postrouting {
	}
	chain bar {
	}
}
EOF"#;

const FOREIGN_XT: &str = "\
iptables-nft -t nat -N KUBE-SERVICES && \
iptables-nft -t nat -A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES && \
iptables-nft -t nat -A KUBE-SERVICES -d 10.0.0.10/32 -p tcp --dport 80 -j DNAT --to-destination 10.1.1.10:8080 && \
iptables-nft -t nat -N KUBE-POSTROUTING && \
iptables-nft -t nat -A POSTROUTING -j KUBE-POSTROUTING && \
iptables-nft -t nat -A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE && \
iptables-nft -t nat -N DOCKER && \
iptables-nft -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER && \
iptables-nft -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE && \
iptables-nft -t nat -N CILIUM_PRE_nat && \
iptables-nft -t nat -A PREROUTING -j CILIUM_PRE_nat && \
iptables-nft -t filter -N KUBE-FORWARD && \
iptables-nft -t filter -A FORWARD -j KUBE-FORWARD && \
iptables-nft -t filter -A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT && \
iptables-nft -t filter -N DOCKER-USER && \
iptables-nft -t filter -A FORWARD -j DOCKER-USER && \
iptables-nft -t filter -A DOCKER-USER -j RETURN && \
iptables-nft -t filter -N CILIUM_FORWARD && \
iptables-nft -t filter -A FORWARD -j CILIUM_FORWARD && \
ip6tables-nft -t nat -N PODNAT_PRE && \
ip6tables-nft -t nat -A PREROUTING -j PODNAT_PRE && \
ip6tables-nft -t nat -A PODNAT_PRE -p tcp --dport 25 -j RETURN";

/// Tables that are wholly foreign to either flavor.
const FOREIGN_TABLES: [&str; 9] = [
    "ip kube-proxy",
    "inet firewalld",
    "ip6 foreign6",
    "ip6 podnat",
    "inet podnat",
    "ip prerouting",
    "ip PODNAT_PRE",
    "ip foo",
    "ip6 nat",
];

/// `nft -a list table TABLE` of a table both we (iptables flavor) and
/// others write, split into (ours, foreign) lines: ours are our chains and
/// our jumps from the built-in chains; a jump to our chain from a foreign
/// chain is foreign.
fn split_shared(ns: &Netns, table: &str) -> (Vec<String>, Vec<String>) {
    let text = ns.sh(&format!("nft -a list table {table}"));
    let (mut ours, mut foreign) = (Vec::new(), Vec::new());
    let mut chain = "";
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.trim_start().strip_prefix("chain ") {
            chain = rest.split(' ').next().unwrap_or_default();
        } else if line == "}" {
            chain = ""; // the table's own closing brace
        }
        let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"].contains(&chain);
        let mine = chain.starts_with("PODNAT_") || (builtin && line.contains("jump PODNAT_"));
        let line = format!("{table}/{chain}: {line}");
        if mine {
            ours.push(line);
        } else {
            foreign.push(line);
        }
    }
    (ours, foreign)
}

const SHARED: [&str; 2] = ["ip nat", "ip filter"];

/// Everything foreign, handles included: the foreign tables as `nft -a`
/// lists them, and the foreign lines of the tables we share in the
/// iptables flavor.
fn foreign(ns: &Netns) -> Vec<String> {
    let mut out: Vec<String> = FOREIGN_TABLES
        .iter()
        .map(|t| ns.sh(&format!("nft -a list table {t}")))
        .collect();
    for table in SHARED {
        out.extend(split_shared(ns, table).1);
    }
    out
}

/// What we own, handles included.
fn ours(ns: &Netns, flavor: &str) -> Vec<String> {
    match flavor {
        "nftables" => vec![ns.sh("nft -a list table ip podnat")],
        _ => SHARED.iter().flat_map(|t| split_shared(ns, t).0).collect(),
    }
}

/// One run of the agent with the mail pods file: the messages it sent.
fn apply_once(ns: &Netns, flavor: &str) -> usize {
    let fixture = format!(
        "{}/tests/fixtures/mail-pods.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = ns
        .command(env!("CARGO_BIN_EXE_podnat-controller"))
        .args(["-nodeid=node1", "--public-address", "203.0.113.7"])
        .arg(format!("-firewallflavor={flavor}"))
        .args(["--pods-file", &fixture])
        .env("RUST_LOG", "info")
        .output()
        .expect("run podnat-controller");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    log.lines()
        .filter(|l| l.contains(" applied "))
        .find_map(|l| l.split("messages=").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no message count in:\n{log}"))
}

/// `our_chain` as nft names it; `insert` puts a foreign rule with the
/// comment "foreign-rule" at its top, which `list` shows.
fn beside_foreign_tables(tag: &str, flavor: &str, our_chain: &str, insert: &str, list: &str) {
    let ns = Netns::new(tag);
    ns.sh(FOREIGN_NFT);
    ns.sh(FOREIGN_XT);
    let before = foreign(&ns);

    assert!(apply_once(&ns, flavor) > 0, "the first apply programs");
    same(&before, &foreign(&ns), "apply leaves foreign objects alone");
    let mine = ours(&ns, flavor);
    let second = apply_once(&ns, flavor);
    assert_eq!(
        second, 0,
        "the second apply beside foreign tables sends {second} messages ({flavor} flavor)"
    );
    same(
        &mine,
        &ours(&ns, flavor),
        "the second apply keeps our handles",
    );
    same(
        &before,
        &foreign(&ns),
        "the second apply leaves foreign objects alone",
    );

    // A foreign rule in our chain is ours to remove; a foreign jump to our
    // chain from a foreign chain (iptables flavor) is not ours.
    ns.sh(insert);
    assert!(ns.sh(list).contains("foreign-rule"), "{}", ns.sh(list));
    if flavor == "iptables" {
        ns.sh("iptables-nft -t nat -N FOREIGN-JUMP && iptables-nft -t nat -A FOREIGN-JUMP -j PODNAT_PRE");
    }
    let with_jump = foreign(&ns);
    assert!(apply_once(&ns, flavor) > 0, "the foreign rule is removed");
    let listed = ns.sh(list);
    assert!(!listed.contains("foreign-rule"), "{listed}");
    same(
        &mine,
        &ours(&ns, flavor),
        "ours as before, handles included",
    );
    same(&with_jump, &foreign(&ns), "the foreign jump is left alone");
    if flavor == "iptables" {
        ns.sh("iptables-nft -t nat -F FOREIGN-JUMP && iptables-nft -t nat -X FOREIGN-JUMP");
    }

    agent_view::cleanup(&ns, flavor);
    same(
        &before,
        &foreign(&ns),
        "cleanup leaves foreign objects alone",
    );
    assert!(
        !ns.try_sh(&format!("nft list chain {our_chain}"))
            .status
            .success(),
        "cleanup removed our chain"
    );
}

#[test]
fn nftables_flavor_beside_foreign_tables_of_every_shape() {
    beside_foreign_tables(
        "fgnft",
        "nftables",
        "ip podnat prerouting",
        r#"nft insert rule ip podnat prerouting counter comment '"foreign-rule"'"#,
        "nft list chain ip podnat prerouting",
    );
}

#[test]
fn iptables_flavor_beside_foreign_tables_of_every_shape() {
    beside_foreign_tables(
        "fgipt",
        "iptables",
        "ip nat PODNAT_PRE",
        "iptables-nft -t nat -I PODNAT_PRE -m comment --comment foreign-rule -j RETURN",
        "iptables-nft-save -t nat",
    );
}
