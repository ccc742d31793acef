//! A crowded node in a namespace: what kube-proxy (nftables and iptables
//! mode), Docker, Cilium, firewalld and an IPv6 stack leave in nf_tables,
//! plus foreign objects named like the agent's own in other families and
//! tables. And a snapshot of everything foreign, handles included, to prove
//! apply and cleanup leave it byte-identical.

use super::netns::Netns;

/// Native tables of every shape: chains (base and regular), sets, maps,
/// verdict maps; an `inet` table like firewalld's; `ip6` tables; a table
/// named like the agent's in another family; tables named like its chains.
pub const NATIVE: &str = r#"
table ip kube-proxy {
    set cluster-ips { type ipv4_addr; elements = { 10.96.0.1, 10.96.0.10 } }
    map nat-map { type ipv4_addr : ipv4_addr; elements = { 10.96.0.2 : 10.1.0.9 } }
    map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
    chain service-abc { ip daddr 10.96.0.1 tcp dport 443 counter dnat to 10.1.0.9:6443; }
    chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }
    chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }
    chain nat-output { type nat hook output priority -100; policy accept; jump services; }
    chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
    chain filter-forward { type filter hook forward priority -110; policy accept; ct state new ip daddr @cluster-ips accept; }
}
table ip6 kube-proxy {
    chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
}
table inet firewalld {
    chain filter_INPUT { type filter hook input priority filter + 10; policy accept; tcp dport 22 accept; }
    chain filter_FORWARD { type filter hook forward priority filter + 10; policy accept; ct state established,related accept; }
}
table ip6 podnat {
    set dnat_to_pod { type ipv6_addr; }
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; }
    chain forward { type filter hook forward priority filter; policy accept; }
}
table ip PODNAT_PRE {
    chain PODNAT_PRE { counter; }
}
table ip prerouting {
    chain forward { counter; }
}
"#;

/// iptables-nft users: kube-proxy (iptables mode), Docker, Cilium; and
/// ip6tables-nft chains named like the agent's.
pub const IPTABLES: &str = "set -e
iptables-nft -t nat -N KUBE-SERVICES
iptables-nft -t nat -N KUBE-POSTROUTING
iptables-nft -t nat -A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
iptables-nft -t nat -A POSTROUTING -m comment --comment 'kubernetes postrouting rules' -j KUBE-POSTROUTING
iptables-nft -t nat -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.1.0.9:6443
iptables-nft -t nat -N DOCKER
iptables-nft -t nat -A DOCKER -i docker0 -j RETURN
iptables-nft -t filter -N DOCKER-USER
iptables-nft -t filter -N DOCKER
iptables-nft -t filter -A FORWARD -j DOCKER-USER
iptables-nft -t filter -A DOCKER-USER -j RETURN
iptables-nft -t filter -N CILIUM_FORWARD
iptables-nft -t filter -A FORWARD -m comment --comment 'cilium-feeder: CILIUM_FORWARD' -j CILIUM_FORWARD
iptables-nft -t filter -A CILIUM_FORWARD -o cilium_host -j ACCEPT
ip6tables-nft -t nat -N PODNAT_PRE
ip6tables-nft -t nat -A PREROUTING -j PODNAT_PRE
ip6tables-nft -t nat -A PODNAT_PRE -p tcp --dport 25 -j ACCEPT
";

/// A dual-stack crowd for an agent that serves IPv6 too (where `ip6 podnat`
/// and ip6tables-nft's `PODNAT_*` are its own names): the native tables but
/// the ip6 one named like the agent's, the iptables-nft users, and
/// kube-proxy's iptables-mode hooks in both families, nat OUTPUT included.
pub fn crowd_dual(ns: &Netns) {
    let start = NATIVE
        .find("table ip6 podnat {")
        .expect("the ip6 podnat table");
    let end = start + NATIVE[start..].find("\n}\n").expect("its end") + 3;
    let native = format!("{}{}", &NATIVE[..start], &NATIVE[end..]);
    ns.sh(&format!("nft -f - <<'EOF'\n{native}\nEOF"));
    let v4: String = IPTABLES
        .lines()
        .filter(|l| !l.starts_with("ip6tables"))
        .map(|l| format!("{l}\n"))
        .collect();
    ns.sh(&v4);
    ns.sh(KUBE_PROXY_BOTH);
}

/// kube-proxy (iptables mode) hooks in nat OUTPUT (IPv4) and everywhere in
/// ip6tables-nft's tables.
const KUBE_PROXY_BOTH: &str = "set -e
iptables-nft -t nat -A OUTPUT -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
for t in ip6tables-nft; do
  $t -t nat -N KUBE-SERVICES
  $t -t nat -N KUBE-POSTROUTING
  $t -t nat -A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
  $t -t nat -A OUTPUT -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
  $t -t nat -A POSTROUTING -m comment --comment 'kubernetes postrouting rules' -j KUBE-POSTROUTING
  $t -t filter -N KUBE-FORWARD
  $t -t filter -A FORWARD -m comment --comment 'kubernetes forwarding rules' -j KUBE-FORWARD
done
";

/// Fills `ns` with the crowd.
pub fn crowd(ns: &Netns) {
    ns.sh(&format!("nft -f - <<'EOF'\n{NATIVE}\nEOF"));
    ns.sh(IPTABLES);
}

/// `ruleset` with every counter at zero: traffic through foreign rules
/// moves their counters, which is not a change of the rules.
pub fn without_counters(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    let mut rest = listing;
    while let Some(at) = rest.find("counter packets ") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        // "counter packets N bytes M": keep the words, drop the numbers.
        let words: Vec<&str> = tail.splitn(6, ' ').collect();
        out.push_str("counter packets 0 bytes 0");
        rest = words
            .get(5)
            .map_or("", |w| &tail[tail.len() - w.len() - 1..]);
    }
    out.push_str(rest);
    out
}

/// The whole ruleset with handles (`nft -a list ruleset`).
pub fn ruleset(ns: &Netns) -> String {
    ns.sh("nft -a list ruleset")
}

/// `ruleset` without the agent's objects: the table `ip <table>` (nftables
/// flavor) and, in iptables-nft's `ip nat`/`ip filter`, the chains named
/// `<chain_prefix>*` and the rules that jump to them (iptables flavor).
/// Blank lines are dropped. Everything else — foreign objects with the agent's names in other tables
/// and families included — stays.
pub fn foreign_part(listing: &str, table: &str, chain_prefix: &str) -> String {
    let mut out = String::new();
    let mut current = String::new();
    let mut skipping_table = false;
    let mut skipping_chain = false;
    for line in listing.lines() {
        if let Some(rest) = line.strip_prefix("table ") {
            current = rest.split(" {").next().unwrap_or("").to_string();
            skipping_table = current == format!("ip {table}");
        }
        if skipping_table {
            if line == "}" {
                skipping_table = false;
            }
            continue;
        }
        let iptables_table = current == "ip nat" || current == "ip filter";
        if iptables_table {
            if line.starts_with(&format!("\tchain {chain_prefix}")) {
                skipping_chain = true;
            }
            if skipping_chain {
                if line == "\t}" {
                    skipping_chain = false;
                }
                continue;
            }
            if line.contains(&format!("jump {chain_prefix}")) {
                continue;
            }
        }
        // Blank lines separate chains; which ones remain depends on what
        // was cut, so none is kept.
        if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
