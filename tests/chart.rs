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
    // ... unless extraArgs sets it already (the flag may be given once).
    let objects = template(&[
        "--set",
        "httpPort=9090",
        "--set",
        "extraArgs={-httpPort=9090}",
    ]);
    assert_eq!(args(&objects), vec!["-httpPort=9090", "-logtostderr"]);
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
    assert_eq!(rendered.len(), 4);
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
    ] {
        for obj in template(&extra) {
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
