//! The agent's HTTP endpoints (axum): liveness, readiness, the NAT entries
//! and the rule view, Prometheus metrics. Read-only: everything served comes
//! from the shared [`AgentStatus`]; nothing here changes what the loop does.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the loop's heartbeat is recent, else 503 |
//! | `/ping` | `pong` |
//! | `/ready` | 200 once the first sync is applied and while the API server answers, else 503 |
//! | `/entries/list` | the NAT entries as JSON; `?format=iptables` / `?format=nft`: the rule view |
//! | `/metrics` | Prometheus text (OpenMetrics when the scraper asks for it) |
//!
//! Who may read which path is `access`'s business; `serve` runs the port
//! (plain HTTP and TLS on one port), `tls` makes its certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::config::Flavor;
use crate::firewall::engine::coexist;
use crate::firewall::engine::monitor::Blocker;
use crate::firewall::Backend;
use crate::model::{Families, Family, PodRef, Proto};
use crate::net::address::Choice;
use crate::plan::NatTable;
use crate::status::AgentStatus;

pub mod access;
mod cache;
pub mod review;
mod serve;
mod tls;
pub mod traffic;

pub use cache::LIFETIMES as REVIEW_LIFETIMES;
pub use serve::{bind, serve};
pub use tls::server_config;

/// Errors at the HTTP boundary.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (-httpaddress, -httpport): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {} (--tls-cert-file / --tls-private-key-file): {source}", path.display())]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot make a self-signed TLS certificate: {0}")]
    SelfSigned(#[source] rcgen::Error),
}

/// The loop beats every `reconcile::HEARTBEAT` while it waits and after
/// each reconcile; this much silence means it is stuck.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(60);

/// Where the public address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSource {
    /// `--public-address`.
    Flag,
    /// Auto detection over rtnetlink.
    Detected,
}

/// What the endpoints serve from.
pub struct HttpContext {
    pub status: Arc<AgentStatus>,
    pub registry: Registry,
    pub flavor: Flavor,
    /// Renders the rule view: a backend of the agent's flavor used only for
    /// `Backend::view`, which touches no kernel state (the live backend
    /// belongs to the firewall thread).
    pub view: Mutex<Box<dyn Backend>>,
    pub node: String,
    pub dry_run: bool,
    pub address_source: AddressSource,
    /// `-ipfamilies`.
    pub families: Families,
    /// The per-mapping traffic counters (`None`: this flavor or kernel does
    /// not count).
    pub traffic: Option<crate::firewall::TrafficSource>,
}

/// The router over `ctx`.
pub fn router(ctx: HttpContext) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ping", get(|| async { "pong\n" }))
        .route("/ready", get(ready))
        .route("/entries/list", get(entries))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(ctx))
}

type Ctx = State<Arc<HttpContext>>;

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn healthz(State(ctx): Ctx) -> Response {
    match ctx.status.heartbeat_age() {
        Some(age) if age <= LIVENESS_LIMIT => text(StatusCode::OK, "ok\n".into()),
        Some(age) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the reconcile loop has not beaten for {}s (limit {}s): it is stuck\n",
                age.as_secs(),
                LIVENESS_LIMIT.as_secs()
            ),
        ),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reconcile loop has not started\n".into(),
        ),
    }
}

async fn ready(State(ctx): Ctx) -> Response {
    let mut missing = Vec::new();
    if !ctx.status.first_sync_applied() {
        missing.push("the first full pod list is not applied yet");
    }
    if !ctx.status.apiserver_reachable() {
        missing.push("the Kubernetes API server does not answer");
    }
    if missing.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}

async fn metrics(State(ctx): Ctx, headers: HeaderMap) -> Response {
    use prometheus_client::encoding::{prometheus_text, text as openmetrics};
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let counted = traffic::read(&ctx).await;
    let mut body = String::new();
    let (result, content_type) = if wants_openmetrics {
        (
            openmetrics::encode(&mut body, &ctx.registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_text::encode(&mut body, &ctx.registry),
            prometheus_text::CONTENT_TYPE,
        )
    };
    if let Some(t) = &counted {
        ctx.status.with_last(|last| {
            let dnat = last.table.as_ref().map_or(&[][..], |t| &t.rules.dnat[..]);
            traffic::encode(&mut body, t, dnat, wants_openmetrics);
        });
    }
    match result {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".into(),
        ),
    }
}

#[derive(Debug, Deserialize)]
struct EntriesQuery {
    format: Option<String>,
}

/// The state of one entry in `/entries/list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryState {
    /// The kernel holds it.
    Applied,
    /// Dry run: it would be applied.
    Planned,
    /// Another pod holds its public address:port/proto.
    ConflictLost,
    /// Waits for a public address to be detected.
    Pending,
    /// The pod's annotation was rejected (no NAT for the pod), or entries
    /// of it (the message names them; the others have rows of their own).
    Invalid,
    /// Valid, but not published: the namespace may not publish it, or the
    /// node itself serves the port (`reason` says which).
    Refused,
}

/// One row of `/entries/list`. Every key is always present; what the agent
/// does not know for a state is `null` (a losing or pending entry's pod
/// address, an invalid annotation's ports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub namespace: String,
    pub pod: String,
    /// ipv4 or ipv6 (`null` for an invalid annotation).
    pub family: Option<Family>,
    pub public_address: Option<IpAddr>,
    pub public_port: Option<u16>,
    /// The last public port of a range's part (`srcPortEnd`); `null` for
    /// one port. Its pod ports run from `pod_port` with the same offset.
    pub public_port_end: Option<u16>,
    pub pod_address: Option<IpAddr>,
    pub pod_port: Option<u16>,
    pub proto: Option<Proto>,
    pub state: EntryState,
    /// Why it is not applied (conflict, pending, the parser's error).
    pub message: Option<String>,
    /// The pod that holds the port (`namespace:name`), for a lost conflict.
    pub winner: Option<String>,
    /// Why a refused entry is refused, as `podnat_entries_refused_total`
    /// labels it (`node_service`, `namespace_not_selected`, ...).
    pub reason: Option<&'static str>,
    /// The sources an applied (or planned) entry is restricted to
    /// (`sourceRanges` of its family, aggregated); `null`: every source.
    pub source_ranges: Option<Vec<String>>,
    /// An applied entry's traffic, both directions, from the kernel's
    /// counters (`null`: not counted — the iptables flavor, a kernel before
    /// 5.7, a dry run).
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedAddress {
    pub address: IpAddr,
    pub family: Family,
    pub reason: String,
}

/// The node's public addresses: `chosen` is the IPv4 one (as before dual
/// stack), `families` each enabled family's choice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublicAddress {
    pub chosen: Option<IpAddr>,
    pub source: AddressSource,
    pub skipped: Vec<SkippedAddress>,
    pub families: Vec<FamilyAddress>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FamilyAddress {
    pub family: Family,
    pub chosen: Option<IpAddr>,
}

/// The JSON document of `/entries/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntriesList {
    pub node: String,
    pub flavor: &'static str,
    pub dry_run: bool,
    pub first_sync_applied: bool,
    pub apiserver_reachable: bool,
    /// RFC 3339 time of the last reconcile that completed.
    pub last_reconcile: Option<String>,
    /// The last apply error, cleared by the next success.
    pub last_error: Option<String>,
    pub public_address: PublicAddress,
    /// What on this node keeps NAT from working although the agent's rules
    /// are in place (foreign forward-hook drop policies).
    pub warnings: Vec<Warning>,
    pub entries: Vec<Entry>,
}

/// One warning of `/entries/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// `forward_blocked`.
    pub kind: &'static str,
    /// ip or inet.
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    pub message: String,
}

fn warnings(flavor: Flavor, blockers: &[Blocker]) -> Vec<Warning> {
    blockers
        .iter()
        .map(|b| Warning {
            kind: "forward_blocked",
            family: b.family_name(),
            table: b.table.clone(),
            chain: b.chain.clone(),
            message: coexist::advice(flavor_name(flavor), b),
        })
        .collect()
}

fn flavor_format(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Iptables => "iptables",
        Flavor::Nftables => "nft",
    }
}

async fn entries(State(ctx): Ctx, Query(q): Query<EntriesQuery>) -> Response {
    let last = ctx.status.last();
    let own = flavor_format(ctx.flavor);
    match q.format.as_deref() {
        None | Some("json") => {}
        Some(f) if f == own => {
            let rules = last.table.map(|t| t.rules).unwrap_or_default();
            let view = ctx
                .view
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .view(&rules);
            return text(StatusCode::OK, view);
        }
        Some(f @ ("iptables" | "nft")) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "this agent runs the {} flavor, whose rule view is ?format={own}; it has no {f} view\n",
                    flavor_name(ctx.flavor)
                ),
            )
        }
        Some(f) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("unknown format {f:?}: use json (the default) or {own}\n"),
            )
        }
    }
    let counted = traffic::read(&ctx).await;
    let list = EntriesList {
        node: ctx.node.clone(),
        flavor: flavor_name(ctx.flavor),
        dry_run: ctx.dry_run,
        first_sync_applied: ctx.status.first_sync_applied(),
        apiserver_reachable: ctx.status.apiserver_reachable(),
        last_reconcile: last.at.and_then(rfc3339),
        last_error: last.error,
        public_address: public_address(last.address.as_ref(), ctx.address_source, ctx.families),
        warnings: warnings(ctx.flavor, &ctx.status.forward_blocked()),
        entries: last
            .table
            .as_ref()
            .map(|t| entry_rows(t, ctx.dry_run, counted.as_deref()))
            .unwrap_or_default(),
    };
    Json(list).into_response()
}

fn flavor_name(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Iptables => "iptables",
        Flavor::Nftables => "nftables",
    }
}

fn rfc3339(t: SystemTime) -> Option<String> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(|t| t.to_string())
}

fn public_address(
    choice: Option<&Choice>,
    source: AddressSource,
    families: Families,
) -> PublicAddress {
    PublicAddress {
        chosen: choice.and_then(|c| c.chosen.get(Family::Ipv4)),
        source,
        skipped: choice
            .map(|c| {
                c.skipped
                    .iter()
                    .map(|(address, why)| SkippedAddress {
                        address: *address,
                        family: Family::of(*address),
                        reason: why.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        families: families
            .iter()
            .map(|family| FamilyAddress {
                family,
                chosen: choice.and_then(|c| c.chosen.get(family)),
            })
            .collect(),
    }
}

/// The rows of `/entries/list` for a planned table: winners, losers, pending
/// entries and rejected pods, by pod then public port; `traffic`: the
/// counters of the applied ones, sorted by key.
pub fn entry_rows(
    table: &NatTable,
    dry_run: bool,
    traffic: Option<&[crate::firewall::Traffic]>,
) -> Vec<Entry> {
    let row = |pod: &PodRef, state| Entry {
        namespace: pod.namespace.to_string(),
        pod: pod.name.to_string(),
        family: None,
        public_address: None,
        public_port: None,
        public_port_end: None,
        pod_address: None,
        pod_port: None,
        proto: None,
        state,
        message: None,
        winner: None,
        reason: None,
        source_ranges: None,
        packets: None,
        bytes: None,
    };
    let mut rows = Vec::new();
    let allow = &table.rules.allow;
    for m in &table.rules.dnat {
        let ranges: Vec<String> = crate::model::allow_of(allow, &m.key)
            .iter()
            .map(|a| a.source.to_string())
            .collect();
        let counted = traffic.and_then(|t| traffic::counters_of(t, m));
        let state = if dry_run {
            EntryState::Planned
        } else {
            EntryState::Applied
        };
        rows.push(Entry {
            family: Some(m.key.family()),
            public_address: Some(m.key.public_ip),
            public_port: Some(m.key.public_port),
            public_port_end: (m.span > 0).then(|| m.port_end()),
            pod_address: Some(m.pod_ip),
            pod_port: Some(m.pod_port),
            proto: Some(m.key.proto),
            source_ranges: (!ranges.is_empty()).then_some(ranges),
            packets: counted.map(|c| c.0),
            bytes: counted.map(|c| c.1),
            ..row(&m.owner, state)
        });
    }
    for c in &table.conflicts {
        rows.push(Entry {
            family: Some(c.key.family()),
            public_address: Some(c.key.public_ip),
            public_port: Some(c.key.public_port),
            public_port_end: (c.span > 0).then(|| c.key.public_port + c.span),
            proto: Some(c.key.proto),
            message: Some(format!(
                "{} is taken by {} (a Ready pod beats a not-ready one, then the newer pod wins)",
                c.ports(),
                c.winner
            )),
            winner: Some(c.winner.to_string()),
            ..row(&c.loser, EntryState::ConflictLost)
        });
    }
    for p in &table.pending {
        rows.push(Entry {
            family: Some(p.family),
            public_port: Some(p.public_port),
            public_port_end: (p.span > 0).then(|| p.public_port + p.span),
            pod_port: Some(p.pod_port),
            proto: Some(p.proto),
            message: Some(format!(
                "entries[{}] uses the node's public {} address, and none is detected yet",
                p.entry, p.family
            )),
            ..row(&p.pod, EntryState::Pending)
        });
    }
    for r in &table.rejected {
        match &r.rejected {
            crate::plan::Rejected::Annotation(_) => rows.push(Entry {
                message: Some(r.rejected.to_string()),
                ..row(&r.pod, EntryState::Invalid)
            }),
            // One row per entry rejected alone, as every entry has one.
            crate::plan::Rejected::Entries { errors, .. } => {
                rows.extend(errors.iter().map(|e| Entry {
                    message: Some(format!("entry rejected alone: {e}")),
                    ..row(&r.pod, EntryState::Invalid)
                }))
            }
        }
    }
    for r in &table.refused {
        rows.push(Entry {
            family: Some(r.family),
            public_address: r.public_ip,
            public_port: Some(r.public_port),
            public_port_end: (r.span > 0).then(|| r.public_port + r.span),
            proto: Some(r.proto),
            message: Some(r.to_string()),
            reason: Some(r.reason.metric_label()),
            ..row(&r.pod, EntryState::Refused)
        });
    }
    rows.sort_by(|a, b| {
        (&a.namespace, &a.pod, a.public_port, a.proto).cmp(&(
            &b.namespace,
            &b.pod,
            b.public_port,
            b.proto,
        ))
    });
    rows
}

#[cfg(test)]
mod tests;
