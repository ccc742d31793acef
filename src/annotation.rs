//! The podnat annotation: JSON text → validated port mappings, or an error that
//! names the entry and the field so the pod's Warning event tells the user what
//! to fix. Unknown keys are ignored (forward compatibility with the Go version).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::model::{Families, Family, PortMapping, Proto};

/// Why an annotation was rejected. Display gives the user-facing message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("expected a JSON object with a list \"entries\", got {0}")]
    NotAnObject(&'static str),
    #[error("entries: missing (expected {{\"entries\":[...]}})")]
    MissingEntries,
    #[error("entries: expected a list, got {0}")]
    EntriesNotAList(&'static str),
    #[error("entries[{index}]: expected an object, got {got}")]
    EntryNotAnObject { index: usize, got: &'static str },
    #[error("entries[{index}].{field}: {problem}")]
    Field {
        index: usize,
        field: &'static str,
        problem: String,
    },
    #[error("entries[{index}].srcPort: {port}/{proto} is already used by entries[{first}]")]
    Duplicate {
        index: usize,
        first: usize,
        port: u16,
        proto: Proto,
    },
}

impl AnnotationError {
    /// The entry it names, if it names one.
    pub fn entry(&self) -> Option<usize> {
        match self {
            AnnotationError::EntryNotAnObject { index, .. }
            | AnnotationError::Field { index, .. }
            | AnnotationError::Duplicate { index, .. } => Some(*index),
            _ => None,
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A valid annotation: the mappings of its entries, and the entries
/// rejected alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// In annotation order (an entry's families IPv4 first).
    pub mappings: Vec<PortMapping>,
    /// Entries rejected alone, by the first error of each, in annotation
    /// order: those that use a field the Go version does not know
    /// (`sourceRanges`, `srcPortEnd`) and are bad, clash with another entry
    /// (the entries without those fields are checked first, so a clash
    /// always rejects the entry that uses one), or carry `sourceRanges`
    /// where the flavor does not enforce them. The pod's other entries are
    /// published; an error in an entry without those fields (or a clash
    /// between two such entries) rejects the whole annotation, as it
    /// always has.
    pub rejected: Vec<AnnotationError>,
}

/// Parses and validates an annotation value, every entry valid: an error
/// in any entry rejects it (an entry without the new fields first, as
/// [`parse_entries`] checks them). `restricted` ports may be neither
/// source nor destination of any entry. An auto entry becomes one mapping
/// per enabled family (IPv4 first); an entry with `srcIP` one of that
/// address's family, which must be enabled.
pub fn parse(
    text: &str,
    restricted: &BTreeSet<u16>,
    families: Families,
) -> Result<Vec<PortMapping>, AnnotationError> {
    let parsed = parse_entries(text, restricted, families, true)?;
    match parsed.rejected.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(parsed.mappings),
    }
}

/// Fields the Go version does not know: an entry using one is rejected
/// alone.
const NEW_FIELDS: [&str; 2] = ["sourceRanges", "srcPortEnd"];

/// `parse`, rejecting alone the entries that use a new field; see
/// [`Parsed::rejected`]. `enforced`: the flavor enforces `sourceRanges`.
pub fn parse_entries(
    text: &str,
    restricted: &BTreeSet<u16>,
    families: Families,
    enforced: bool,
) -> Result<Parsed, AnnotationError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| AnnotationError::Json(e.to_string()))?;
    let obj = match &doc {
        Value::Object(o) => o,
        other => return Err(AnnotationError::NotAnObject(kind(other))),
    };
    let entries = match obj.get("entries") {
        None | Some(Value::Null) => return Err(AnnotationError::MissingEntries),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(AnnotationError::EntriesNotAList(kind(other))),
    };
    let mut objects = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        match entry {
            Value::Object(o) => objects.push(o),
            other => {
                return Err(AnnotationError::EntryNotAnObject {
                    index,
                    got: kind(other),
                })
            }
        }
    }
    // A field given as null is no field, as the parsers read it.
    let uses_new = |o: &Map<String, Value>| {
        NEW_FIELDS
            .iter()
            .any(|f| o.get(*f).is_some_and(|v| !v.is_null()))
    };
    let mut out = Parsed {
        mappings: Vec::with_capacity(entries.len()),
        rejected: Vec::new(),
    };
    let mut published = Published::default();
    // The Go version's entries first: a clash with one rejects the entry
    // that uses a new field, whatever the order.
    let (plain, new): (Vec<usize>, Vec<usize>) =
        (0..objects.len()).partition(|&i| !uses_new(objects[i]));
    for (index, alone) in plain
        .into_iter()
        .map(|i| (i, false))
        .chain(new.into_iter().map(|i| (i, true)))
    {
        match entry_mappings(
            index,
            objects[index],
            restricted,
            families,
            &published,
            enforced,
        ) {
            Ok(mappings) => {
                for m in &mappings {
                    published.insert(m);
                }
                out.mappings.extend(mappings);
            }
            Err(e) if alone => out.rejected.push(e),
            Err(e) => return Err(e),
        }
    }
    // Stable: an entry's families stay IPv4 first.
    out.mappings.sort_by_key(|m| m.entry);
    out.rejected.sort_by_key(AnnotationError::entry);
    Ok(out)
}

/// The mappings of entry `index`, checked against the entries published
/// before it.
fn entry_mappings(
    index: usize,
    fields: &Map<String, Value>,
    restricted: &BTreeSet<u16>,
    families: Families,
    published: &Published,
    enforced: bool,
) -> Result<Vec<PortMapping>, AnnotationError> {
    let mapping = parse_entry(index, fields, restricted, families)?;
    let sources = parse_sources(index, fields.get("sourceRanges"))?;
    let serves: Vec<Family> = match mapping.src_ip {
        Some(ip) => vec![Family::of(ip)],
        None => families.iter().collect(),
    };
    // An entry with ranges is published only on the families it names a
    // range of: the others would otherwise be open to every source.
    // `None`: not published on `family`; `Some(None)`: every source (no
    // field, or a /0 of that family, which is no restriction at all).
    let of_family = |family: Family| -> Option<Option<Arc<[ipnet::IpNet]>>> {
        let Some(nets) = sources.as_ref() else {
            return Some(None);
        };
        let mine: Vec<ipnet::IpNet> = nets
            .iter()
            .filter(|n| Family::of(n.addr()) == family)
            .copied()
            .collect();
        match mine.as_slice() {
            [] => None,
            [all] if all.prefix_len() == 0 => Some(None),
            _ => Some(Some(mine.into())),
        }
    };
    let serves: Vec<Family> = serves
        .into_iter()
        .filter(|f| of_family(*f).is_some())
        .collect();
    if serves.is_empty() {
        return Err(field_err(
            index,
            "sourceRanges",
            match mapping.src_ip {
                Some(ip) => format!("no range of {}'s family: no source could reach the port", ip),
                None => format!(
                    "no range of an enabled family (ipfamilies={families}): no source could reach the port"
                ),
            },
        ));
    }
    // The families' keys differ: each is checked against the entries
    // before, none against another family of this entry.
    let mut out = Vec::with_capacity(serves.len());
    for family in serves {
        let m = PortMapping {
            family,
            sources: of_family(family).flatten(),
            ..mapping.clone()
        };
        published.check(index, &m)?;
        out.push(m);
    }
    if !enforced && out.iter().any(|m| m.sources.is_some()) {
        return Err(field_err(
            index,
            "sourceRanges",
            "not enforced here (the nftables flavor needs Linux 5.6 or later for them; the iptables flavor has no such limit); the entry is not published rather than published to every source",
        ));
    }
    Ok(out)
}

/// What the entries before published, per protocol and family: public
/// ports (no two entries overlap) and pod ports (a range's may not overlap
/// another entry's; two single entries onto one pod port stay allowed, as
/// in the Go version).
#[derive(Default)]
struct Published {
    /// First public port → (last, entry); the public address is not part
    /// of the key, as in the Go version: one pod never publishes a port
    /// twice on one family.
    public: BTreeMap<(Proto, Family, u16), (u16, usize)>,
    pod_ranges: BTreeMap<(Proto, Family, u16), (u16, usize)>,
    pod_singles: BTreeMap<(Proto, Family, u16), usize>,
}

impl Published {
    fn check(&self, index: usize, m: &PortMapping) -> Result<(), AnnotationError> {
        let (lo, hi) = (m.src_port, m.src_end());
        let before = self.public.range(..=(m.proto, m.family, hi)).next_back();
        if let Some((&(proto, f, first_lo), &(first_hi, first))) = before {
            if proto == m.proto && f == m.family && first_hi >= lo {
                if m.span == 0 && first_lo == first_hi {
                    return Err(AnnotationError::Duplicate {
                        index,
                        first,
                        port: lo,
                        proto: m.proto,
                    });
                }
                let field = if m.span > 0 { "srcPortEnd" } else { "srcPort" };
                let problem = format!(
                    "{} overlaps entries[{first}] ({})",
                    span_text(lo, hi, m.proto),
                    span_text(first_lo, first_hi, m.proto)
                );
                return Err(field_err(index, field, problem));
            }
        }
        let (lo, hi) = (m.dst_port, m.dst_end());
        let clash = |first: usize, text: String| {
            let problem = format!(
                "pod ports {} overlap entries[{first}]'s ({text}); a range's pod ports are its own",
                span_text(lo, hi, m.proto)
            );
            Err(field_err(index, "dstPort", problem))
        };
        let key = |port| (m.proto, m.family, port);
        if let Some((&(p, f, a), &(b, first))) = self.pod_ranges.range(..=key(hi)).next_back() {
            if p == m.proto && f == m.family && b >= lo {
                return clash(first, span_text(a, b, p));
            }
        }
        if m.span > 0 {
            if let Some((&(_, _, port), &first)) = self.pod_singles.range(key(lo)..=key(hi)).next()
            {
                return clash(first, span_text(port, port, m.proto));
            }
        }
        Ok(())
    }

    fn insert(&mut self, m: &PortMapping) {
        let key = |port| (m.proto, m.family, port);
        self.public.insert(key(m.src_port), (m.src_end(), m.entry));
        if m.span == 0 {
            // The first entry onto a pod port is the one a clash names.
            self.pod_singles.entry(key(m.dst_port)).or_insert(m.entry);
        } else {
            self.pod_ranges
                .insert(key(m.dst_port), (m.dst_end(), m.entry));
        }
    }
}

/// `lo-hi/proto`, or `lo/proto` for one port.
fn span_text(lo: u16, hi: u16, proto: Proto) -> String {
    if lo == hi {
        format!("{lo}/{proto}")
    } else {
        format!("{lo}-{hi}/{proto}")
    }
}

/// `parse_entries` with the planner's settings.
pub fn parse_for(text: &str, cfg: &crate::plan::PlanConfig) -> Result<Parsed, AnnotationError> {
    parse_entries(text, &cfg.restricted_ports, cfg.families, cfg.source_ranges)
}

fn field_err(index: usize, field: &'static str, problem: impl Into<String>) -> AnnotationError {
    AnnotationError::Field {
        index,
        field,
        problem: problem.into(),
    }
}

/// Most ports one entry may publish (`srcPortEnd - srcPort + 1`).
pub const MAX_RANGE_PORTS: u16 = 1000;

/// Most `sourceRanges` one entry may list.
pub const MAX_SOURCE_RANGES: usize = 256;

/// `sourceRanges`: CIDRs of either family, network addresses only (no host
/// bits), at most [`MAX_SOURCE_RANGES`], aggregated. `None`: the field is
/// absent (every source).
fn parse_sources(
    index: usize,
    value: Option<&Value>,
) -> Result<Option<Vec<ipnet::IpNet>>, AnnotationError> {
    const FIELD: &str = "sourceRanges";
    let list = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(field_err(
                index,
                FIELD,
                format!("expected a list of CIDRs, got {}", kind(other)),
            ))
        }
    };
    if list.is_empty() {
        return Err(field_err(
            index,
            FIELD,
            "empty: no source could reach the port; leave the field out to allow every source",
        ));
    }
    if list.len() > MAX_SOURCE_RANGES {
        return Err(field_err(
            index,
            FIELD,
            format!("{} ranges, at most {MAX_SOURCE_RANGES}", list.len()),
        ));
    }
    let mut nets = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let Value::String(text) = v else {
            return Err(field_err(
                index,
                FIELD,
                format!("[{i}]: expected a CIDR as a string, got {}", kind(v)),
            ));
        };
        let net: ipnet::IpNet = match (text.trim().parse(), text.trim().parse::<IpAddr>()) {
            (Ok(n), _) => n,
            (Err(_), Ok(ip)) => {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                return Err(field_err(
                    index,
                    FIELD,
                    format!(
                        "[{i}]: {text:?} has no prefix length; write {ip}/{len} for one address"
                    ),
                ));
            }
            (Err(_), Err(_)) => {
                return Err(field_err(
                    index,
                    FIELD,
                    format!("[{i}]: {text:?} is not a CIDR (address/prefix length)"),
                ))
            }
        };
        if net.trunc() != net {
            return Err(field_err(
                index,
                FIELD,
                format!(
                    "[{i}]: {net} has host bits set; the network is {}",
                    net.trunc()
                ),
            ));
        }
        if let IpAddr::V6(v6) = net.addr() {
            if v6.to_ipv4_mapped().is_some() && net.prefix_len() >= 96 {
                return Err(field_err(
                    index,
                    FIELD,
                    format!("[{i}]: {net} is IPv4-mapped IPv6; write the IPv4 range itself"),
                ));
            }
        }
        nets.push(net);
    }
    Ok(Some(ipnet::IpNet::aggregate(&nets)))
}

fn parse_entry(
    index: usize,
    fields: &Map<String, Value>,
    restricted: &BTreeSet<u16>,
    families: Families,
) -> Result<PortMapping, AnnotationError> {
    let iface_auto = match fields.get("ifaceAuto") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(field_err(
                index,
                "ifaceAuto",
                format!("expected true or false, got {}", kind(other)),
            ))
        }
    };
    let src_ip = match fields.get("srcIP") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(parse_ip(index, s, families)?),
        Some(other) => {
            return Err(field_err(
                index,
                "srcIP",
                format!("expected an IP address as a string, got {}", kind(other)),
            ))
        }
    };
    let src_ip = match (iface_auto, src_ip) {
        (Some(true), Some(_)) => {
            return Err(field_err(
                index,
                "srcIP",
                "set together with ifaceAuto:true; drop ifaceAuto or set it to false",
            ))
        }
        (Some(false), None) => {
            return Err(field_err(
                index,
                "srcIP",
                "missing; ifaceAuto:false needs the public address in srcIP",
            ))
        }
        (_, ip) => ip,
    };
    let src_port = parse_port(index, "srcPort", fields.get("srcPort"), restricted)?;
    let dst_port = parse_port(index, "dstPort", fields.get("dstPort"), restricted)?;
    let span = parse_span(index, fields, src_port, dst_port, restricted)?;
    let proto = match fields.get("proto") {
        None | Some(Value::Null) => Proto::Tcp,
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => {
                return Err(field_err(
                    index,
                    "proto",
                    format!("unknown protocol {s:?}; use \"tcp\" or \"udp\""),
                ))
            }
        },
        Some(other) => {
            return Err(field_err(
                index,
                "proto",
                format!("expected \"tcp\" or \"udp\", got {}", kind(other)),
            ))
        }
    };
    Ok(PortMapping {
        src_ip,
        src_port,
        dst_port,
        proto,
        family: src_ip.map_or(Family::Ipv4, Family::of),
        entry: index,
        sources: None,
        span,
    })
}

/// `srcPortEnd` (inclusive) as the number of ports after `srcPort`: at
/// most [`MAX_RANGE_PORTS`] in all, the pod's ports (`dstPort` on, one
/// offset) within 65535, no restricted port on either side.
fn parse_span(
    index: usize,
    fields: &Map<String, Value>,
    src_port: u16,
    dst_port: u16,
    restricted: &BTreeSet<u16>,
) -> Result<u16, AnnotationError> {
    const FIELD: &str = "srcPortEnd";
    let value = fields.get(FIELD);
    if value.is_none_or(Value::is_null) {
        return Ok(0);
    }
    let end = parse_port(index, FIELD, value, &BTreeSet::new())?;
    let bad = |problem: String| Err(field_err(index, FIELD, problem));
    if end < src_port {
        return bad(format!("{end} is below srcPort {src_port}"));
    }
    let span = end - src_port;
    if span >= MAX_RANGE_PORTS {
        return bad(format!(
            "{src_port}-{end} is {} ports; an entry publishes at most {MAX_RANGE_PORTS}",
            u32::from(span) + 1
        ));
    }
    let Some(dst_end) = dst_port.checked_add(span) else {
        return bad(format!(
            "{src_port}-{end} maps to pod ports {dst_port}-{} past 65535",
            u32::from(dst_port) + u32::from(span)
        ));
    };
    let touched = |lo: u16, hi: u16| restricted.range(lo..=hi).next().copied();
    if let Some(p) = touched(src_port, end) {
        return bad(format!(
            "{src_port}-{end} includes port {p}, restricted on this node (restrictedports)"
        ));
    }
    if let Some(p) = touched(dst_port, dst_end) {
        return bad(format!(
            "pod ports {dst_port}-{dst_end} include port {p}, restricted on this node (restrictedports)"
        ));
    }
    Ok(span)
}

/// A public address in `srcIP`: one a node can publish on, of an enabled
/// family.
fn parse_ip(index: usize, s: &str, families: Families) -> Result<IpAddr, AnnotationError> {
    let bad = |problem: String| Err(field_err(index, "srcIP", problem));
    let text = s.trim();
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if text.contains('%') => {
            return bad(format!(
                "{s:?} carries a zone id; a public address is global, give it without %zone"
            ))
        }
        Err(_) if text.contains(':') => return bad(format!("{s:?} is not a valid IPv6 address")),
        Err(_) => return bad(format!("{s:?} is not a valid IPv4 address")),
    };
    let family = Family::of(ip);
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            return bad(format!("{ip} cannot be a public address of a node"))
        }
        IpAddr::V4(v4) if v4.is_loopback() => {
            return bad(format!(
                "{ip} is loopback (127.0.0.0/8); it cannot be a public address of a node"
            ))
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            return bad(format!(
                "{s:?} is an IPv4-mapped IPv6 address; write the IPv4 address itself"
            ))
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            return bad(format!(
                "{ip} is link-local (fe80::/10); it cannot be a public address"
            ))
        }
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() => {
            return bad(format!("{ip} cannot be a public address of a node"))
        }
        _ => {}
    }
    if !families.contains(family) {
        return bad(format!(
            "{ip} is an {} address, and {family} is not enabled on this node (ipfamilies={families})",
            if family == Family::Ipv4 { "IPv4" } else { "IPv6" }
        ));
    }
    Ok(ip)
}

fn parse_port(
    index: usize,
    field: &'static str,
    value: Option<&Value>,
    restricted: &BTreeSet<u16>,
) -> Result<u16, AnnotationError> {
    let n = match value {
        None | Some(Value::Null) => {
            return Err(field_err(index, field, "missing (required, 1-65535)"))
        }
        Some(Value::Number(n)) => n,
        Some(other) => {
            return Err(field_err(
                index,
                field,
                format!("expected a port number 1-65535, got {}", kind(other)),
            ))
        }
    };
    let port = match (n.as_u64(), n.as_i64()) {
        (Some(p), _) => p,
        (None, Some(neg)) => {
            return Err(field_err(
                index,
                field,
                format!("port {neg} is out of range 1-65535"),
            ))
        }
        (None, None) => {
            return Err(field_err(
                index,
                field,
                format!("port {n} is not a whole number"),
            ))
        }
    };
    if port == 0 {
        return Err(field_err(index, field, "port 0 is reserved"));
    }
    if port > 65535 {
        return Err(field_err(
            index,
            field,
            format!("port {port} is out of range 1-65535"),
        ));
    }
    let port = port as u16;
    if restricted.contains(&port) {
        return Err(field_err(
            index,
            field,
            format!("port {port} is restricted on this node (restrictedports)"),
        ));
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restricted() -> BTreeSet<u16> {
        [22, 53, 6443].into_iter().collect()
    }

    fn err(text: &str) -> String {
        parse(text, &restricted(), Families::default())
            .unwrap_err()
            .to_string()
    }

    /// The error of the one entry of `text` rejected alone; every other
    /// entry is published (a good entry appended to `text` too).
    fn err_alone(text: &str) -> String {
        let with_good = text.replacen(
            "{\"entries\":[",
            "{\"entries\":[{\"srcPort\":8080,\"dstPort\":80},",
            1,
        );
        let p = parse_entries(&with_good, &restricted(), Families::default(), true)
            .unwrap_or_else(|e| panic!("{with_good}: the whole annotation rejected: {e}"));
        assert_eq!(p.rejected.len(), 1, "{with_good}: {:?}", p.rejected);
        let bad = p.rejected[0].entry().expect("names its entry");
        let doc: Value = serde_json::from_str(&with_good).unwrap();
        let all = doc["entries"].as_array().unwrap().len();
        let published: BTreeSet<usize> = p.mappings.iter().map(|m| m.entry).collect();
        let others: BTreeSet<usize> = (0..all).filter(|&i| i != bad).collect();
        assert_eq!(published, others, "{with_good}: the good entries published");
        // Named as in `text` (the good entry shifted the indexes by one).
        let e = p.rejected[0].to_string();
        let shifted = |i: usize| format!("entries[{i}]");
        (1..=all)
            .fold(e, |e, i| {
                e.replace(&shifted(i), &format!("entries[#{}]", i - 1))
            })
            .replace("entries[#", "entries[")
    }

    #[test]
    fn spec_example_mail_server() {
        let m = parse(
            r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":143,"dstPort":143},{"srcPort":587,"dstPort":587}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        let expect: Vec<PortMapping> = [25, 143, 587]
            .iter()
            .enumerate()
            .map(|(i, &p)| PortMapping {
                src_ip: None,
                src_port: p,
                dst_port: p,
                proto: Proto::Tcp,
                family: Family::Ipv4,
                entry: i,
                sources: None,
                span: 0,
            })
            .collect();
        assert_eq!(m, expect);
    }

    #[test]
    fn a_port_range_is_one_entry_with_its_span() {
        let m = parse(
            r#"{"entries":[{"srcPort":10000,"srcPortEnd":10099,"dstPort":20000,"proto":"udp"},{"srcPort":80,"srcPortEnd":80,"dstPort":8080}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        assert_eq!(
            (m[0].src_port, m[0].src_end(), m[0].dst_end()),
            (10000, 10099, 20099)
        );
        assert_eq!(m[0].span, 99);
        assert_eq!(m[1].span, 0, "srcPortEnd = srcPort is one port");
        // null is absent, as for every other field; other unknown keys are
        // still ignored (the Go version's forward compatibility).
        let m = parse(
            r#"{"entries":[{"srcPort":80,"dstPort":80,"sourceRanges":null,"srcPortEnd":null,"note":"x"}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        assert_eq!((m.len(), m[0].span), (1, 0));
        assert_eq!(m[0].sources, None);
    }

    #[test]
    fn a_bad_port_range_is_rejected_by_name() {
        let cases = [
            (
                r#"{"entries":[{"srcPort":10000,"srcPortEnd":9999,"dstPort":20000}]}"#,
                "entries[0].srcPortEnd: 9999 is below srcPort 10000",
            ),
            (
                r#"{"entries":[{"srcPort":10000,"srcPortEnd":11000,"dstPort":20000}]}"#,
                "entries[0].srcPortEnd: 10000-11000 is 1001 ports; an entry publishes at most 1000",
            ),
            (
                r#"{"entries":[{"srcPort":1000,"srcPortEnd":1100,"dstPort":65500}]}"#,
                "entries[0].srcPortEnd: 1000-1100 maps to pod ports 65500-65600 past 65535",
            ),
            (
                r#"{"entries":[{"srcPort":1,"srcPortEnd":100,"dstPort":1000}]}"#,
                "entries[0].srcPortEnd: 1-100 includes port 22, restricted on this node (restrictedports)",
            ),
            (
                r#"{"entries":[{"srcPort":1000,"srcPortEnd":1100,"dstPort":1}]}"#,
                "entries[0].srcPortEnd: pod ports 1-101 include port 22, restricted on this node (restrictedports)",
            ),
            (
                r#"{"entries":[{"srcPort":1000,"srcPortEnd":70000,"dstPort":1}]}"#,
                "entries[0].srcPortEnd: port 70000 is out of range 1-65535",
            ),
            (
                r#"{"entries":[{"srcPort":1000,"srcPortEnd":"1100","dstPort":2000}]}"#,
                "entries[0].srcPortEnd: expected a port number 1-65535, got a string",
            ),
            (
                r#"{"entries":[{"srcPort":10050,"dstPort":80,"proto":"udp"},{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000,"proto":"udp"}]}"#,
                "entries[1].srcPortEnd: 10000-10100/udp overlaps entries[0] (10050/udp)",
            ),
            (
                r#"{"entries":[{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000,"proto":"udp"},{"srcPort":10100,"dstPort":80,"proto":"udp"}]}"#,
                "entries[0].srcPortEnd: 10000-10100/udp overlaps entries[1] (10100/udp)",
            ),
            (
                r#"{"entries":[{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000,"proto":"udp"},{"srcPort":30000,"srcPortEnd":30010,"dstPort":20100,"proto":"udp"}]}"#,
                "entries[1].dstPort: pod ports 20100-20110/udp overlap entries[0]'s (20000-20100/udp); a range's pod ports are its own",
            ),
            (
                r#"{"entries":[{"srcPort":80,"dstPort":20005,"proto":"udp"},{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000,"proto":"udp"}]}"#,
                "entries[1].dstPort: pod ports 20000-20100/udp overlap entries[0]'s (20005/udp); a range's pod ports are its own",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "{text}");
            assert_eq!(err_alone(text), want, "{text}");
        }
        // Another protocol, or the same ports on another family, is another
        // range; two single entries onto one pod port stay allowed.
        let ok = [
            r#"{"entries":[{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000,"proto":"udp"},{"srcPort":10000,"srcPortEnd":10100,"dstPort":20000}]}"#,
            r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":2525,"dstPort":25}]}"#,
            r#"{"entries":[{"srcPort":10000,"srcPortEnd":10010,"dstPort":20000},{"srcPort":10011,"srcPortEnd":10020,"dstPort":20011}]}"#,
        ];
        for text in ok {
            assert!(
                parse(text, &restricted(), Families::default()).is_ok(),
                "{text}"
            );
        }
    }

    fn ranges(text: &str, families: Families) -> Vec<(Family, Option<Vec<String>>)> {
        parse(text, &restricted(), families)
            .unwrap()
            .into_iter()
            .map(|m| {
                let s = m.sources.map(|s| s.iter().map(|n| n.to_string()).collect());
                (m.family, s)
            })
            .collect()
    }

    #[test]
    fn source_ranges_go_to_their_own_family_aggregated() {
        let dual = Families::DUAL;
        let text = r#"{"entries":[{"srcPort":993,"dstPort":993,"sourceRanges":["198.51.100.0/25","198.51.100.128/25","10.0.0.0/8","10.1.0.0/16","2001:db8:1::/48"]}]}"#;
        assert_eq!(
            ranges(text, dual),
            vec![
                (
                    Family::Ipv4,
                    Some(vec!["10.0.0.0/8".into(), "198.51.100.0/24".into()])
                ),
                (Family::Ipv6, Some(vec!["2001:db8:1::/48".into()])),
            ]
        );
        // A family without a range of its own is not published: it would
        // be open to every source.
        let v4_only =
            r#"{"entries":[{"srcPort":993,"dstPort":993,"sourceRanges":["198.51.100.0/24"]}]}"#;
        assert_eq!(
            ranges(v4_only, dual),
            vec![(Family::Ipv4, Some(vec!["198.51.100.0/24".into()]))]
        );
        // Without the field: every source, on every family.
        let open = r#"{"entries":[{"srcPort":993,"dstPort":993}]}"#;
        assert_eq!(
            ranges(open, dual),
            vec![(Family::Ipv4, None), (Family::Ipv6, None)]
        );
        // A /0 is no restriction: that family is open (and in the iptables
        // flavor, `-s 0.0.0.0/0` is no match at all), the other as listed.
        let all_v4 = r#"{"entries":[{"srcPort":993,"dstPort":993,"sourceRanges":["0.0.0.0/0","10.0.0.0/8","2001:db8:1::/48"]}]}"#;
        assert_eq!(
            ranges(all_v4, dual),
            vec![
                (Family::Ipv4, None),
                (Family::Ipv6, Some(vec!["2001:db8:1::/48".into()]))
            ]
        );
    }

    #[test]
    fn bad_source_ranges_are_rejected_by_name() {
        let entry = |ranges: &str| {
            err(&format!(
                r#"{{"entries":[{{"srcPort":80,"dstPort":80}},{{"srcPort":993,"dstPort":993,"sourceRanges":{ranges}}}]}}"#
            ))
        };
        let cases = [
            ("[]", "entries[1].sourceRanges: empty"),
            ("\"10.0.0.0/8\"", "entries[1].sourceRanges: expected a list of CIDRs, got a string"),
            ("[8]", "entries[1].sourceRanges: [0]: expected a CIDR as a string, got a number"),
            ("[\"10.0.0.0/8\",\"ten\"]", "entries[1].sourceRanges: [1]: \"ten\" is not a CIDR"),
            ("[\"10.0.0.0/33\"]", "entries[1].sourceRanges: [0]: \"10.0.0.0/33\" is not a CIDR"),
            ("[\"10.0.0.1/8\"]", "entries[1].sourceRanges: [0]: 10.0.0.1/8 has host bits set; the network is 10.0.0.0/8"),
            ("[\"198.51.100.7\"]", "entries[1].sourceRanges: [0]: \"198.51.100.7\" has no prefix length; write 198.51.100.7/32"),
            ("[\"::ffff:10.0.0.0/104\"]", "entries[1].sourceRanges: [0]: ::ffff:10.0.0.0/104 is IPv4-mapped"),
            // IPv6 ranges only, on an IPv4-only node.
            ("[\"2001:db8::/32\"]", "entries[1].sourceRanges: no range of an enabled family"),
        ];
        for (ranges, want) in cases {
            let e = entry(ranges);
            assert!(e.starts_with(want), "{ranges}: {e}");
            let alone = err_alone(&format!(
                r#"{{"entries":[{{"srcPort":80,"dstPort":80}},{{"srcPort":993,"dstPort":993,"sourceRanges":{ranges}}}]}}"#
            ));
            assert_eq!(alone, e, "{ranges}");
        }
        let many: Vec<String> = (0..=MAX_SOURCE_RANGES)
            .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
            .collect();
        let e = entry(&format!("[{}]", many.join(",")));
        assert!(
            e.starts_with("entries[1].sourceRanges: 257 ranges, at most 256"),
            "{e}"
        );
        // An explicit address of the other family than every range.
        let e = err(
            r#"{"entries":[{"srcIP":"203.0.113.7","srcPort":993,"dstPort":993,"sourceRanges":["2001:db8::/32"]}]}"#,
        );
        assert!(
            e.starts_with("entries[0].sourceRanges: no range of 203.0.113.7's family"),
            "{e}"
        );
    }

    #[test]
    fn only_errors_of_the_go_versions_fields_reject_the_whole_annotation() {
        // A bad dstPort beside a good range: the whole annotation, as before.
        let text = r#"{"entries":[{"srcPort":10000,"srcPortEnd":10010,"dstPort":20000},{"srcPort":25,"dstPort":0}]}"#;
        assert_eq!(
            parse_entries(text, &restricted(), Families::default(), true)
                .unwrap_err()
                .to_string(),
            "entries[1].dstPort: port 0 is reserved"
        );
        // A plain entry clashing with a range, in either order: the range
        // is rejected alone, the Go version's entry stays published; two
        // plain duplicates still reject the annotation.
        for (text, range_at) in [
            (
                r#"{"entries":[{"srcPort":10000,"srcPortEnd":10010,"dstPort":20000},{"srcPort":10005,"dstPort":80},{"srcPort":25,"dstPort":25}]}"#,
                0,
            ),
            (
                r#"{"entries":[{"srcPort":10005,"dstPort":80},{"srcPort":25,"dstPort":25},{"srcPort":10000,"srcPortEnd":10010,"dstPort":20000}]}"#,
                2,
            ),
        ] {
            let p = parse_entries(text, &restricted(), Families::default(), true).unwrap();
            let published: Vec<(u16, u16)> =
                p.mappings.iter().map(|m| (m.src_port, m.span)).collect();
            assert_eq!(published, [(10005, 0), (25, 0)], "{text}");
            let plain = if range_at == 0 { 1 } else { 0 };
            assert_eq!(
                p.rejected[0].to_string(),
                format!("entries[{range_at}].srcPortEnd: 10000-10010/tcp overlaps entries[{plain}] (10005/tcp)")
            );
        }
        // A null new field is no new field: the entry's bad dstPort rejects
        // the annotation.
        assert!(parse_entries(
            r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":26,"dstPort":0,"srcPortEnd":null}]}"#,
            &restricted(),
            Families::default(),
            true
        )
        .is_err());
        // An entry whose sourceRanges are not enforced publishes nothing:
        // a later entry on its ports is no overlap.
        let p = parse_entries(
            r#"{"entries":[{"srcPort":10000,"srcPortEnd":10010,"dstPort":20000,"sourceRanges":["198.51.100.0/24"]},{"srcPort":10005,"srcPortEnd":10006,"dstPort":80}]}"#,
            &restricted(),
            Families::default(),
            false,
        )
        .unwrap();
        let published: Vec<(u16, u16)> = p.mappings.iter().map(|m| (m.src_port, m.span)).collect();
        assert_eq!(published, [(10005, 1)]);
        assert!(p.rejected[0]
            .to_string()
            .starts_with("entries[0].sourceRanges: not enforced here"));
        assert!(parse_entries(
            r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcPort":25,"dstPort":26}]}"#,
            &restricted(),
            Families::default(),
            true
        )
        .is_err());
        // A range rejected alone publishes nothing: a later entry on its
        // ports is no overlap.
        let text = r#"{"entries":[{"srcPort":10000,"srcPortEnd":20000,"dstPort":20000},{"srcPort":10005,"dstPort":80}]}"#;
        let p = parse_entries(text, &restricted(), Families::default(), true).unwrap();
        let published: Vec<u16> = p.mappings.iter().map(|m| m.src_port).collect();
        assert_eq!(published, [10005]);
        assert_eq!(p.rejected.len(), 1);
        // `parse` (every entry valid) rejects the annotation with it.
        assert!(parse(text, &restricted(), Families::default())
            .unwrap_err()
            .to_string()
            .starts_with("entries[0].srcPortEnd: 10000-20000 is 10001 ports"));
    }

    #[test]
    fn a_flavor_that_does_not_enforce_source_ranges_refuses_them() {
        let mut cfg = crate::plan::PlanConfig {
            node_id: "n".into(),
            restricted_ports: restricted(),
            families: Families::default(),
            local_access: true,
            source_ranges: false,
        };
        let text = r#"{"entries":[{"srcPort":80,"dstPort":80},{"srcPort":993,"dstPort":993,"sourceRanges":["198.51.100.0/24"]}]}"#;
        // The restricted entry alone: port 80 is published.
        let p = parse_for(text, &cfg).unwrap();
        assert_eq!(p.mappings.len(), 1);
        assert_eq!(p.mappings[0].src_port, 80);
        let e: Vec<String> = p.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "entries[1].sourceRanges: not enforced here (the nftables flavor needs Linux 5.6"
            ),
            "{e:?}"
        );
        cfg.source_ranges = true;
        let p = parse_for(text, &cfg).unwrap();
        assert_eq!((p.mappings.len(), p.rejected.len()), (2, 0));
    }

    #[test]
    fn spec_example_manual_address() {
        let m = parse(
            r#"{"entries":[{"ifaceAuto":false,"srcIP":"192.168.2.94","srcPort":25,"dstPort":25}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        assert_eq!(
            m,
            vec![PortMapping {
                src_ip: Some(IpAddr::from([192, 168, 2, 94])),
                src_port: 25,
                dst_port: 25,
                proto: Proto::Tcp,
                family: Family::Ipv4,
                entry: 0,
                sources: None,
                span: 0,
            }]
        );
    }

    #[test]
    fn src_ip_implies_manual_and_udp_and_unknown_keys() {
        let m = parse(
            r#"{"x":1,"entries":[{"srcIP":"203.0.113.9","srcPort":5000,"dstPort":50,"proto":"UDP","note":"hi"}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        assert_eq!(m[0].src_ip, Some(IpAddr::from([203, 0, 113, 9])));
        assert_eq!(m[0].proto, Proto::Udp);
        assert_eq!(m[0].dst_port, 50);
    }

    #[test]
    fn same_port_tcp_and_udp_is_fine() {
        let m = parse(
            r#"{"entries":[{"srcPort":500,"dstPort":500},{"srcPort":500,"dstPort":500,"proto":"udp"}]}"#,
            &restricted(),
            Families::default(),
        )
        .unwrap();
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn rejections_name_entry_and_field() {
        assert!(err("{entries:").starts_with("malformed JSON: "));
        assert_eq!(
            err("[]"),
            "expected a JSON object with a list \"entries\", got a list"
        );
        assert_eq!(err("{}"), "entries: missing (expected {\"entries\":[...]})");
        assert_eq!(
            err(r#"{"entries":{}}"#),
            "entries: expected a list, got an object"
        );
        assert_eq!(
            err(r#"{"entries":[1]}"#),
            "entries[0]: expected an object, got a number"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":80,"dstPort":80},{"dstPort":80}]}"#),
            "entries[1].srcPort: missing (required, 1-65535)"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":0,"dstPort":80}]}"#),
            "entries[0].srcPort: port 0 is reserved"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":80,"dstPort":0}]}"#),
            "entries[0].dstPort: port 0 is reserved"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":80,"dstPort":70000}]}"#),
            "entries[0].dstPort: port 70000 is out of range 1-65535"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":-1,"dstPort":80}]}"#),
            "entries[0].srcPort: port -1 is out of range 1-65535"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":8.5,"dstPort":80}]}"#),
            "entries[0].srcPort: port 8.5 is not a whole number"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":"80","dstPort":80}]}"#),
            "entries[0].srcPort: expected a port number 1-65535, got a string"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":80,"dstPort":80,"proto":"sctp"}]}"#),
            "entries[0].proto: unknown protocol \"sctp\"; use \"tcp\" or \"udp\""
        );
        assert_eq!(
            err(r#"{"entries":[{"ifaceAuto":false,"srcPort":80,"dstPort":80}]}"#),
            "entries[0].srcIP: missing; ifaceAuto:false needs the public address in srcIP"
        );
        assert_eq!(
            err(
                r#"{"entries":[{"ifaceAuto":true,"srcIP":"203.0.113.1","srcPort":80,"dstPort":80}]}"#
            ),
            "entries[0].srcIP: set together with ifaceAuto:true; drop ifaceAuto or set it to false"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcIP":"203.0.113.300","srcPort":80,"dstPort":80}]}"#),
            "entries[0].srcIP: \"203.0.113.300\" is not a valid IPv4 address"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcIP":"2001:db8::1","srcPort":80,"dstPort":80}]}"#),
            "entries[0].srcIP: 2001:db8::1 is an IPv6 address, and ipv6 is not enabled on this node (ipfamilies=ipv4)"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":80,"dstPort":80},{"srcPort":80,"dstPort":81}]}"#),
            "entries[1].srcPort: 80/tcp is already used by entries[0]"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":22,"dstPort":2222}]}"#),
            "entries[0].srcPort: port 22 is restricted on this node (restrictedports)"
        );
        assert_eq!(
            err(r#"{"entries":[{"srcPort":5353,"dstPort":53,"proto":"udp"}]}"#),
            "entries[0].dstPort: port 53 is restricted on this node (restrictedports)"
        );
        assert_eq!(
            err(r#"{"entries":[{"ifaceAuto":"yes","srcPort":80,"dstPort":80}]}"#),
            "entries[0].ifaceAuto: expected true or false, got a string"
        );
    }

    fn dual(text: &str) -> Result<Vec<PortMapping>, AnnotationError> {
        parse(text, &restricted(), Families::DUAL)
    }

    #[test]
    fn an_auto_entry_serves_every_enabled_family_and_src_ip_its_own() {
        let m = dual(
            r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcIP":"2001:db8::7","srcPort":587,"dstPort":587}]}"#,
        )
        .unwrap();
        let got: Vec<(usize, Family, Option<IpAddr>)> =
            m.iter().map(|e| (e.entry, e.family, e.src_ip)).collect();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            got,
            vec![
                (0, Family::Ipv4, None),
                (0, Family::Ipv6, None),
                (1, Family::Ipv6, Some(v6))
            ]
        );
        // IPv6 alone: the auto entry is IPv6 only, an IPv4 srcIP is refused.
        let v6only = Families {
            ipv4: false,
            ipv6: true,
        };
        let m = parse(
            r#"{"entries":[{"srcPort":25,"dstPort":25}]}"#,
            &restricted(),
            v6only,
        );
        assert_eq!(m.unwrap()[0].family, Family::Ipv6);
        let e = parse(
            r#"{"entries":[{"srcIP":"203.0.113.9","srcPort":25,"dstPort":25}]}"#,
            &restricted(),
            v6only,
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "entries[0].srcIP: 203.0.113.9 is an IPv4 address, and ipv4 is not enabled on this node (ipfamilies=ipv6)"
        );
    }

    #[test]
    fn duplicates_are_per_family() {
        // The same port on an IPv4 and an IPv6 srcIP: two families, fine.
        assert!(dual(
            r#"{"entries":[{"srcIP":"203.0.113.9","srcPort":25,"dstPort":25},{"srcIP":"2001:db8::9","srcPort":25,"dstPort":25}]}"#
        )
        .is_ok());
        // An auto entry already serves IPv6 port 25.
        assert_eq!(
            dual(
                r#"{"entries":[{"srcPort":25,"dstPort":25},{"srcIP":"2001:db8::9","srcPort":25,"dstPort":26}]}"#
            )
            .unwrap_err()
            .to_string(),
            "entries[1].srcPort: 25/tcp is already used by entries[0]"
        );
    }

    #[test]
    fn loopback_src_ip_is_refused() {
        assert_eq!(
            err(r#"{"entries":[{"srcIP":"127.0.0.1","srcPort":80,"dstPort":80}]}"#),
            "entries[0].srcIP: 127.0.0.1 is loopback (127.0.0.0/8); it cannot be a public address of a node"
        );
    }

    #[test]
    fn bad_ipv6_src_ips_are_named() {
        let e = |ip: &str| {
            dual(&format!(
                r#"{{"entries":[{{"srcIP":"{ip}","srcPort":80,"dstPort":80}}]}}"#
            ))
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            e("::ffff:1.2.3.4"),
            "entries[0].srcIP: \"::ffff:1.2.3.4\" is an IPv4-mapped IPv6 address; write the IPv4 address itself"
        );
        assert_eq!(
            e("fe80::1%eth0"),
            "entries[0].srcIP: \"fe80::1%eth0\" carries a zone id; a public address is global, give it without %zone"
        );
        assert_eq!(
            e("fe80::1"),
            "entries[0].srcIP: fe80::1 is link-local (fe80::/10); it cannot be a public address"
        );
        assert_eq!(
            e("::1"),
            "entries[0].srcIP: ::1 cannot be a public address of a node"
        );
        assert_eq!(
            e("ff02::1"),
            "entries[0].srcIP: ff02::1 cannot be a public address of a node"
        );
        assert_eq!(
            e("2001:db8::zz"),
            "entries[0].srcIP: \"2001:db8::zz\" is not a valid IPv6 address"
        );
    }

    #[test]
    fn restricted_list_comes_from_config() {
        let none = BTreeSet::new();
        assert!(parse(
            r#"{"entries":[{"srcPort":22,"dstPort":22}]}"#,
            &none,
            Families::default()
        )
        .is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".*") {
            let _ = parse(&s, &restricted(), Families::default());
        }

        #[test]
        fn arbitrary_json_shaped_text_never_panics(
            entries in proptest::collection::vec(
                (proptest::option::of(-5i64..70000), proptest::option::of(-5i64..70000),
                 proptest::option::of("[a-zA-Z]{0,4}"), proptest::option::of(proptest::bool::ANY),
                 proptest::option::of("[0-9.:a-f]{0,16}")), 0..5)
        ) {
            let items: Vec<String> = entries.iter().map(|(s, d, p, a, ip)| {
                let mut f = Vec::new();
                if let Some(s) = s { f.push(format!("\"srcPort\":{s}")); }
                if let Some(d) = d { f.push(format!("\"dstPort\":{d}")); }
                if let Some(p) = p { f.push(format!("\"proto\":{p:?}")); }
                if let Some(a) = a { f.push(format!("\"ifaceAuto\":{a}")); }
                if let Some(ip) = ip { f.push(format!("\"srcIP\":{ip:?}")); }
                format!("{{{}}}", f.join(","))
            }).collect();
            let text = format!("{{\"entries\":[{}]}}", items.join(","));
            if let Ok(m) = parse(&text, &restricted(), Families::default()) {
                for e in m {
                    proptest::prop_assert!(e.src_port != 0 && e.dst_port != 0);
                    proptest::prop_assert!(!restricted().contains(&e.src_port));
                }
            }
        }
    }
}
