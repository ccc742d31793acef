//! The test cluster (tests/cluster, issue 6) as the agent will use it: a real
//! kube-apiserver with RBAC, reached through kube-rs with the admin and the
//! agent kubeconfigs. There is no kubelet, so the test writes pod status
//! through the status subresource itself, as a kubelet would.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use support::cluster::TestCluster;

const AGENT_USER: &str = "system:serviceaccount:podnat-system:podnat-controller";

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig → client config");
    Client::try_from(config).expect("client")
}

fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("test object deserializes")
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// Is the process there and not a zombie? (The cluster's processes are
/// orphans once `up` exits; whoever adopts them reaps them in its own time.)
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The status a kubelet writes once the pod runs.
fn running_status(ip: &str) -> serde_json::Value {
    serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_status_watch_and_rbac_on_a_real_apiserver() {
    let cluster = TestCluster::up();
    let admin = client(&cluster.admin_kubeconfig).await;
    let agent = client(&cluster.agent_kubeconfig).await;

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &json(serde_json::json!({"metadata": {"name": "mail"}})),
        )
        .await
        .expect("create namespace");

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "mail");
    let pod: Pod = json(serde_json::json!({
        "metadata": {"name": "mx-0", "annotations": {"bln.space/podnat": "{\"entries\":[{\"srcPort\":25,\"dstPort\":25}]}"}},
        "spec": {"nodeName": "node1", "containers": [{"name": "mx", "image": "example.invalid/mx"}]}
    }));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    // A pod on another node: the field selector must leave it out.
    let other: Pod = json(serde_json::json!({
        "metadata": {"name": "elsewhere"},
        "spec": {"nodeName": "node2", "containers": [{"name": "c", "image": "example.invalid/c"}]}
    }));
    pods.create(&PostParams::default(), &other)
        .await
        .expect("create pod on node2");

    // Watch this node's pods from here on, starting at the current version.
    let listed = pods
        .list(&ListParams::default().fields("spec.nodeName=node1"))
        .await
        .expect("list by node");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        vec!["mx-0"]
    );
    let version = listed.metadata.resource_version.expect("list version");
    let mut stream = pods
        .watch(
            &WatchParams::default().fields("spec.nodeName=node1"),
            &version,
        )
        .await
        .expect("start watch")
        .boxed();

    // The kubelet's part: status through the status subresource.
    pods.patch_status(
        "mx-0",
        &PatchParams::default(),
        &Patch::Merge(&running_status("10.1.0.5")),
    )
    .await
    .expect("patch status");
    let back = pods.get("mx-0").await.expect("get pod");
    let status = back.status.expect("status written");
    assert_eq!(status.pod_ip.as_deref(), Some("10.1.0.5"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert!(status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"));

    let modified = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.try_next().await.expect("watch stream") {
            match ev {
                WatchEvent::Modified(p) => return p,
                WatchEvent::Error(e) => panic!("watch error: {e:?}"),
                _ => {}
            }
        }
        panic!("watch ended before the status update arrived");
    })
    .await
    .expect("status update arrives on the watch");
    assert_eq!(modified.metadata.name.as_deref(), Some("mx-0"));
    assert_eq!(
        modified.status.and_then(|s| s.pod_ip).as_deref(),
        Some("10.1.0.5")
    );

    // RBAC: the agent has no permissions until they are granted.
    let agent_pods: Api<Pod> = Api::all(agent.clone());
    let err = agent_pods
        .list(&ListParams::default())
        .await
        .expect_err("agent lists pods without RBAC");
    assert!(is_forbidden(&err), "expected 403, got {err:?}");

    let roles: Api<ClusterRole> = Api::all(admin.clone());
    roles
        .create(
            &PostParams::default(),
            &json(serde_json::json!({
                "metadata": {"name": "podnat-test-pods"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
            })),
        )
        .await
        .expect("create ClusterRole");
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    bindings
        .create(
            &PostParams::default(),
            &json(serde_json::json!({
                "metadata": {"name": "podnat-test-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podnat-test-pods"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": AGENT_USER}]
            })),
        )
        .await
        .expect("create ClusterRoleBinding");

    // The authorizer's cache follows the binding within moments; poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        match agent_pods
            .list(&ListParams::default().fields("spec.nodeName=node1"))
            .await
        {
            Ok(l) => break l,
            Err(e) if is_forbidden(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("agent still cannot list pods: {e:?}"),
        }
    };
    assert_eq!(listed.items.len(), 1);
    // Watching is granted too.
    let mut agent_watch = agent_pods
        .watch(
            &WatchParams::default().fields("spec.nodeName=node1"),
            listed.metadata.resource_version.as_deref().unwrap_or("0"),
        )
        .await
        .expect("agent may watch pods")
        .boxed();

    // But nothing else.
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "default");
    let err = secrets
        .list(&ListParams::default())
        .await
        .expect_err("agent reads secrets");
    assert!(is_forbidden(&err), "expected 403, got {err:?}");

    // The agent's watch sees the pod go away (a pod bound to a node without a
    // kubelet is removed only by a delete with grace period 0).
    pods.delete("mx-0", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = agent_watch.try_next().await.expect("agent watch") {
            if let WatchEvent::Deleted(p) = ev {
                assert_eq!(p.metadata.name.as_deref(), Some("mx-0"));
                return;
            }
        }
        panic!("agent watch ended before the delete arrived");
    })
    .await
    .expect("delete arrives on the agent's watch");
    drop(agent_watch);
    drop(stream);

    // Teardown: the processes are gone and the port no longer listens.
    let pids: Vec<u32> = std::fs::read_to_string(cluster.dir.join("pids"))
        .expect("pids file")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert!(
        pids.len() >= 2,
        "etcd and kube-apiserver recorded: {pids:?}"
    );
    let addr: SocketAddr = cluster
        .server
        .trim_start_matches("https://")
        .parse()
        .expect("server is https://127.0.0.1:PORT");
    let dir = cluster.dir.clone();
    drop(cluster);
    for pid in &pids {
        assert!(!running(*pid), "pid {pid} survived the teardown");
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "{addr} still accepts connections"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
