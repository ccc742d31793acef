//! Who may read the agent's HTTP endpoints (issue 27, part 3), against the
//! running binary and a real kube-apiserver: a remote client (the sandbox's
//! client namespace, 203.0.113.1, reaching the node's 203.0.113.7:8484) reads
//! /metrics and /entries/list only over TLS with a service-account token the
//! apiserver authenticates (TokenReview) and RBAC allows (SubjectAccessReview);
//! the probes stay open over plain HTTP; 127.0.0.1 in the node reads as
//! before. The client is curl (OpenSSL), so the TLS side is checked by
//! another implementation than the server's.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::path::{Path, PathBuf};

use harness::{wait_for, World, WAIT};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::Api;
use support::netns::{Netns, PUBLIC_IP, PUBLIC_IP6};

/// Where the readers' service accounts live.
const READERS: &str = "monitoring";

/// One curl exchange: the status (0 when there was no HTTP answer: refused,
/// TLS failure), the response head, the body, curl's exit code.
#[derive(Debug)]
struct Answer {
    code: u16,
    head: String,
    body: String,
    exit: i32,
}

fn curl(ns: &Netns, url: &str, options: &str) -> Answer {
    let out = ns.try_sh(&format!("curl -sS -i --max-time 10 {options} '{url}'"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or(("", ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        code,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
        exit: out.status.code().unwrap_or(-1),
    }
}

/// A GET over https with the agent's certificate as the only trusted CA
/// (so the answer also proves which certificate was served) and `token`.
fn https(ns: &Netns, path: &str, ca: &Path, token: Option<&str>) -> Answer {
    let auth = token
        .map(|t| format!("-H 'Authorization: Bearer {t}'"))
        .unwrap_or_default();
    curl(
        ns,
        &format!("https://{PUBLIC_IP}:8484{path}"),
        &format!("--cacert {} {auth}", ca.display()),
    )
}

fn plain(ns: &Netns, host: &str, path: &str) -> Answer {
    curl(ns, &format!("http://{host}:8484{path}"), "")
}

/// The value of one sample of the agent's /metrics (read from 127.0.0.1 in
/// the node, which needs no token); 0 when the series is not there yet.
fn sample(node: &Netns, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = plain(node, "127.0.0.1", "/metrics").body;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn cache(node: &Netns, review: &str, result: &str) -> u64 {
    sample(
        node,
        "podnat_http_auth_cache_total",
        &[("review", review), ("result", result)],
    )
}

fn refused(node: &Netns, reason: &str) -> u64 {
    sample(
        node,
        "podnat_http_requests_refused_total",
        &[("reason", reason)],
    )
}

/// A ServiceAccount in `READERS` and a fresh token for it (TokenRequest, as
/// the admin), as a kubelet would mount for Prometheus.
fn service_account_token(w: &World, name: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(w.admin.clone(), READERS);
    let exists = w.rt.block_on(api.get_opt(name)).expect("get sa").is_some();
    if !exists {
        let sa: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        w.rt.block_on(api.create(&PostParams::default(), &sa))
            .expect("create sa");
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let answer =
        w.rt.block_on(api.create_token_request(name, &PostParams::default(), &request))
            .expect("token request");
    answer.status.expect("token status").token
}

/// Binds the chart's metrics-reader ClusterRole (tests/fixtures/rbac.yaml,
/// the rendered chart) to `READERS/name`.
fn bind_metrics_reader(w: &World, name: &str) {
    let path = std::env::temp_dir().join(format!("podnat-reader-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
             metadata: {{name: {name}-reads-podnat}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: podnat-controller-metrics-reader}}\n\
             subjects: [{{kind: ServiceAccount, name: {name}, namespace: {READERS}}}]\n"
        ),
    )
    .expect("write binding");
    w.apply_yaml(path.to_str().expect("UTF-8 path"));
    let _ = std::fs::remove_file(&path);
}

/// A certificate and key for the node's public address, as a Secret would
/// hold them (made here with rcgen; the agent only reads the files).
fn certificate_files(dir: &Path) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["node1".to_string(), PUBLIC_IP.to_string()])
        .expect("certificate");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, made.cert.pem()).expect("write tls.crt");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write tls.key");
    (cert, key)
}

fn wait_http(node: &Netns) {
    wait_for("the HTTP endpoints", WAIT, || {
        plain(node, "127.0.0.1", "/ping").code == 200
    });
}

#[test]
fn remote_readers_need_tls_and_a_token_rbac_allows() {
    let w = World::new("hauth");
    let (node, client) = (&w.sandbox.node, &w.sandbox.client);
    w.create_namespace(READERS);
    let (cert, key) = certificate_files(&w.cluster.dir);
    let agent = w.start_agent(&[
        &format!("--tls-cert-file={}", cert.display()),
        &format!("-tlsPrivateKeyFile={}", key.display()),
    ]);
    agent.wait_first_sync();
    wait_http(node);

    // The probes: open, plain HTTP, from the client's address.
    assert_eq!(plain(client, PUBLIC_IP, "/healthz").code, 200);
    assert_eq!(plain(client, PUBLIC_IP, "/ready").code, 200);
    assert_eq!(plain(client, PUBLIC_IP, "/ping").body, "pong\n");

    // Loopback in the node: as before, no token.
    for path in ["/entries/list", "/metrics"] {
        assert_eq!(plain(node, "127.0.0.1", path).code, 200, "{path}");
    }

    // Remote, plain HTTP: refused with directions, token or not.
    for path in ["/entries/list", "/metrics", "/nowhere"] {
        let a = plain(client, PUBLIC_IP, path);
        assert_eq!(a.code, 403, "{path}: {a:?}");
        assert!(
            a.body.contains("https") && a.body.contains("bearer token"),
            "{a:?}"
        );
    }

    // Remote over TLS, the certificate verified against the files' one.
    let stranger = service_account_token(&w, "stranger");
    let forged = format!("{stranger}x");
    bind_metrics_reader(&w, "prometheus");
    let reader = service_account_token(&w, "prometheus");
    for path in ["/entries/list", "/metrics"] {
        let a = https(client, path, &cert, None);
        assert_eq!(a.code, 401, "{path} without a token: {a:?}");
        assert!(a.head.contains("www-authenticate: bearer"), "{a:?}");
        let a = https(client, path, &cert, Some(&forged));
        assert_eq!(a.code, 401, "{path} with a forged token: {a:?}");
        let a = https(client, path, &cert, Some(&stranger));
        assert_eq!(a.code, 403, "{path} for a user RBAC does not allow: {a:?}");
        assert!(
            a.body.contains("system:serviceaccount:monitoring:stranger"),
            "{a:?}"
        );
    }
    // The binding reaches the authorizer a moment after it is written.
    wait_for("the metrics-reader binding in the authorizer", WAIT, || {
        https(client, "/metrics", &cert, Some(&reader)).code == 200
    });
    let a = https(client, "/entries/list", &cert, Some(&reader));
    assert_eq!(a.code, 200, "{a:?}");
    let doc: serde_json::Value = serde_json::from_str(&a.body).expect("JSON");
    assert_eq!(doc["node"], "node1");
    let a = https(client, "/metrics", &cert, Some(&reader));
    assert!(a.body.contains("podnat_reconciles_total"), "{a:?}");
    // The reader role names two paths, not every path.
    assert_eq!(https(client, "/nowhere", &cert, Some(&reader)).code, 403);
    // TLS from the client, but not trusting that certificate: no answer.
    let a = curl(client, &format!("https://{PUBLIC_IP}:8484/healthz"), "");
    assert_eq!(
        (a.code, a.exit),
        (0, 60),
        "curl verifies against the system CAs: {a:?}"
    );

    // Refusals are counted by reason.
    assert!(refused(node, "plain_http") >= 3);
    assert!(refused(node, "no_token") >= 2);
    assert!(refused(node, "invalid_token") >= 2);
    assert!(refused(node, "forbidden") >= 3);

    // The cache: a new token scraped ten times costs one TokenReview.
    let fresh = service_account_token(&w, "prometheus");
    let (misses, hits) = (cache(node, "token", "miss"), cache(node, "token", "hit"));
    let access_misses = cache(node, "access", "miss");
    for _ in 0..10 {
        assert_eq!(https(client, "/metrics", &cert, Some(&fresh)).code, 200);
    }
    assert_eq!(
        cache(node, "token", "miss"),
        misses + 1,
        "TokenReviews sent"
    );
    assert_eq!(cache(node, "token", "hit"), hits + 9);
    // One SubjectAccessReview at most (none if the user is the cached one:
    // newer apiservers tell tokens apart by a credential id in `extra`).
    assert!(cache(node, "access", "miss") <= access_misses + 1);

    // The apiserver away: a token not reviewed yet gets 503, never 200;
    // loopback and the probes keep answering.
    let unseen = service_account_token(&w, "stranger");
    w.cluster.stop_apiserver();
    let a = https(client, "/metrics", &cert, Some(&unseen));
    assert_eq!(a.code, 503, "{a:?}");
    assert!(refused(node, "review_failed") >= 1);
    assert_eq!(plain(node, "127.0.0.1", "/entries/list").code, 200);
    assert_eq!(plain(client, PUBLIC_IP, "/healthz").code, 200);
    w.cluster.start_apiserver();
    drop(agent);
}

#[test]
fn self_signed_on_every_address_and_open_with_httpauth_false() {
    let w = World::new("hopen");
    let (node, client) = (&w.sandbox.node, &w.sandbox.client);

    // -httpaddress=:: serves both families; without files the certificate
    // is self-signed for the node's name and public address.
    let agent = w.start_agent(&["-httpaddress=::"]);
    wait_http(node);
    let san = client.sh(&format!(
        "openssl s_client -connect {PUBLIC_IP}:8484 </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
    ));
    for name in ["DNS:node1", &format!("IP Address:{PUBLIC_IP}")] {
        assert!(san.contains(name), "{name} in {san}");
    }
    let v6 = format!("[{PUBLIC_IP6}]");
    assert_eq!(plain(client, &v6, "/healthz").code, 200);
    assert_eq!(plain(client, &v6, "/metrics").code, 403);
    let a = curl(client, &format!("https://{v6}:8484/metrics"), "-k");
    assert_eq!(a.code, 401, "{a:?}");
    drop(agent);

    // -httpauth=false: open plain HTTP as before, no TLS at all.
    let agent = w.start_agent(&["-httpauth=false"]);
    wait_http(node);
    for path in ["/entries/list", "/metrics"] {
        assert_eq!(plain(client, PUBLIC_IP, path).code, 200, "{path}");
    }
    let a = curl(client, &format!("https://{PUBLIC_IP}:8484/metrics"), "-k");
    assert_eq!(a.code, 0, "no TLS without auth: {a:?}");
    let text = plain(node, "127.0.0.1", "/metrics").body;
    assert!(
        !text.contains("podnat_http_auth_cache"),
        "no access checks, no counters"
    );
    drop(agent);
}
