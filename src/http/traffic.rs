//! Per-mapping traffic for `/metrics` and `/entries/list`: the kernel's
//! counters read at request time (one dump per family, off the runtime),
//! joined with the last applied table for each key's owner, written as
//! Prometheus text straight into the response (no allocation per mapping
//! beyond the output).

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::firewall::Traffic;
use crate::firewall::TrafficSource;
use crate::http::HttpContext;
use crate::model::Mapping;

/// The counters now, if this agent counts (`None`: no source, a dry run,
/// nothing counted yet, or the read failed — logged). The status's table
/// says how many keys to expect (a dump that came short is read again).
pub async fn read(ctx: &HttpContext) -> Option<Vec<Traffic>> {
    let source: TrafficSource = ctx.traffic.as_ref().filter(|_| !ctx.dry_run)?.clone();
    let expected = ctx.status.with_last(|l| {
        l.table.as_ref().map_or(0, |t| {
            t.rules.dnat.iter().map(|m| usize::from(m.span) + 1).sum()
        })
    });
    let read = tokio::task::spawn_blocking(move || source.read(expected)).await;
    // Said once when reading starts to fail and once when it works again,
    // not on every scrape; meanwhile the series are absent.
    let failed = !matches!(read, Ok(Ok(_)));
    if FAILING.swap(failed, Ordering::Relaxed) != failed {
        match &read {
            Ok(Err(e)) => tracing::warn!("cannot read the per-mapping traffic counters: {e}"),
            Err(e) => tracing::warn!("the per-mapping traffic counters' read failed: {e}"),
            Ok(Ok(_)) => tracing::info!("the per-mapping traffic counters are read again"),
        }
    }
    read.ok()?.ok()?
}

/// The last read of the counters failed.
static FAILING: AtomicBool = AtomicBool::new(false);

/// The counters of an applied mapping, by key (sorted), summed over a
/// range's ports: (packets, bytes); `None` when no port of it is counted.
pub fn counters_of(traffic: &[Traffic], m: &Mapping) -> Option<(u64, u64)> {
    let at = traffic.partition_point(|t| t.key < m.key);
    counters_at(traffic, at, m)
}

/// `counters_of` with the first key at or after `m`'s already found.
fn counters_at(traffic: &[Traffic], at: usize, m: &Mapping) -> Option<(u64, u64)> {
    let mut sum: Option<(u64, u64)> = None;
    for t in traffic[at..]
        .iter()
        .take_while(|t| t.key.public_ip == m.key.public_ip && t.key.public_port <= m.port_end())
    {
        if t.key.proto == m.key.proto {
            let s = sum.get_or_insert((0, 0));
            s.0 += t.packets;
            s.1 += t.bytes;
        }
    }
    sum
}

/// A label value as the Prometheus text formats escape it.
fn escaped(out: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends `podnat_mapping_packets_total` and `podnat_mapping_bytes_total`
/// for every counted key the applied table publishes, to a body encoded by
/// prometheus-client (before OpenMetrics' `# EOF`).
pub fn encode(body: &mut String, traffic: &[Traffic], dnat: &[Mapping], openmetrics: bool) {
    let eof = openmetrics && body.ends_with("# EOF\n");
    if eof {
        body.truncate(body.len() - "# EOF\n".len());
    }
    for (name, help, value) in [
        (
            "podnat_mapping_packets",
            "Packets of the connections through a published mapping, both directions, as the node forwards them (and, with local access, sends and receives them), since the mapping last changed.",
            (|p: u64, _: u64| p) as fn(u64, u64) -> u64,
        ),
        (
            "podnat_mapping_bytes",
            "Bytes (IP lengths) of the connections through a published mapping, both directions, counted as the packets are.",
            |_, b| b,
        ),
    ] {
        // OpenMetrics names a counter's family without `_total`.
        let family = if openmetrics {
            name.to_string()
        } else {
            format!("{name}_total")
        };
        let _ = writeln!(body, "# HELP {family} {help}");
        let _ = writeln!(body, "# TYPE {family} counter");
        // The public addresses repeat from key to key: each is formatted
        // once per run of it.
        let mut address = (None, String::new());
        // Both sorted by key: one walk, no search per mapping.
        let mut at = 0;
        for m in dnat {
            while traffic.get(at).is_some_and(|t| t.key < m.key) {
                at += 1;
            }
            let Some((packets, bytes)) = counters_at(traffic, at, m) else {
                continue;
            };
            if address.0 != Some(m.key.public_ip) {
                address = (Some(m.key.public_ip), m.key.public_ip.to_string());
            }
            body.push_str(name);
            body.push_str("_total{address=\"");
            body.push_str(&address.1);
            let _ = write!(body, "\",port=\"{}\",", m.key.public_port);
            if m.span > 0 {
                let _ = write!(body, "port_end=\"{}\",", m.port_end());
            }
            let _ = write!(body, "protocol=\"{}\",namespace=\"", m.key.proto);
            escaped(body, &m.owner.namespace);
            body.push_str("\",pod=\"");
            escaped(body, &m.owner.name);
            let _ = writeln!(body, "\"}} {}", value(packets, bytes));
        }
    }
    if eof {
        body.push_str("# EOF\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NatKey, PodRef, Proto};

    fn mapping(port: u16, pod: &str) -> Mapping {
        Mapping {
            key: NatKey {
                public_ip: "203.0.113.7".parse().unwrap(),
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip: "10.1.0.5".parse().unwrap(),
            pod_port: port,
            owner: PodRef::new("mail", pod),
            span: 0,
        }
    }

    #[test]
    fn counted_keys_of_applied_mappings_become_two_counters() {
        let dnat = vec![mapping(25, "mx-0"), mapping(993, "imap\"0")];
        let t = |m: &Mapping, packets, bytes| Traffic {
            key: m.key,
            packets,
            bytes,
        };
        // 26 is counted but no longer applied: left out.
        let traffic = vec![
            t(&dnat[0], 3, 180),
            t(&mapping(26, "x"), 1, 1),
            t(&dnat[1], 5, 300),
        ];
        let mut text = String::from("# EOF\n");
        encode(&mut text, &traffic, &dnat, true);
        assert_eq!(
            text,
            "# HELP podnat_mapping_packets Packets of the connections through a published mapping, both directions, as the node forwards them (and, with local access, sends and receives them), since the mapping last changed.\n\
             # TYPE podnat_mapping_packets counter\n\
             podnat_mapping_packets_total{address=\"203.0.113.7\",port=\"25\",protocol=\"tcp\",namespace=\"mail\",pod=\"mx-0\"} 3\n\
             podnat_mapping_packets_total{address=\"203.0.113.7\",port=\"993\",protocol=\"tcp\",namespace=\"mail\",pod=\"imap\\\"0\"} 5\n\
             # HELP podnat_mapping_bytes Bytes (IP lengths) of the connections through a published mapping, both directions, counted as the packets are.\n\
             # TYPE podnat_mapping_bytes counter\n\
             podnat_mapping_bytes_total{address=\"203.0.113.7\",port=\"25\",protocol=\"tcp\",namespace=\"mail\",pod=\"mx-0\"} 180\n\
             podnat_mapping_bytes_total{address=\"203.0.113.7\",port=\"993\",protocol=\"tcp\",namespace=\"mail\",pod=\"imap\\\"0\"} 300\n\
             # EOF\n"
        );
        assert_eq!(counters_of(&traffic, &dnat[1]), Some((5, 300)));
        assert_eq!(counters_of(&traffic, &mapping(27, "y")), None);
        // The classic text: families named with `_total`.
        let mut classic = String::new();
        encode(&mut classic, &traffic, &dnat, false);
        assert!(classic.starts_with("# HELP podnat_mapping_packets_total "));
        assert!(classic.contains("# TYPE podnat_mapping_bytes_total counter\n"));
    }

    #[test]
    fn a_range_is_one_series_of_its_ports_summed_with_port_end() {
        let range = Mapping {
            span: 99,
            ..mapping(10000, "pbx")
        };
        let at = |port, proto, packets| Traffic {
            key: NatKey {
                public_port: port,
                proto,
                ..range.key
            },
            packets,
            bytes: packets * 100,
        };
        // Its ports counted (a UDP key inside it is another mapping's).
        let traffic = vec![
            at(10000, Proto::Tcp, 2),
            at(10050, Proto::Tcp, 3),
            at(10050, Proto::Udp, 7),
            at(10099, Proto::Tcp, 4),
            at(10100, Proto::Tcp, 8),
        ];
        assert_eq!(counters_of(&traffic, &range), Some((9, 900)));
        let mut text = String::new();
        encode(&mut text, &traffic, std::slice::from_ref(&range), false);
        assert!(
            text.contains("podnat_mapping_packets_total{address=\"203.0.113.7\",port=\"10000\",port_end=\"10099\",protocol=\"tcp\",namespace=\"mail\",pod=\"pbx\"} 9\n"),
            "{text}"
        );
    }
}
