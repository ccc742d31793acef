//! `-namespaceselector`: a Kubernetes label selector in its string form
//! (`env=prod,tier in (mail,web),!legacy`), parsed here into kube's own
//! `Selector`, which does the matching. Hand-written because kube-core
//! matches selectors but does not parse the string form (it is what
//! `kubectl -l` and the apiserver's `labelSelector` parameter take).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kube::core::{Expression, Selector, SelectorExt};

/// A parsed label selector; the empty one selects every namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSelector {
    text: String,
    selector: Selector,
}

impl NamespaceSelector {
    /// Parses the string form, with the apiserver's rules for keys and
    /// values; the error names the requirement and what is wrong.
    pub fn parse(text: &str) -> Result<NamespaceSelector, String> {
        let mut exprs = Vec::new();
        for req in split_requirements(text)? {
            exprs.push(requirement(&req)?);
        }
        Ok(NamespaceSelector {
            text: text.trim().to_string(),
            selector: Selector::from_iter(exprs),
        })
    }

    pub fn selects_all(&self) -> bool {
        self.text.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

impl fmt::Display for NamespaceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Requirements are separated by commas outside parentheses.
fn split_requirements(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Err(format!("{text:?}: unbalanced ')'")),
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if depth != 0 {
        return Err(format!("{text:?}: unbalanced '('"));
    }
    out.push(cur);
    let reqs: Vec<String> = out.into_iter().map(|r| r.trim().to_string()).collect();
    if reqs.len() == 1 && reqs[0].is_empty() {
        return Ok(Vec::new());
    }
    if let Some(empty) = reqs.iter().position(String::is_empty) {
        return Err(format!(
            "{text:?}: empty requirement at position {}",
            empty + 1
        ));
    }
    Ok(reqs)
}

fn requirement(req: &str) -> Result<Expression, String> {
    let bad = |why: &str| format!("{req:?}: {why}");
    if let Some(key) = req.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key_of(key.trim(), req)?));
    }
    for (op, ctor) in [
        (
            " notin ",
            Expression::NotIn as fn(String, BTreeSet<String>) -> Expression,
        ),
        (" in ", Expression::In),
    ] {
        if let Some((key, set)) = req.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| bad("the values of in/notin go in parentheses"))?;
            let values = inner
                .split(',')
                .map(|v| value_of(v.trim(), req))
                .collect::<Result<BTreeSet<_>, _>>()?;
            return Ok(ctor(key_of(key.trim(), req)?, values));
        }
    }
    for (op, equal) in [("!=", false), ("==", true), ("=", true)] {
        if let Some((key, value)) = req.split_once(op) {
            let (key, value) = (key_of(key.trim(), req)?, value_of(value.trim(), req)?);
            return Ok(if equal {
                Expression::Equal(key, value)
            } else {
                Expression::NotEqual(key, value)
            });
        }
    }
    Ok(Expression::Exists(key_of(req, req)?))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters (alphanumerics, `-`, `_`, `.`; alphanumeric at both
/// ends).
fn key_of(key: &str, req: &str) -> Result<String, String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("{req:?}: {p:?} is not a DNS subdomain prefix"));
        }
    }
    if name.is_empty() || !label_text(name) {
        return Err(format!("{req:?}: {key:?} is not a label key"));
    }
    Ok(key.to_string())
}

fn value_of(value: &str, req: &str) -> Result<String, String> {
    if value.is_empty() || label_text(value) {
        Ok(value.to_string())
    } else {
        Err(format!("{req:?}: {value:?} is not a label value"))
    }
}

fn label_text(s: &str) -> bool {
    let edge = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(edge)
        && s.ends_with(edge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_of_the_string_form() {
        let s = NamespaceSelector::parse(
            "podnat.example.org/publish=yes, tier in (mail, web),env!=dev,!legacy,team,zone notin (a)",
        )
        .unwrap();
        let ok = labels(&[
            ("podnat.example.org/publish", "yes"),
            ("tier", "mail"),
            ("team", "x"),
        ]);
        assert!(s.matches(&ok));
        for (k, v) in [
            ("env", "dev"),
            ("legacy", ""),
            ("zone", "a"),
            ("tier", "db"),
            ("podnat.example.org/publish", "no"),
        ] {
            let mut l = ok.clone();
            l.insert(k.into(), v.into());
            assert!(!s.matches(&l), "{k}={v}");
        }
        let mut l = ok.clone();
        l.remove("team");
        assert!(!s.matches(&l), "team must exist");
        assert!(NamespaceSelector::parse("a==b")
            .unwrap()
            .matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn empty_selects_all_and_bad_input_is_named() {
        let all = NamespaceSelector::parse("  ").unwrap();
        assert!(all.selects_all() && all.matches(&BTreeMap::new()));
        for (bad, why) in [
            ("a=b,", "empty requirement"),
            ("tier in mail", "parentheses"),
            ("tier in (mail", "unbalanced"),
            ("-a=b", "not a label key"),
            ("a=b c", "not a label value"),
            ("Bad_Prefix/x=y", "DNS subdomain"),
        ] {
            let e = NamespaceSelector::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
