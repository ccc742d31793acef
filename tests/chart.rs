//! The Helm chart (charts/podnat-controller) with a real helm — built from
//! helm.sh/helm/v3 by tests/helm/build — and a real kube-apiserver:
//! `helm lint`, `helm template`, a server-side dry run of every rendered
//! object (the apiserver validates and defaults them, stores nothing), RBAC
//! equal to tests/fixtures/rbac.yaml (the rules the agent tests run with),
//! and old Go-chart values rendering to args the binary accepts.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DynamicObject, GroupVersionKind, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::Value;
use support::cluster::TestCluster;
use support::netns::Netns;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/podnat-controller");
const NAMESPACE: &str = "podnat-system";

/// tests/helm/bin/helm, built first if needed (idempotent; a cold build
/// takes minutes: `make helm-build` does it ahead).
fn helm() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm");
    let out = Command::new(dir.join("build"))
        .output()
        .expect("run tests/helm/build");
    assert!(
        out.status.success(),
        "tests/helm/build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("bin/helm")
}

fn run_helm(args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("podnat-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("podnat-helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("podnat-helm/data"),
        )
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// `helm template podnat CHART -n podnat-system EXTRA...`, as objects.
fn template(extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "podnat", CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    documents(&run_helm(&args))
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == k)
        .unwrap_or_else(|| panic!("no {k} rendered"))
}

fn container(objects: &[Value]) -> &Value {
    &find(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

fn args(objects: &[Value]) -> Vec<String> {
    container(objects)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

#[test]
fn chart_lints_strictly() {
    let out = run_helm(&["lint", "--strict", CHART]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // Also with the values of an old Go-version install.
    let values = format!(
        "{}/tests/fixtures/go-chart-values.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    run_helm(&["lint", "--strict", CHART, "-f", &values]);
}

#[test]
fn daemonset_runs_on_the_host_network_with_net_admin_only() {
    let objects = template(&[]);
    let kinds: Vec<&str> = objects.iter().map(kind).collect();
    assert_eq!(
        kinds,
        vec![
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "DaemonSet"
        ]
    );
    let ds = find(&objects, "DaemonSet");
    // The Go chart's selector (immutable in Kubernetes): `helm upgrade` from
    // it must not need the DaemonSet deleted.
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_json::json!({"app.kubernetes.io/name": "podnat-podnat-controller"})
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "podnat-podnat-controller"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], "podnat-podnat-controller");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let c = container(&objects);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        env,
        vec![
            ("NODE_NAME", "spec.nodeName"),
            ("POD_NAMESPACE", "metadata.namespace")
        ]
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["ports"][0]["containerPort"], 8484);
    assert!(c["resources"]["requests"]["memory"].is_string());
    // This project's image as `make image` names it, tagged with the
    // chart's appVersion, which is the crate's version.
    assert_eq!(
        c["image"],
        format!("podnat-controller:{}", env!("CARGO_PKG_VERSION"))
    );
    // The Go chart always passed -logtostderr.
    assert_eq!(args(&objects), vec!["-logtostderr"]);
}

#[test]
fn security_values_become_flags() {
    let objects = template(&[
        "--set",
        "namespaceSelector=podnat.bln.space/publish in (true)",
        "--set",
        "guardNodePorts=false",
    ]);
    assert_eq!(
        args(&objects),
        vec![
            "-namespaceselector=podnat.bln.space/publish in (true)",
            "-guardnodeports=false",
            "-logtostderr"
        ]
    );
    // The defaults pass neither: the agent's own defaults (all namespaces,
    // guard on) apply.
    assert_eq!(args(&template(&[])), vec!["-logtostderr"]);
}

#[test]
fn image_digest_pins_the_image() {
    let digest = format!("sha256:{}", "ab12".repeat(16));
    let objects = template(&["--set", &format!("image.digest={digest}")]);
    assert_eq!(
        container(&objects)["image"],
        format!("podnat-controller@{digest}")
    );
    let objects = template(&[
        "--set",
        "image.repository=registry.example.org/podnat-controller",
        "--set",
        "image.tag=9.9.9",
    ]);
    assert_eq!(
        container(&objects)["image"],
        "registry.example.org/podnat-controller:9.9.9"
    );
}

#[test]
fn extra_args_are_appended_as_the_go_chart_did() {
    let objects = template(&[
        "--set",
        "extraArgs={-firewallflavor=nftables,-logtostderr,-v=2}",
    ]);
    // The list, then -logtostderr, duplicates removed (uniq keeps the first).
    assert_eq!(
        args(&objects),
        vec!["-firewallflavor=nftables", "-logtostderr", "-v=2"]
    );

    // Another HTTP port moves the flag, the container port and the probes.
    let objects = template(&["--set", "httpPort=9090"]);
    assert_eq!(args(&objects), vec!["-httpport=9090", "-logtostderr"]);
    assert_eq!(container(&objects)["ports"][0]["containerPort"], 9090);
    // ... unless extraArgs sets it already (the flag may be given once);
    // the same for httpAuth=false and -httpauth.
    for (value, flag) in [
        ("httpPort=9090", "-httpPort=9090"),
        ("httpAuth=false", "-httpAuth=false"),
    ] {
        let extra = format!("extraArgs={{{flag}}}");
        let objects = template(&["--set", value, "--set", &extra]);
        assert_eq!(args(&objects), vec![flag, "-logtostderr"]);
    }
}

/// The values file of an install of the Go version renders args that the
/// binary accepts (it runs them once against a pods file, in a network
/// namespace of its own, as a dry run).
#[test]
fn old_go_chart_values_render_args_the_binary_accepts() {
    let values = format!(
        "{}/tests/fixtures/go-chart-values.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let objects = template(&["-f", &values]);
    let args = args(&objects);
    assert_eq!(
        args,
        vec![
            "-logtostderr",
            "-firewallflavor=iptables",
            "-iptablesJump=-2,-2,-2",
            "-informerResync=180",
            "-stateflavor=configmap",
            "-v=2"
        ]
    );
    assert_eq!(
        container(&objects)["image"],
        "registry.example.org/podnat-controller:0.0.31"
    );
    // Old values replace the capability list they set and keep the rest.
    let sc = &container(&objects)["securityContext"];
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(sc["privileged"], false);

    let ns = Netns::new("chart");
    let pods = format!(
        "{}/tests/fixtures/mail-pods.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = ns
        .command(env!("CARGO_BIN_EXE_podnat-controller"))
        .args(&args)
        .args([
            "-dryrun",
            "-nodeid",
            "node1",
            "--public-address",
            "203.0.113.7",
        ])
        .arg("--pods-file")
        .arg(&pods)
        .output()
        .expect("run the agent");
    assert!(
        out.status.success(),
        "the chart's args were refused ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("-j DNAT --to-destination 10.1.0.5:25"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn annotations(objects: &[Value]) -> &Value {
    &find(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
}

fn named<'a>(objects: &'a [Value], k: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == k && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {k} {name} rendered"))
}

/// The agent's ClusterRole grants the reviews exactly when httpAuth is on.
fn grants_reviews(objects: &[Value]) -> bool {
    let role = named(objects, "ClusterRole", "podnat-podnat-controller");
    let rules = role["rules"].as_array().expect("rules");
    let grants = |group: &str, resource: &str| {
        rules.iter().any(|r| {
            r["apiGroups"] == serde_json::json!([group])
                && r["resources"] == serde_json::json!([resource])
                && r["verbs"] == serde_json::json!(["create"])
        })
    };
    let token = grants("authentication.k8s.io", "tokenreviews");
    assert_eq!(
        token,
        grants("authorization.k8s.io", "subjectaccessreviews"),
        "both reviews or neither"
    );
    token
}

#[test]
fn http_auth_values_render_flags_rbac_tls_and_scrape_annotations() {
    // Default: auth on, a self-signed certificate (no flag, no volume),
    // scraped over https, the reviews granted, the reader role shipped.
    let objects = template(&[]);
    assert_eq!(args(&objects), vec!["-logtostderr"]);
    assert_eq!(annotations(&objects)["prometheus.io/scheme"], "https");
    assert_eq!(annotations(&objects)["prometheus.io/path"], "/metrics");
    assert!(grants_reviews(&objects));
    let reader = named(
        &objects,
        "ClusterRole",
        "podnat-podnat-controller-metrics-reader",
    );
    assert_eq!(
        reader["rules"],
        serde_json::json!([{"nonResourceURLs": ["/metrics", "/entries/list"], "verbs": ["get"]}])
    );
    assert!(container(&objects)["volumeMounts"].is_null());
    // The probes stay plain HTTP: the agent leaves /healthz and /ready open.
    assert!(container(&objects)["livenessProbe"]["httpGet"]["scheme"].is_null());

    // A certificate from a Secret: mounted read-only, passed as the files.
    let objects = template(&["--set", "tls.secretName=podnat-tls"]);
    assert_eq!(
        args(&objects),
        vec![
            "--tls-cert-file=/etc/podnat-controller/tls/tls.crt",
            "--tls-private-key-file=/etc/podnat-controller/tls/tls.key",
            "-logtostderr"
        ]
    );
    let pod = &find(&objects, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        serde_json::json!([{"name": "tls", "secret": {"secretName": "podnat-tls"}}])
    );
    assert_eq!(
        container(&objects)["volumeMounts"],
        serde_json::json!([{"name": "tls", "mountPath": "/etc/podnat-controller/tls", "readOnly": true}])
    );

    // Auth off: the flag, plain scraping, no reviews granted, no TLS files
    // (the agent refuses them without auth).
    let objects = template(&["--set", "httpAuth=false,tls.secretName=podnat-tls"]);
    assert_eq!(args(&objects), vec!["-httpauth=false", "-logtostderr"]);
    assert!(annotations(&objects)["prometheus.io/scheme"].is_null());
    assert!(!grants_reviews(&objects));
    assert!(find(&objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"].is_null());
}

#[test]
fn service_monitor_scrapes_over_https_with_a_bearer_token() {
    let kinds = |objects: &[Value]| {
        objects
            .iter()
            .map(|o| kind(o).to_string())
            .collect::<Vec<_>>()
    };
    assert!(!kinds(&template(&[])).contains(&"ServiceMonitor".to_string()));

    let objects = template(&["--set", "metrics.serviceMonitor.enabled=true"]);
    let service = find(&objects, "Service");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(
        service["spec"]["selector"],
        find(&objects, "DaemonSet")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 8484);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let monitor = find(&objects, "ServiceMonitor");
    // The monitor selects the Service by its labels.
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "label {k}");
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(
        endpoint["bearerTokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert_eq!(
        endpoint["tlsConfig"],
        serde_json::json!({"insecureSkipVerify": true})
    );

    // With a CA the certificate is verified, against the given name.
    let objects = template(&[
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.caSecret.name=podnat-ca",
        "--set",
        "metrics.serviceMonitor.serverName=podnat.example.org,metrics.serviceMonitor.labels.release=prom",
    ]);
    let monitor = find(&objects, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["tlsConfig"],
        serde_json::json!({"ca": {"secret": {"name": "podnat-ca", "key": "ca.crt"}},
            "serverName": "podnat.example.org"})
    );

    // Auth off: plain HTTP, no token.
    let objects = template(&[
        "--set",
        "metrics.serviceMonitor.enabled=true,httpAuth=false",
    ]);
    let endpoint = &find(&objects, "ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "http");
    assert!(endpoint["bearerTokenFile"].is_null() && endpoint["tlsConfig"].is_null());
}

/// Objects by (kind, name), labels dropped (the fixture has none).
fn without_labels(mut objects: Vec<Value>) -> Vec<Value> {
    for o in &mut objects {
        if let Some(m) = o["metadata"].as_object_mut() {
            m.remove("labels");
        }
    }
    objects.sort_by_key(|o| (kind(o).to_string(), o["metadata"]["name"].to_string()));
    objects
}

#[test]
fn rendered_rbac_equals_the_fixture_the_agent_tests_run_with() {
    let rendered = without_labels(template(&[
        "--set",
        "fullnameOverride=podnat-controller",
        "--show-only",
        "templates/rbac.yaml",
    ]));
    let fixture = std::fs::read_to_string(format!(
        "{}/tests/fixtures/rbac.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("rbac fixture");
    let fixture = without_labels(documents(&fixture));
    assert_eq!(rendered.len(), 5);
    assert_eq!(
        serde_json::to_string_pretty(&rendered).unwrap(),
        serde_json::to_string_pretty(&fixture).unwrap()
    );
    // And the service account they bind is the one the chart creates.
    let sa = template(&["--set", "fullnameOverride=podnat-controller"]);
    let sa = find(&sa, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "podnat-controller");
    assert_eq!(sa["metadata"]["namespace"], NAMESPACE);
}

fn admin(rt: &tokio::runtime::Runtime, cluster: &TestCluster) -> Client {
    rt.block_on(async {
        let kc = Kubeconfig::read_from(&cluster.admin_kubeconfig).expect("admin kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("admin config");
        Client::try_from(config).expect("admin client")
    })
}

/// Creates `obj` with `?dryRun=All`: the apiserver runs validation,
/// defaulting and admission, and stores nothing.
fn dry_run_create(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    obj: &Value,
) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(obj.clone()).expect("a Kubernetes object");
    let types = obj.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("group/version/kind");
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let pp = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    rt.block_on(api.create(&pp, &obj))
}

#[test]
fn rendered_manifests_pass_a_server_side_dry_run() {
    let cluster = TestCluster::up();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = admin(&rt, &cluster);
    // `helm install --create-namespace` creates it for real.
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}})).unwrap();
    rt.block_on(Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns))
        .expect("create the namespace");

    let go_values = format!(
        "{}/tests/fixtures/go-chart-values.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    for extra in [
        vec![],
        vec!["-f", go_values.as_str()],
        vec!["--set", "serviceAccount.name=agent,httpPort=9090"],
        vec![
            "--set",
            "tls.secretName=podnat-tls,metrics.serviceMonitor.enabled=true",
        ],
        vec!["--set", "httpAuth=false"],
    ] {
        // The test apiserver has no prometheus-operator CRDs: the
        // ServiceMonitor is checked by shape above, not here.
        for obj in template(&extra)
            .into_iter()
            .filter(|o| kind(o) != "ServiceMonitor")
        {
            let created = dry_run_create(&rt, &client, &obj).unwrap_or_else(|e| {
                panic!(
                    "the apiserver refused {} {} (values {extra:?}): {e}",
                    kind(&obj),
                    obj["metadata"]["name"]
                )
            });
            // Defaulted by the server, so it went through validation.
            assert!(created.metadata.creation_timestamp.is_some());
            if kind(&obj) == "DaemonSet" {
                let spec = &created.data["spec"]["template"]["spec"];
                assert_eq!(spec["restartPolicy"], "Always", "server defaults applied");
            }
        }
    }

    // Nothing was stored...
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "DaemonSet"));
    let list = rt
        .block_on(
            Api::<DynamicObject>::namespaced_with(client.clone(), NAMESPACE, &ar)
                .list(&Default::default()),
        )
        .expect("list daemonsets");
    assert!(list.items.is_empty(), "a dry run stored a DaemonSet");

    // ...and the dry run does validate: an out-of-range port is refused.
    let bad = template(&["--set", "httpPort=70000"]);
    let err = dry_run_create(&rt, &client, find(&bad, "DaemonSet"))
        .expect_err("a DaemonSet with containerPort 70000 must be refused");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "expected 422 Invalid, got {err}"
    );
}
