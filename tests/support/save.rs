//! What `iptables-nft-save` shows of the agent in a namespace, in the form
//! the iptables rule view renders it, and what `nft --debug=netlink` shows
//! of a table (to compare two writers expression by expression).

use super::netns::Netns;

/// The agent's part of `iptables-nft-save` (its chains, its rules, its jump
/// lines), table by table as the view renders them: what the view equals.
pub fn agent_iptables_save(ns: &Netns) -> String {
    agent_save_by(ns, "iptables-nft-save")
}

/// The same from `ip6tables-nft-save`.
pub fn agent_ip6tables_save(ns: &Netns) -> String {
    agent_save_by(ns, "ip6tables-nft-save")
}

/// The agent's part of what `tool` (`iptables-nft-save` or
/// `ip6tables-nft-save`) prints.
pub fn agent_save_by(ns: &Netns, tool: &str) -> String {
    let mut out = String::new();
    // mangle only when the agent has something there (-iptablescounters).
    for t in ["nat", "filter", "mangle"] {
        let listed = ns.try_sh(&format!("{tool} -t {t}"));
        let mut ours = String::new();
        for l in String::from_utf8_lossy(&listed.stdout).lines() {
            if l.starts_with(":PODNAT_")
                || l.starts_with("-A PODNAT_")
                || l.contains("\"podnat[jump_to_chain]\"")
            {
                ours.push_str(l);
                ours.push('\n');
            }
        }
        if t != "mangle" || !ours.is_empty() {
            out.push_str(&format!("*{t}\n{ours}COMMIT\n"));
        }
    }
    out
}

/// `nft --debug=netlink list table <family> <t>`: each chain's rules with
/// their expressions, handles stripped, chains by name (the listing follows
/// chain creation order, which differs between two writers).
pub fn netlink_debug(ns: &Netns, family: &str, table: &str) -> String {
    let out = ns.sh(&format!(
        "nft --debug=netlink list table {family} {table} 2>/dev/null"
    ));
    let mut chains: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix(&format!("{family} {table} ")) {
            let chain = rest.split_whitespace().next().unwrap_or("").to_string();
            chains.entry(chain.clone()).or_default().push("rule".into());
            current = Some(chain);
        } else if l.starts_with("  [") {
            let chain = current.clone().expect("expression outside a rule");
            chains.get_mut(&chain).unwrap().push(l.to_string());
        }
    }
    chains
        .into_iter()
        .map(|(c, lines)| format!("chain {c}\n{}", lines.join("\n")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The chains of a family's tables as `nft list chains` declares them
/// (type, hook, priority, policy), sorted by name.
pub fn chain_decls(ns: &Netns, family: &str) -> Vec<String> {
    let out = ns.sh(&format!("nft list chains {family} 2>/dev/null"));
    let mut decls: Vec<String> = out
        .split("chain ")
        .skip(1)
        .map(|c| {
            c.lines()
                .take_while(|l| !l.trim().starts_with('}'))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    decls.sort();
    decls
}

/// The agent's mark as `nft list` shows it on a table or chain.
pub const MARK: &str = " comment \"podnat-controller:podnat\"";

/// `chain_decls` of a namespace where every chain is the agent's: each must
/// carry the mark; returned without it (as iptables-nft would make them).
pub fn agent_chain_decls(ns: &Netns, family: &str) -> Vec<String> {
    let decls = chain_decls(ns, family);
    assert!(
        decls.iter().all(|d| d.contains(MARK)),
        "unmarked: {decls:?}"
    );
    decls.iter().map(|d| d.replace(MARK, "")).collect()
}

/// Writes the rules of a rule view (`iptables-save` syntax) with `tool`
/// itself (iptables-nft or ip6tables-nft), one command per line: `-N` for
/// each chain, `-A` for each rule. The twin the agent's encoding is compared
/// with.
pub fn write_with(ns: &Netns, tool: &str, view: &str) {
    let mut table = "nat";
    for l in view.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t;
        } else if let Some(c) = l.strip_prefix(':') {
            let chain = c.split_whitespace().next().unwrap();
            ns.sh(&format!("{tool} -t {table} -N {chain}"));
        } else if l.starts_with("-A ") {
            ns.sh(&format!("{tool} -t {table} {l}"));
        }
    }
}

/// The kernel holds exactly the rule view of `rules` (the agent's table in
/// `nft list`, or its part of `iptables-nft-save` / `ip6tables-nft-save`),
/// in both families; in the iptables flavor `-C` also finds each DNAT and
/// FORWARD rule the view lists as the rule iptables would write itself.
pub fn assert_kernel_holds_view(
    ns: &Netns,
    flavor: podnat_controller::config::Flavor,
    rules: &podnat_controller::model::RuleSet,
) {
    use podnat_controller::firewall::view;
    use podnat_controller::model::Family;
    let names = super::rules::names();
    for (family, fam) in [(Family::Ipv4, "ip"), (Family::Ipv6, "ip6")] {
        let ours = rules.of_family(family);
        if flavor == podnat_controller::config::Flavor::Nftables {
            assert_eq!(
                view::canonical_nft(&ns.sh(&format!("nft list table {fam} podnat"))),
                view::canonical_nft(&view::nft_with(&ours, &names, family, true)),
                "table {fam} podnat holds the view"
            );
            continue;
        }
        let tool = if family == Family::Ipv4 {
            "iptables-nft"
        } else {
            "ip6tables-nft"
        };
        let text = view::iptables_save_with(&ours, &names, family, true);
        assert_eq!(
            agent_save_by(ns, &format!("{tool}-save")),
            text,
            "{tool}-save"
        );
        for (table, chain) in [("nat", "PODNAT_PRE"), ("filter", "PODNAT_FORWARD")] {
            for spec in text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("-A {chain} ")))
            {
                let out = ns.try_sh(&format!("{tool} -t {table} -C {chain} {spec}"));
                assert!(out.status.success(), "{tool} -C {chain} {spec}: {out:?}");
            }
        }
    }
}
