//! The rule view: a rule set rendered as the text the real tools print —
//! `iptables-nft-save` lines for the iptables flavor, `nft list table` for the
//! native one. `-dryrun` prints it, the HTTP endpoint serves it, and the
//! integration tests compare it with the tools' own output.

use std::fmt::Write;
use std::net::IpAddr;

use crate::firewall::names::{self, internal_returns, Names};
use crate::firewall::Features;
use crate::model::{
    host_port, Family, ForwardRule, LocalPod, Mapping, NatKey, PodRef, RuleSet, SnatRule,
    SourceRule,
};

/// nft's name of a family's tables: `ip` or `ip6`.
pub fn nft_family(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

/// `A/32` or `A/128`, as iptables-save prints a host.
fn host(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// `-A <PREFIX>_PRE ...` for one mapping, exactly as iptables-nft-save prints it.
/// `source`: the allowed range of a restricted mapping's rule. A port range
/// is `--dport N:M` and `--to-destination A:P-Q/N`.
pub fn ipt_dnat(n: &Names, m: &Mapping, source: Option<ipnet::IpNet>) -> String {
    let p = m.key.proto;
    let mut to = host_port(m.pod_ip, m.pod_port);
    if m.span > 0 {
        let _ = write!(to, "-{}/{}", m.pod_port + m.span, m.key.public_port);
    }
    format!(
        "-A {}{} -d {} -p {p} -m {p} --dport {} -m comment --comment \"{}\" -j DNAT --to-destination {to}",
        n.pre,
        source.map(|s| format!(" -s {s}")).unwrap_or_default(),
        host(m.key.public_ip),
        ipt_ports(m.key.public_port, m.span),
        m.owner,
    )
}

/// `--dport`'s value: `N`, or `N:M` for a range.
fn ipt_ports(first: u16, span: u16) -> String {
    if span == 0 {
        first.to_string()
    } else {
        format!("{first}:{}", first + span)
    }
}

pub fn ipt_snat(n: &Names, s: &SnatRule) -> String {
    format!(
        "-A {} -s {} -p {} -m comment --comment \"{}\" -j SNAT --to-source {}",
        n.post,
        host(s.pod_ip),
        s.proto,
        s.owner,
        s.public_ip
    )
}

pub fn ipt_forward(n: &Names, f: &ForwardRule) -> String {
    let p = f.proto;
    format!(
        "-A {} -d {} -p {p} -m conntrack --ctstate NEW -m {p} --dport {} -m comment --comment \"{}\" -j ACCEPT",
        n.forward,
        host(f.pod_ip),
        ipt_ports(f.pod_port, f.span),
        f.owner
    )
}

pub fn ipt_internal_return(n: &Names, net: IpAddr, len: u8) -> String {
    format!(
        "-A {} -d {net}/{len} -m comment --comment \"{}\" -j RETURN",
        n.post, n.internal_comment
    )
}

pub fn ipt_jump(n: &Names, parent: &str, target: &str) -> String {
    format!(
        "-A {parent} -m comment --comment \"{}\" -j {target}",
        n.jump_comment
    )
}

/// `<PREFIX>_OUTPUT`'s jump to `<PREFIX>_PRE`, for the node's own addresses.
pub fn ipt_local_jump(n: &Names, chain: &str, target: &str) -> String {
    format!(
        "-A {chain} -m addrtype --dst-type LOCAL -m comment --comment \"{}\" -j {target}",
        n.jump_comment
    )
}

/// `-A <PREFIX>_PRE -s P ... -j MARK` for a hairpin source.
pub fn ipt_mark(n: &Names, l: &LocalPod) -> String {
    format!(
        "-A {} -s {} -m addrtype --dst-type LOCAL -m comment --comment \"{}\" -j MARK --set-xmark 0x{:x}/0x{:x}",
        n.pre,
        host(l.pod_ip),
        l.owner,
        names::HAIRPIN_MARK,
        names::HAIRPIN_MARK
    )
}

/// The hairpin masquerade at the head of `<PREFIX>_POST`.
pub fn ipt_masquerade(n: &Names) -> String {
    format!(
        "-A {} -m mark --mark 0x{:x}/0x{:x} -m comment --comment \"{}\" -j MASQUERADE",
        n.post,
        names::HAIRPIN_MARK,
        names::HAIRPIN_MARK,
        n.hairpin_comment
    )
}

/// A counting rule of `<PREFIX>_COUNT` (`-iptablescounters`), as
/// iptables-nft-save prints it (the protocol as a number, the address
/// without its prefix length).
pub fn ipt_count(n: &Names, key: &NatKey, span: u16, owner: &PodRef) -> String {
    format!(
        "-A {} -m conntrack --ctproto {} --ctorigdst {} --ctorigdstport {} -m comment --comment \"{owner}\" -j RETURN",
        n.count,
        key.proto.number(),
        key.public_ip,
        ipt_ports(key.public_port, span),
    )
}

/// A jump of DNATed connections' packets (mangle's to the counting chains).
pub fn ipt_dnat_jump(n: &Names, parent: &str, target: &str) -> String {
    format!(
        "-A {parent} -m conntrack --ctstate DNAT -m comment --comment \"{}\" -j {target}",
        n.jump_comment
    )
}

/// The agent's part of `iptables-nft-save` (`ip6tables-nft-save` for IPv6):
/// its chains, its jump rules and its rules, table by table, in the order
/// iptables-nft-save prints them.
pub fn iptables_save(rules: &RuleSet, n: &Names, family: Family) -> String {
    iptables_save_with(rules, n, family, false)
}

/// `iptables_save` with `-localaccess`'s objects when `local`: the chain
/// `<PREFIX>_OUTPUT` and its jump, the hairpin marks and masquerade.
pub fn iptables_save_with(rules: &RuleSet, n: &Names, family: Family, local: bool) -> String {
    iptables_save_counted(rules, n, family, local, false)
}

/// `iptables_save_with`, with `-iptablescounters`' mangle chains when
/// `counters`: `<PREFIX>_COUNT` (one rule per mapping) from POSTROUTING,
/// and with `local` `<PREFIX>_COUNTIN` from INPUT.
pub fn iptables_save_counted(
    rules: &RuleSet,
    n: &Names,
    family: Family,
    local: bool,
    counters: bool,
) -> String {
    let mut out = String::new();
    let mut user_chains = vec![n.post.as_str(), n.pre.as_str()];
    if local {
        user_chains.push(n.output.as_str());
    }
    user_chains.sort_unstable();
    out.push_str("*nat\n");
    for c in &user_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    let _ = writeln!(out, "{}", ipt_jump(n, "PREROUTING", &n.pre));
    if local {
        let _ = writeln!(out, "{}", ipt_jump(n, "OUTPUT", &n.output));
    }
    let _ = writeln!(out, "{}", ipt_jump(n, "POSTROUTING", &n.post));
    for c in user_chains {
        if c == n.output {
            let _ = writeln!(out, "{}", ipt_local_jump(n, &n.output, &n.pre));
        } else if c == n.post {
            if local {
                let _ = writeln!(out, "{}", ipt_masquerade(n));
            }
            for (net, len) in internal_returns(family) {
                let _ = writeln!(out, "{}", ipt_internal_return(n, net, len));
            }
            for s in &rules.snat {
                let _ = writeln!(out, "{}", ipt_snat(n, s));
            }
        } else {
            if local {
                for l in &rules.local {
                    let _ = writeln!(out, "{}", ipt_mark(n, l));
                }
            }
            for (m, source) in rules.dnat_sources() {
                let _ = writeln!(out, "{}", ipt_dnat(n, m, source));
            }
        }
    }
    out.push_str("COMMIT\n*filter\n");
    let _ = writeln!(out, ":{} - [0:0]", n.forward);
    let _ = writeln!(out, "{}", ipt_jump(n, "FORWARD", &n.forward));
    for f in &rules.forward {
        let _ = writeln!(out, "{}", ipt_forward(n, f));
    }
    out.push_str("COMMIT\n");
    if counters {
        out.push_str("*mangle\n");
        let _ = writeln!(out, ":{} - [0:0]", n.count);
        if local {
            let _ = writeln!(out, ":{} - [0:0]", n.count_input);
            let _ = writeln!(out, "{}", ipt_dnat_jump(n, "INPUT", &n.count_input));
        }
        let _ = writeln!(out, "{}", ipt_dnat_jump(n, "POSTROUTING", &n.count));
        for m in &rules.dnat {
            let _ = writeln!(out, "{}", ipt_count(n, &m.key, m.span, &m.owner));
        }
        if local {
            let _ = writeln!(out, "{}", ipt_jump(n, &n.count_input, &n.count));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// One element of the DNAT map in nft syntax.
/// A DNAT map element's key, as `delete element` names it.
/// One per published port (a range's part is its ports).
pub fn nft_dnat_keys(m: &Mapping) -> impl Iterator<Item = String> + '_ {
    m.ports().map(|(k, _)| nft_key(&k))
}

/// An element's comment: the owner, after `first-last ` for a port of a
/// range's part (how the flavor reads the part back as one mapping).
pub fn nft_element_comment(owner: &PodRef, first: u16, span: u16) -> String {
    if span == 0 {
        return owner.to_string();
    }
    crate::firewall::part_comment(owner, first, span)
}

/// The DNAT map's elements of a mapping, one per port.
pub fn nft_dnat_elements(m: &Mapping) -> impl Iterator<Item = String> + '_ {
    let comment = nft_element_comment(&m.owner, m.key.public_port, m.span);
    nft_dnat_keys(m)
        .zip(m.ports())
        .map(move |(key, (_, pod_port))| {
            format!("{key} comment \"{comment}\" : {} . {pod_port}", m.pod_ip)
        })
}

pub fn nft_snat_key(s: &SnatRule) -> String {
    format!("{} . {}", s.pod_ip, s.proto)
}

pub fn nft_snat_element(s: &SnatRule) -> String {
    format!(
        "{} comment \"{}\" : {}",
        nft_snat_key(s),
        s.owner,
        s.public_ip
    )
}

/// One per accepted pod port.
pub fn nft_forward_keys(f: &ForwardRule) -> impl Iterator<Item = String> + '_ {
    f.ports()
        .map(|p| format!("{} . {} . {p}", f.pod_ip, f.proto))
}

pub fn nft_forward_elements(f: &ForwardRule) -> impl Iterator<Item = String> + '_ {
    let comment = nft_element_comment(&f.owner, f.pod_port, f.span);
    nft_forward_keys(f).map(move |k| format!("{k} comment \"{comment}\""))
}

fn nft_elements(out: &mut String, elements: &[String]) {
    nft_elements_by(out, elements, 1);
}

/// `per_line` elements on a line: nft prints one concatenated (or IPv6)
/// element per line, but two IPv4 addresses (its `calculate_delim`, as nft
/// 1.0.6 prints a plain address set, with or without comments);
/// continuation lines indented by three tabs and five spaces.
fn nft_elements_by(out: &mut String, elements: &[String], per_line: usize) {
    if elements.is_empty() {
        return;
    }
    let mut sorted: Vec<&String> = elements.iter().collect();
    sorted.sort_by_key(|e| sort_key(e));
    out.push_str("\t\telements = { ");
    for (i, e) in sorted.iter().enumerate() {
        if i > 0 {
            out.push_str(if i % per_line == 0 {
                ",\n\t\t\t     "
            } else {
                ", "
            });
        }
        out.push_str(e);
    }
    out.push_str(" }\n");
}

fn nft_priority(base: &str, offset: i32) -> String {
    match offset {
        0 => base.to_string(),
        o if o < 0 => format!("{base} - {}", -o),
        o => format!("{base} + {o}"),
    }
}

/// The native table as `nft list table ip <prefix>` (or `ip6 <prefix>`)
/// prints it (elements in key order; the kernel's hash order may differ, see
/// `canonical_nft`).
pub fn nft(rules: &RuleSet, n: &Names, family: Family) -> String {
    nft_with(rules, n, family, false)
}

/// A hairpin source in the `local_pods` set.
pub fn nft_local_element(l: &LocalPod) -> String {
    format!("{} comment \"{}\"", l.pod_ip, l.owner)
}

/// `nft`, with `-localaccess`'s objects when `local`: the `local_pods` set,
/// the hairpin mark and masquerade, the nat output chain.
pub fn nft_with(rules: &RuleSet, n: &Names, family: Family, local: bool) -> String {
    nft_layout(rules, n, family, local, Features::ALL)
}

/// `nft_with` for the layout with `features`: an older kernel's table has
/// no allow-lists' objects, or no counters'.
pub fn nft_layout(
    rules: &RuleSet,
    n: &Names,
    family: Family,
    local: bool,
    features: Features,
) -> String {
    let Features { sources, traffic } = features;
    let (fam, addr) = match family {
        Family::Ipv4 => ("ip", "ipv4_addr"),
        Family::Ipv6 => ("ip6", "ipv6_addr"),
    };
    let mut out = String::new();
    let mark = n.mark();
    let _ = writeln!(out, "table {fam} {} {{", n.table());
    let _ = writeln!(out, "\tcomment \"{mark}\"");
    let _ = writeln!(out, "\tmap {} {{", names::NFT_DNAT_MAP);
    let _ = writeln!(
        out,
        "\t\ttype {addr} . inet_proto . inet_service : {addr} . inet_service"
    );
    nft_elements(
        &mut out,
        &rules
            .dnat
            .iter()
            .flat_map(nft_dnat_elements)
            .collect::<Vec<_>>(),
    );
    out.push_str("\t}\n\n");
    let _ = writeln!(out, "\tmap {} {{", names::NFT_SNAT_MAP);
    let _ = writeln!(out, "\t\ttype {addr} . inet_proto : {addr}");
    nft_elements(
        &mut out,
        &rules.snat.iter().map(nft_snat_element).collect::<Vec<_>>(),
    );
    out.push_str("\t}\n\n");
    let _ = writeln!(out, "\tset {} {{", names::NFT_FORWARD_SET);
    let _ = writeln!(out, "\t\ttype {addr} . inet_proto . inet_service");
    nft_elements(
        &mut out,
        &rules
            .forward
            .iter()
            .flat_map(nft_forward_elements)
            .collect::<Vec<_>>(),
    );
    out.push_str("\t}\n\n");
    if local {
        let _ = writeln!(out, "\tset {} {{", names::NFT_LOCAL_SET);
        let _ = writeln!(out, "\t\ttype {addr}");
        let elements: Vec<String> = rules.local.iter().map(nft_local_element).collect();
        let per_line = if family == Family::Ipv4 { 2 } else { 1 };
        nft_elements_by(&mut out, &elements, per_line);
        out.push_str("\t}\n\n");
    }
    if traffic {
        let _ = writeln!(out, "\tset {} {{", names::NFT_TRAFFIC_SET);
        let _ = writeln!(
            out,
            "\t\ttype {addr} . inet_proto . inet_service\n\t\tcounter"
        );
        nft_elements(
            &mut out,
            &rules
                .dnat
                .iter()
                .flat_map(nft_traffic_elements)
                .collect::<Vec<_>>(),
        );
        out.push_str("\t}\n\n");
    }
    if sources {
        let _ = writeln!(out, "\tset {} {{", names::NFT_RESTRICTED_SET);
        let _ = writeln!(out, "\t\ttype {addr} . inet_proto . inet_service");
        let keys: Vec<String> = crate::model::source_restricted_ports(&rules.allow)
            .iter()
            .map(nft_key)
            .collect();
        nft_elements(&mut out, &keys);
        out.push_str("\t}\n\n");
        let _ = writeln!(out, "\tset {} {{", names::NFT_SOURCES_SET);
        let _ = writeln!(
            out,
            "\t\ttype {addr} . inet_proto . inet_service . {addr}\n\t\tflags interval"
        );
        nft_elements(
            &mut out,
            &rules
                .allow
                .iter()
                .map(nft_source_element)
                .collect::<Vec<_>>(),
        );
        out.push_str("\t}\n\n");
    }
    let _ = writeln!(out, "\tchain {} {{", names::NFT_PRE_CHAIN);
    let _ = writeln!(out, "\t\tcomment \"{mark}\"");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority {}; policy accept;",
        nft_priority("dstnat", names::NFT_PRE_PRIORITY + 100)
    );
    if local {
        let _ = writeln!(
            out,
            "\t\t{fam} saddr @{} {fam} daddr . meta l4proto . th dport @{} meta mark set meta mark | 0x{:08x}",
            names::NFT_LOCAL_SET,
            names::NFT_DNAT_MAP,
            names::HAIRPIN_MARK
        );
    }
    let dnat = format!(
        "\t\tdnat {fam} to {fam} daddr . meta l4proto . th dport map @{}",
        names::NFT_DNAT_MAP
    );
    let _ = writeln!(out, "{dnat}");
    out.push_str("\t}\n\n");
    let _ = writeln!(out, "\tchain {} {{", names::NFT_POST_CHAIN);
    let _ = writeln!(out, "\t\tcomment \"{mark}\"");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority {}; policy accept;",
        nft_priority("srcnat", names::NFT_POST_PRIORITY - 100)
    );
    if local {
        let _ = writeln!(
            out,
            "\t\tmeta mark & 0x{0:08x} == 0x{0:08x} masquerade",
            names::HAIRPIN_MARK
        );
    }
    for (net, len) in crate::model::internal_networks(family) {
        // nft prints a host prefix as the bare address.
        if len == 128 {
            let _ = writeln!(out, "\t\t{fam} daddr {net} return");
        } else {
            let _ = writeln!(out, "\t\t{fam} daddr {net}/{len} return");
        }
    }
    let _ = writeln!(
        out,
        "\t\tsnat to {fam} saddr . meta l4proto map @{}",
        names::NFT_SNAT_MAP
    );
    out.push_str("\t}\n\n");
    let _ = writeln!(out, "\tchain {} {{", names::NFT_FORWARD_CHAIN);
    let _ = writeln!(out, "\t\tcomment \"{mark}\"");
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority {}; policy accept;",
        nft_priority("filter", names::NFT_FORWARD_PRIORITY)
    );
    let _ = writeln!(
        out,
        "\t\tct state new {fam} daddr . meta l4proto . th dport @{} accept",
        names::NFT_FORWARD_SET
    );
    out.push_str("\t}\n");
    if local {
        let _ = writeln!(out, "\n\tchain {} {{", names::NFT_OUTPUT_CHAIN);
        let _ = writeln!(out, "\t\tcomment \"{mark}\"");
        // nft names no priority at the nat output hook: a plain number.
        let _ = writeln!(
            out,
            "\t\ttype nat hook output priority {}; policy accept;",
            names::NFT_OUTPUT_PRIORITY
        );
        let _ = writeln!(out, "\t\tfib daddr type local {}", dnat.trim_start());
        out.push_str("\t}\n");
    }
    let source_chains: &[(&str, &str)] = if !sources {
        &[]
    } else if local {
        &[
            (names::NFT_SOURCE_PRE_CHAIN, "prerouting"),
            (names::NFT_SOURCE_OUT_CHAIN, "output"),
        ]
    } else {
        &[(names::NFT_SOURCE_PRE_CHAIN, "prerouting")]
    };
    for (chain, hook) in source_chains {
        let _ = writeln!(out, "\n\tchain {chain} {{");
        let _ = writeln!(out, "\t\tcomment \"{mark}\"");
        // nft names the prerouting priority after dstnat, and none at the
        // output hook: a plain number there.
        let priority = if *hook == "output" {
            names::NFT_SOURCE_PRIORITY.to_string()
        } else {
            nft_priority("dstnat", names::NFT_SOURCE_PRIORITY + 100)
        };
        let _ = writeln!(
            out,
            "\t\ttype filter hook {hook} priority {priority}; policy accept;"
        );
        let _ = writeln!(
            out,
            "\t\t{fam} daddr . meta l4proto . th dport @{} {fam} daddr . meta l4proto . th dport . {fam} saddr != @{} drop",
            names::NFT_RESTRICTED_SET,
            names::NFT_SOURCES_SET
        );
        out.push_str("\t}\n");
    }
    if traffic {
        let traffic_chains: &[(&str, &str)] = if local {
            &[
                (names::NFT_TRAFFIC_CHAIN, "forward"),
                (names::NFT_TRAFFIC_OUT_CHAIN, "output"),
                (names::NFT_TRAFFIC_IN_CHAIN, "input"),
            ]
        } else {
            &[(names::NFT_TRAFFIC_CHAIN, "forward")]
        };
        for (chain, hook) in traffic_chains {
            let _ = writeln!(out, "\n\tchain {chain} {{");
            let _ = writeln!(out, "\t\tcomment \"{mark}\"");
            let _ = writeln!(
                out,
                "\t\ttype filter hook {hook} priority {}; policy accept;",
                nft_priority("filter", names::NFT_TRAFFIC_PRIORITY)
            );
            for proto in ["tcp", "udp"] {
                let _ = writeln!(
                    out,
                    "\t\tmeta l4proto {proto} ct original {fam} daddr . ct protocol . ct original proto-dst @{}",
                    names::NFT_TRAFFIC_SET
                );
            }
            out.push_str("\t}\n");
        }
    }
    out.push_str("}\n");
    out
}

/// A counted key in `mapping_traffic`: the view shows no traffic (the
/// counters are the metrics'; `canonical_nft` zeroes the kernel's).
fn nft_traffic_elements(m: &Mapping) -> impl Iterator<Item = String> + '_ {
    let comment = nft_element_comment(&m.owner, m.key.public_port, m.span);
    nft_dnat_keys(m).map(move |k| format!("{k} counter packets 0 bytes 0 comment \"{comment}\""))
}

/// `address . proto . port` of a key, as nft prints it.
pub fn nft_key(k: &NatKey) -> String {
    format!("{} . {} . {}", k.public_ip, k.proto, k.public_port)
}

/// `key . range` of an element of `source_allowed` (a host range as the
/// bare address, as nft prints it).
pub fn nft_source_key(a: &SourceRule) -> String {
    let source = if a.source.prefix_len() == a.source.max_prefix_len() {
        a.source.addr().to_string()
    } else {
        a.source.to_string()
    };
    format!("{} . {source}", nft_key_run(&a.key, a.span))
}

/// `address . proto . first-last` of a run of keys (`nft_key` for one).
pub fn nft_key_run(k: &NatKey, span: u16) -> String {
    if span == 0 {
        return nft_key(k);
    }
    let last = k.public_port + span;
    format!("{} . {} . {}-{last}", k.public_ip, k.proto, k.public_port)
}

/// An allowed source range in `source_allowed`, with its owner (after its
/// part's first and last port, for a range's).
pub fn nft_source_element(a: &SourceRule) -> String {
    let comment = nft_element_comment(&a.owner, a.key.public_port, a.span);
    format!("{} comment \"{comment}\"", nft_source_key(a))
}

/// Puts the elements of every set/map in `nft list` output into sorted order,
/// so kernel output and the rendered view compare with `==`.
pub fn canonical_nft(text: &str) -> String {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(start) = line.find("elements = { ") else {
            out.push(line.to_string());
            continue;
        };
        let indent = &line[..start];
        let mut body = line[start + "elements = { ".len()..].to_string();
        while !body.trim_end().ends_with('}') {
            match lines.next() {
                Some(next) => {
                    body.push(' ');
                    body.push_str(next.trim());
                }
                None => break,
            }
        }
        let body = body.trim_end().trim_end_matches('}').trim_end();
        let mut elems: Vec<String> = body
            .split(',')
            .map(|e| zero_counter(e.trim()))
            .filter(|e| !e.is_empty())
            .collect();
        elems.sort_by_key(|e| sort_key(e));
        out.push(format!(
            "{indent}elements = {{ {} }}",
            elems.join(",\n\t\t\t     ")
        ));
    }
    let mut s = out.join("\n");
    if text.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// An element's `counter packets N bytes M` as `counter packets 0 bytes 0`:
/// traffic is not part of the rule view.
fn zero_counter(e: &str) -> String {
    let Some(at) = e.find("counter packets ") else {
        return e.to_string();
    };
    let rest = &e[at + "counter packets ".len()..];
    let mut words = rest.splitn(4, ' ');
    let (Some(_), Some("bytes"), Some(_)) = (words.next(), words.next(), words.next()) else {
        return e.to_string();
    };
    let tail = words.next().map(|t| format!(" {t}")).unwrap_or_default();
    format!("{}counter packets 0 bytes 0{tail}", &e[..at])
}

/// Numeric-aware key: addresses and ports compare as numbers.
fn sort_key(e: &str) -> Vec<(u64, String)> {
    e.split([' ', '.', ':'])
        .map(|t| (t.parse::<u64>().unwrap_or(u64::MAX), t.to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
