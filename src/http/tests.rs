use super::*;
use crate::firewall::{backend_for, Names};
use crate::kube::events::EventStats;
use crate::plan::{self, PlanConfig, PodFacts};
use std::net::Ipv4Addr;

fn context(flavor: Flavor) -> Arc<HttpContext> {
    let status = Arc::new(AgentStatus::new(Arc::new(EventStats::default())));
    Arc::new(HttpContext {
        registry: crate::status::registry(&status),
        status,
        flavor,
        view: Mutex::new(backend_for(flavor, Names::new("podnat"))),
        node: "node1".into(),
        dry_run: false,
        families: Families::default(),
        address_source: AddressSource::Detected,
        traffic: None,
    })
}

fn query(format: &str) -> Query<EntriesQuery> {
    Query(EntriesQuery {
        format: Some(format.into()),
    })
}

/// Handlers called directly (the running agent's answers are tested in
/// tests/http.rs): the states a test agent cannot be put in on demand.
#[tokio::test]
async fn answers_before_the_loop_runs() {
    let ctx = context(Flavor::Nftables);
    assert_eq!(
        healthz(State(ctx.clone())).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        ready(State(ctx.clone())).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // No table yet: an empty list, and the empty table's rule view.
    let r = entries(State(ctx.clone()), Query(EntriesQuery { format: None })).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = entries(State(ctx.clone()), query("nft")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = entries(State(ctx.clone()), query("iptables")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = entries(State(ctx), query("xml")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let ctx = context(Flavor::Iptables);
    let r = entries(State(ctx.clone()), query("iptables")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = metrics(State(ctx), HeaderMap::new()).await;
    assert_eq!(r.status(), StatusCode::OK);
}

fn pod(name: &str, ip: [u8; 4], created: i64, annotation: &str) -> PodFacts {
    let ip = Ipv4Addr::from(ip).to_string();
    crate::plan::tests::pod("mail", name, &ip, created, annotation)
}

#[test]
fn rows_cover_every_state() {
    let pods = [
        pod(
            "old",
            [10, 1, 0, 5],
            1,
            r#"{"entries":[{"srcPort":25,"dstPort":25}]}"#,
        ),
        pod(
            "new",
            [10, 1, 1, 5],
            2,
            r#"{"entries":[{"srcPort":25,"dstPort":2525}]}"#,
        ),
        pod(
            "bad",
            [10, 1, 2, 5],
            3,
            r#"{"entries":[{"srcPort":0,"dstPort":25}]}"#,
        ),
        // Two entries rejected alone, one published.
        pod(
            "part",
            [10, 1, 3, 5],
            4,
            r#"{"entries":[{"srcPort":80,"dstPort":80},{"srcPort":90,"srcPortEnd":80,"dstPort":90},{"srcPort":91,"dstPort":91,"sourceRanges":[]}]}"#,
        ),
    ];
    let cfg = PlanConfig {
        node_id: "node1".into(),
        restricted_ports: [22].into(),
        families: Families::default(),
        local_access: false,
        source_ranges: true,
    };
    let table = plan::plan(
        &pods,
        crate::model::DualStack::v4(Ipv4Addr::new(203, 0, 113, 7)),
        &cfg,
    );
    let rows = entry_rows(&table, false, None);
    let states: Vec<_> = rows.iter().map(|r| (r.pod.as_str(), r.state)).collect();
    assert_eq!(
        states,
        vec![
            ("bad", EntryState::Invalid),
            ("new", EntryState::Applied),
            ("old", EntryState::ConflictLost),
            ("part", EntryState::Invalid),
            ("part", EntryState::Invalid),
            ("part", EntryState::Applied),
        ]
    );
    let part: Vec<&str> = rows[3..5]
        .iter()
        .map(|r| r.message.as_deref().unwrap())
        .collect();
    assert!(
        part[0].starts_with("entry rejected alone: entries[1].srcPortEnd: 80 is below srcPort 90"),
        "{part:?}"
    );
    assert!(
        part[1].starts_with("entry rejected alone: entries[2].sourceRanges: empty"),
        "{part:?}"
    );
    assert_eq!(rows[1].pod_port, Some(2525));
    assert_eq!(rows[2].winner.as_deref(), Some("mail:new"));
    assert!(rows[0].message.as_deref().unwrap().contains("srcPort"));

    let pending = plan::plan(&pods[..1], crate::model::DualStack::default(), &cfg);
    let rows = entry_rows(&pending, true, None);
    assert_eq!(rows[0].state, EntryState::Pending);
    assert_eq!(rows[0].public_address, None);
    let planned = entry_rows(&table, true, None);
    assert_eq!(planned[1].state, EntryState::Planned);
    assert_eq!(planned[1].source_ranges, None, "every source");

    // An entry with sourceRanges lists them, aggregated.
    let ranged = [pod(
        "ranged",
        [10, 1, 3, 5],
        4,
        r#"{"entries":[{"srcPort":993,"dstPort":993,"sourceRanges":["198.51.100.0/25","198.51.100.128/25","2001:db8::/32"]}]}"#,
    )];
    let table = plan::plan(
        &ranged,
        crate::model::DualStack::v4(Ipv4Addr::new(203, 0, 113, 7)),
        &cfg,
    );
    let rows = entry_rows(&table, false, None);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].source_ranges,
        Some(vec!["198.51.100.0/24".to_string()])
    );
}

#[test]
fn json_keys_are_stable() {
    let e = Entry {
        family: Some(Family::Ipv4),
        namespace: "mail".into(),
        pod: "mx".into(),
        public_address: Some(Ipv4Addr::new(203, 0, 113, 7).into()),
        public_port: Some(25),
        public_port_end: None,
        pod_address: Some(Ipv4Addr::new(10, 1, 0, 5).into()),
        pod_port: Some(25),
        proto: Some(Proto::Tcp),
        state: EntryState::ConflictLost,
        message: None,
        winner: None,
        reason: None,
        source_ranges: Some(vec!["198.51.100.0/24".into()]),
        packets: Some(3),
        bytes: None,
    };
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["packets"], 3);
    assert!(v["bytes"].is_null());
    assert_eq!(v["source_ranges"][0], "198.51.100.0/24");
    assert_eq!(v["state"], "conflict-lost");
    assert_eq!(v["proto"], "tcp");
    assert_eq!(v["public_address"], "203.0.113.7");
    assert!(v["message"].is_null());
}
