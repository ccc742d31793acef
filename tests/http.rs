//! The HTTP endpoints of the running agent binary (issue 9): the agent runs
//! in a sandbox's node namespace against a real kube-apiserver (see
//! tests/agent/harness.rs) and serves on 0.0.0.0:8484 of that namespace;
//! the tests ask it from inside the namespace. Status codes, the JSON of
//! /entries/list, the rule views against the kernel's own tools
//! (`nft list table`, `iptables-nft-save`), and /metrics as Prometheus text.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::{annotation, wait_for, World, NODE, WAIT};
use podnat_controller::firewall::view;
use serde_json::Value;
use support::netns::{Netns, POD_A_IP, POD_B_IP};
use support::save::agent_iptables_save as agent_save;

/// One HTTP/1.1 exchange with the agent inside `ns`: (status, content type,
/// body). `None` while nothing listens.
fn get(ns: &Netns, path: &str) -> Option<(u16, String, String)> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let raw = ns.run(move || {
        let mut s = TcpStream::connect(("127.0.0.1", 8484)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        Some(raw)
    })?;
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this small client reads whole bodies only"
    );
    Some((status, content_type, body.to_string()))
}

fn status(ns: &Netns, path: &str) -> u16 {
    get(ns, path).map(|(s, _, _)| s).unwrap_or(0)
}

fn body(ns: &Netns, path: &str) -> String {
    let (code, _, body) = get(ns, path).unwrap_or_else(|| panic!("GET {path}: no answer"));
    assert_eq!(code, 200, "GET {path}: {body}");
    body
}

fn entries(ns: &Netns) -> Value {
    serde_json::from_str(&body(ns, "/entries/list")).expect("/entries/list is JSON")
}

/// Polls until `a() == b()`, then asserts it (showing both on timeout).
fn wait_equal(what: &str, a: impl Fn() -> String, b: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (x, y) = (a(), b());
        if x == y || Instant::now() > deadline {
            assert_eq!(x, y, "{what}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sample of Prometheus text: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (0.0.4) strictly enough to catch a
/// broken exposition: every sample belongs to a family declared by `# TYPE`
/// before it, label values are quoted, values are numbers.
fn parse_prometheus(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.contains_key(*f))
            .unwrap_or(&name);
        assert!(
            types.contains_key(family) || types.contains_key(&name),
            "sample before its # TYPE: {line}"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

const ENTRY_KEYS: [&str; 16] = [
    "bytes",
    "family",
    "message",
    "namespace",
    "packets",
    "pod",
    "pod_address",
    "pod_port",
    "proto",
    "public_address",
    "public_port",
    "public_port_end",
    "reason",
    "source_ranges",
    "state",
    "winner",
];

/// Sends `n` 100-byte datagrams from the client to 203.0.113.7:5353 (pod
/// A's 53535: a socket that reads and never answers, so counters see
/// exactly these) and waits until the pod has them all.
fn send_through_5353(w: &World, n: u64) {
    let sink = w
        .sandbox
        .pod_a
        .run(|| std::net::UdpSocket::bind("0.0.0.0:53535").unwrap());
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    w.sandbox.client.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..n {
            s.send_to(&[1u8; 100], "203.0.113.7:5353").unwrap();
        }
    });
    for _ in 0..n {
        sink.recv_from(&mut [0u8; 256])
            .expect("a datagram through 5353");
    }
}

#[test]
fn endpoints_of_a_running_agent() {
    let w = World::new("htnft");
    let node = &w.sandbox.node;

    // Started while the apiserver is away: alive, answering, not ready.
    w.cluster.stop_apiserver();
    let agent = w.start_agent(&[]);
    wait_for("the HTTP endpoints", WAIT, || status(node, "/ping") == 200);
    assert_eq!(body(node, "/ping"), "pong\n");
    wait_for("/healthz while the apiserver is away", WAIT, || {
        status(node, "/healthz") == 200
    });
    let (code, _, why) = get(node, "/ready").unwrap();
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("first full pod list"), "{why}");
    assert_eq!(status(node, "/nowhere"), 404);

    w.cluster.start_apiserver();
    agent.wait_first_sync();
    wait_for("/ready once the first sync is applied", WAIT, || {
        status(node, "/ready") == 200
    });

    // Every state: applied (TCP and UDP), conflict-lost, invalid.
    w.create_pod("dup", NODE, Some(&annotation(&[(25, 25)])));
    w.set_running("dup", POD_B_IP);
    w.create_pod(
        "mx-a",
        NODE,
        Some(
            r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcPort":587,"dstPort":2525},{"srcPort":5353,"dstPort":53535,"proto":"udp"}]}"#,
        ),
    );
    w.set_running("mx-a", POD_A_IP);
    w.create_pod(
        "broken",
        NODE,
        Some(r#"{"entries":[{"srcPort":26,"dstPort":0}]}"#),
    );
    w.set_running("broken", "10.1.2.5");
    wait_for("the three pods in /entries/list", WAIT, || {
        entries(node)["entries"]
            .as_array()
            .is_some_and(|e| e.len() == 5)
    });

    let (code, content_type, text) = get(node, "/entries/list").unwrap();
    assert_eq!(code, 200);
    assert_eq!(content_type, "application/json");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["node"], NODE);
    assert_eq!(doc["flavor"], "nftables");
    assert_eq!(doc["dry_run"], false);
    assert_eq!(doc["first_sync_applied"], true);
    assert_eq!(doc["apiserver_reachable"], true);
    assert!(doc["last_reconcile"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(doc["last_error"].is_null());
    assert_eq!(
        doc["public_address"],
        serde_json::json!({"chosen": "203.0.113.7", "source": "flag", "skipped": [],
            "families": [{"family": "ipv4", "chosen": "203.0.113.7"}]})
    );
    let rows = doc["entries"].as_array().unwrap();
    for r in rows {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ENTRY_KEYS, "{r}");
    }
    let summary: BTreeSet<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{} {} {}:{}/{} → {}:{}",
                r["namespace"].as_str().unwrap(),
                r["pod"].as_str().unwrap(),
                r["state"].as_str().unwrap(),
                r["public_address"],
                r["public_port"],
                r["proto"],
                r["pod_address"],
                r["pod_port"]
            )
            .replace('"', "")
        })
        .collect();
    let expected: BTreeSet<String> = [
        "mail/broken invalid null:null/null → null:null",
        "mail/dup conflict-lost 203.0.113.7:25/tcp → null:null",
        "mail/mx-a applied 203.0.113.7:25/tcp → 10.1.0.5:2525",
        "mail/mx-a applied 203.0.113.7:587/tcp → 10.1.0.5:2525",
        "mail/mx-a applied 203.0.113.7:5353/udp → 10.1.0.5:53535",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(summary, expected);
    let by_pod = |p: &str| rows.iter().find(|r| r["pod"] == p).unwrap();
    assert_eq!(by_pod("dup")["winner"], "mail:mx-a");
    assert!(by_pod("dup")["message"]
        .as_str()
        .unwrap()
        .contains("203.0.113.7:25/tcp is taken by mail:mx-a"));
    assert!(by_pod("broken")["message"]
        .as_str()
        .unwrap()
        .contains("entries[0].dstPort"));

    // The rule view is what `nft list table` prints (elements in key order).
    let (code, content_type, _) = get(node, "/entries/list?format=nft").unwrap();
    assert_eq!(
        (code, content_type.as_str()),
        (200, "text/plain; charset=utf-8")
    );
    wait_equal(
        "?format=nft equals nft list table ip podnat",
        || view::canonical_nft(&body(node, "/entries/list?format=nft")),
        || view::canonical_nft(&node.sh("nft list table ip podnat")),
    );
    assert!(body(node, "/entries/list?format=nft").contains("mail:mx-a"));
    let (code, _, why) = get(node, "/entries/list?format=iptables").unwrap();
    assert_eq!(code, 400);
    assert!(why.contains("?format=nft"), "{why}");
    assert_eq!(status(node, "/entries/list?format=yaml"), 400);

    // Traffic through 5353/udp: a pod that reads and never answers, so the
    // counters see exactly the client's datagrams.
    const DATAGRAMS: u64 = 7;
    send_through_5353(&w, DATAGRAMS);
    let row = entries(node)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["public_port"] == 5353)
        .cloned()
        .unwrap();
    assert_eq!(row["packets"], DATAGRAMS, "{row}");
    assert_eq!(row["bytes"], DATAGRAMS * 128, "{row}");

    // Metrics.
    let (code, content_type, text) = get(node, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (types, samples) = parse_prometheus(&text);
    // (Prometheus text 0.0.4 names a counter family with its _total.)
    for (family, kind) in [
        ("podnat_reconciles_total", "counter"),
        ("podnat_reconcile_duration_seconds", "histogram"),
        ("podnat_network_programming_duration_seconds", "histogram"),
        ("podnat_batch_messages", "histogram"),
        ("podnat_batch_bytes", "histogram"),
        ("podnat_apply_errors_total", "counter"),
        ("podnat_rules_owned", "gauge"),
        ("podnat_conflicts", "gauge"),
        ("podnat_invalid_annotations", "gauge"),
        ("podnat_rejected_entries", "gauge"),
        ("podnat_pending_entries", "gauge"),
        ("podnat_public_address_info", "gauge"),
        ("podnat_watch_events_total", "counter"),
        ("podnat_watch_errors_total", "counter"),
        ("podnat_apiserver_reachable", "gauge"),
        ("podnat_first_sync_applied", "gauge"),
        ("podnat_pods", "gauge"),
        ("podnat_kube_events_total", "counter"),
        ("podnat_state_store_failures_total", "counter"),
        ("podnat_state_store_writes_total", "counter"),
        ("podnat_state_store_pending", "gauge"),
        ("podnat_mapping_packets_total", "counter"),
        ("podnat_mapping_bytes_total", "counter"),
    ] {
        assert_eq!(
            types.get(family).map(String::as_str),
            Some(kind),
            "{family}:\n{text}"
        );
    }
    let v = |name, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert!(v("podnat_reconciles_total", &[]).unwrap() >= 2.0);
    let by_trigger: f64 = samples
        .iter()
        .filter(|s| s.name == "podnat_reconcile_duration_seconds_count")
        .map(|s| s.value)
        .sum();
    assert!(by_trigger >= 2.0, "reconciles by trigger: {text}");
    assert_eq!(
        v(
            "podnat_reconcile_duration_seconds_count",
            &[("trigger", "first_sync")]
        ),
        Some(1.0)
    );
    assert!(v("podnat_network_programming_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert!(v("podnat_batch_messages_count", &[]).unwrap() >= 1.0);
    assert!(v("podnat_batch_bytes_sum", &[]).unwrap() > 0.0);
    assert_eq!(
        v(
            "podnat_rules_owned",
            &[("family", "ipv4"), ("kind", "dnat")]
        ),
        Some(3.0)
    );
    assert_eq!(
        v(
            "podnat_rules_owned",
            &[("family", "ipv4"), ("kind", "snat")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(
            "podnat_rules_owned",
            &[("family", "ipv4"), ("kind", "forward")]
        ),
        Some(2.0)
    );
    let udp = [
        ("address", "203.0.113.7"),
        ("port", "5353"),
        ("protocol", "udp"),
        ("namespace", "mail"),
        ("pod", "mx-a"),
    ];
    assert_eq!(
        v("podnat_mapping_packets_total", &udp),
        Some(DATAGRAMS as f64)
    );
    assert_eq!(
        v("podnat_mapping_bytes_total", &udp),
        Some((DATAGRAMS * 128) as f64)
    );
    let tcp25 = [("port", "25"), ("protocol", "tcp"), ("pod", "mx-a")];
    assert_eq!(v("podnat_mapping_packets_total", &tcp25), Some(0.0));
    assert_eq!(v("podnat_conflicts", &[]), Some(1.0));
    assert_eq!(v("podnat_invalid_annotations", &[]), Some(1.0));
    assert_eq!(v("podnat_rejected_entries", &[]), Some(0.0));
    assert_eq!(v("podnat_pending_entries", &[]), Some(0.0));
    assert_eq!(
        v("podnat_public_address_info", &[("address", "203.0.113.7")]),
        Some(1.0)
    );
    assert!(v("podnat_watch_events_total", &[]).unwrap() >= 6.0);
    assert!(v("podnat_watch_errors_total", &[]).unwrap() >= 1.0);
    assert_eq!(v("podnat_apiserver_reachable", &[]), Some(1.0));
    assert_eq!(v("podnat_pods", &[]), Some(3.0));
    assert_eq!(
        v(
            "podnat_state_store_failures_total",
            &[("operation", "write"), ("flavor", "none")]
        ),
        Some(0.0)
    );
    for kind in ["refused", "socket", "netlink", "retries"] {
        assert_eq!(
            v("podnat_apply_errors_total", &[("error", kind)]),
            Some(0.0),
            "apply errors of kind {kind}"
        );
    }
    // OpenMetrics for scrapers that ask for it.
    let om = node.run(|| {
        let mut s = TcpStream::connect(("127.0.0.1", 8484)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(om.contains("application/openmetrics-text"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.contains("# TYPE podnat_mapping_packets counter"), "{om}");
    assert_eq!(om.matches("# EOF").count(), 1, "{om}");

    // The apiserver goes away: not ready, still alive; back: ready again.
    w.cluster.stop_apiserver();
    wait_for("/ready turns 503 during the outage", WAIT, || {
        status(node, "/ready") == 503
    });
    assert!(body(node, "/healthz").starts_with("ok"));
    assert_eq!(entries(node)["apiserver_reachable"], false);
    w.cluster.start_apiserver();
    wait_for("/ready again", WAIT, || status(node, "/ready") == 200);
    drop(agent);
}

#[test]
fn iptables_view_equals_iptables_nft_save() {
    let w = World::new("htipt");
    let node = &w.sandbox.node;
    // Foreign rules in the parent chains, so the jumps sit among others.
    node.sh(
        "iptables-nft -t nat -A PREROUTING -p tcp --dport 9 -j ACCEPT && \
         iptables-nft -A FORWARD -p tcp --dport 9 -j ACCEPT",
    );
    let agent = w.start_agent(&["-firewallflavor=iptables"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525), (587, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("the mappings in the view", WAIT, || {
        body(node, "/entries/list?format=iptables").contains("--dport 587")
    });
    wait_equal(
        "?format=iptables equals iptables-nft-save",
        || body(node, "/entries/list?format=iptables"),
        || agent_save(node),
    );
    assert_eq!(entries(node)["flavor"], "iptables");
    assert_eq!(status(node, "/entries/list?format=nft"), 400);
    // The iptables flavor counts no traffic: null in the rows, no series.
    for r in entries(node)["entries"].as_array().unwrap() {
        assert!(r["packets"].is_null() && r["bytes"].is_null(), "{r}");
    }
    assert!(!body(node, "/metrics").contains("podnat_mapping_packets"));

    // After a deletion the view follows the kernel.
    w.delete_pod("mx-a");
    wait_for("the rules removed", WAIT, || {
        !agent_save(node).contains("mail:mx-a")
    });
    wait_equal(
        "?format=iptables equals iptables-nft-save after the deletion",
        || body(node, "/entries/list?format=iptables"),
        || agent_save(node),
    );
    drop(agent);
}

/// `-iptablescounters`: the iptables flavor counts every packet of each
/// mapping (its counting chain in mangle) and a real agent serves exactly
/// the datagrams sent, in /entries/list and /metrics; the view shows the
/// counting chains as iptables-nft-save does.
#[test]
fn iptables_counters_through_a_real_agent() {
    let w = World::new("htcnt");
    let node = &w.sandbox.node;
    let agent = w.start_agent(&["-firewallflavor=iptables", "-iptablescounters"]);
    agent.wait_first_sync();
    w.create_pod(
        "mx-a",
        NODE,
        Some(r#"{"entries":[{"srcPort":25,"dstPort":2525},{"srcPort":5353,"dstPort":53535,"proto":"udp"}]}"#),
    );
    w.set_running("mx-a", POD_A_IP);
    wait_for("the counting rules in the view", WAIT, || {
        body(node, "/entries/list?format=iptables").contains("--ctorigdstport 5353")
    });
    wait_equal(
        "?format=iptables equals iptables-nft-save, mangle included",
        || body(node, "/entries/list?format=iptables"),
        || agent_save(node),
    );
    const DATAGRAMS: u64 = 9;
    send_through_5353(&w, DATAGRAMS);
    let rows = entries(node)["entries"].as_array().unwrap().clone();
    let row = rows.iter().find(|r| r["public_port"] == 5353).unwrap();
    assert_eq!(row["packets"], DATAGRAMS, "{row}");
    assert_eq!(row["bytes"], DATAGRAMS * 128, "{row}");
    let tcp = rows.iter().find(|r| r["public_port"] == 25).unwrap();
    assert_eq!(tcp["packets"], 0, "{tcp}");
    let (_, samples) = parse_prometheus(&body(node, "/metrics"));
    let udp = [("port", "5353"), ("protocol", "udp"), ("pod", "mx-a")];
    assert_eq!(
        value(&samples, "podnat_mapping_packets_total", &udp),
        Some(DATAGRAMS as f64)
    );
    assert_eq!(
        value(&samples, "podnat_mapping_bytes_total", &udp),
        Some((DATAGRAMS * 128) as f64)
    );
    drop(agent);
}

#[test]
fn dry_run_agent_lists_planned_entries_and_owns_no_rules() {
    let w = World::new("htdry");
    let node = &w.sandbox.node;
    let agent = w.start_agent(&["-dryrun"]);
    agent.wait_first_sync();
    w.create_pod("mx-a", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-a", POD_A_IP);
    wait_for("the planned entry", WAIT, || {
        entries(node)["entries"][0]["state"] == "planned"
    });
    assert_eq!(entries(node)["dry_run"], true);
    // Nothing is programmed, so nothing is counted.
    assert!(entries(node)["entries"][0]["packets"].is_null());
    assert!(!body(node, "/metrics").contains("podnat_mapping_packets"));
    let (_, samples) = parse_prometheus(&body(node, "/metrics"));
    assert_eq!(
        value(
            &samples,
            "podnat_rules_owned",
            &[("family", "ipv4"), ("kind", "dnat")]
        ),
        Some(0.0)
    );
    assert!(node.try_sh("nft list table ip podnat").stdout.is_empty());
    drop(agent);
}
