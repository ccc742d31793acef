//! What a table holds, as comparable text, for before/after comparisons of
//! rules the test does not own (kube-proxy's) or must find unchanged (the
//! agent's): handles and counters dropped, set and map elements sorted,
//! rules kept in their order within each chain, chains in name order (a
//! chain deleted and created again is listed last by the kernel).

use std::collections::BTreeMap;

use serde_json::Value;

use super::netns::Netns;

/// Drops what changes without the rules changing: handles and counter
/// values; sorts set and map elements.
fn scrub(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("handle");
            if let Some(c) = map.get_mut("counter") {
                *c = Value::Null;
            }
            for (_, inner) in map.iter_mut() {
                scrub(inner);
            }
            if let Some(Value::Array(elems)) = map.get_mut("elem") {
                elems.sort_by_key(|e| e.to_string());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// `nft -j list table FAMILY NAME`, one line per object; empty when the
/// table does not exist. With `skip_empty_chains`, regular chains without
/// rules are left out: kube-proxy's nftables mode flushes a chain it no
/// longer needs and deletes it at a later sync, so when it is gone is a
/// matter of timing, not of what the rules do.
pub fn nft_table(node: &Netns, family: &str, name: &str, skip_empty_chains: bool) -> Vec<String> {
    let out = node.try_sh(&format!("nft -j list table {family} {name}"));
    if !out.status.success() {
        return Vec::new();
    }
    let doc: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut lines = Vec::new();
    let mut chains: BTreeMap<String, (Option<String>, Vec<String>)> = BTreeMap::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        scrub(&mut body);
        let chain_name = |b: &Value, key: &str| b[key].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "metainfo" => {}
            "chain" => {
                let hooked = body.get("hook").is_some();
                let entry = chains.entry(chain_name(&body, "name")).or_default();
                entry.0 = Some(format!(
                    "chain {body}{}",
                    if hooked { " (base)" } else { "" }
                ));
            }
            "rule" => chains
                .entry(chain_name(&body, "chain"))
                .or_default()
                .1
                .push(body.to_string()),
            _ => lines.push(format!("{kind} {body}")),
        }
    }
    for (name, (chain, rules)) in chains {
        let chain = chain.unwrap_or_else(|| format!("rules of unlisted chain {name}"));
        if skip_empty_chains && rules.is_empty() && !chain.ends_with(" (base)") {
            continue;
        }
        lines.push(chain);
        lines.extend(rules.into_iter().map(|r| format!("  {name}: {r}")));
    }
    lines.sort();
    lines
}

/// The lines of `iptables-nft-save` that `keep` selects, each prefixed by
/// its table, chain counters dropped; in the order listed.
pub fn iptables_lines(node: &Netns, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let save = node.sh("iptables-nft-save");
    let mut table = "";
    let mut lines = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if !line.starts_with('#') && keep(line) {
            let line = match line.rsplit_once(" [") {
                Some((head, _)) if line.starts_with(':') => head,
                _ => line,
            };
            lines.push(format!("{table} {line}"));
        }
    }
    lines
}

/// Lines of `want` missing from `got` and the reverse, for a failure message.
pub fn diff(want: &[String], got: &[String]) -> String {
    let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
    format!(
        "{} lines vs {}; missing: {missing:#?}\nextra: {extra:#?}",
        want.len(),
        got.len()
    )
}
