//! What kube-proxy programs, as a controller-manager would have written it:
//! the Node object, Services with explicit ClusterIPs and their
//! EndpointSlices (the test apiserver has no EndpointSlice controller), and a
//! bounded, reversible churn of both. The endpoints are real: addresses on
//! pod B's interface (10.1.1.10–249), where the test runs a TCP echo server
//! on `TARGET_PORT`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::runtime::Runtime;

use super::netns::Netns;

/// Namespace of the Services (the agent's pods live elsewhere).
pub const SERVICE_NAMESPACE: &str = "svc";
pub const SERVICE_PORT: u16 = 80;
/// The port the endpoints answer on (pod B's echo server).
pub const TARGET_PORT: u16 = 8080;
/// Endpoint addresses on pod B: 10.1.1.10 ..= 10.1.1.249.
const ENDPOINT_ADDRESSES: u32 = 240;

/// Service `i`'s ClusterIP: 10.0.0.10 + i, inside the apiserver's
/// --service-cluster-ip-range 10.0.0.0/24 (so at most 240 Services).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    assert!(i < 240, "10.0.0.0/24 holds 240 test Services");
    Ipv4Addr::new(10, 0, 0, 10 + i as u8)
}

fn endpoint_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 1, 10 + (k as u32 % ENDPOINT_ADDRESSES) as u8)
}

/// Gives pod B (10.1.1.5/24 towards the node's 10.1.1.1) every endpoint
/// address, so that each one answers on the echo server's port.
pub fn add_endpoint_addresses(pod_b: &Netns) {
    let script: String = (0..ENDPOINT_ADDRESSES as usize)
        .map(|k| format!("addr add {}/24 dev eth0\n", endpoint_ip(k)))
        .collect();
    pod_b.sh(&format!("ip -batch - <<'EOF'\n{script}EOF"));
}

/// The Node kube-proxy runs as (`--hostname-override`), with `address` as
/// its InternalIP (kube-proxy takes its node IP and IP family from it).
pub fn create_node(rt: &Runtime, admin: &Client, name: &str, address: &str) {
    let api: Api<Node> = Api::all(admin.clone());
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
        .expect("node object");
    rt.block_on(api.create(&PostParams::default(), &node))
        .unwrap_or_else(|e| panic!("create node {name}: {e}"));
    let status = serde_json::json!({"status": {
        "addresses": [
            {"type": "InternalIP", "address": address},
            {"type": "Hostname", "address": name}
        ],
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    rt.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
        .unwrap_or_else(|e| panic!("status of node {name}: {e}"));
}

fn service(i: usize) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip(i).to_string(),
            "ports": [{"name": "http", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": TARGET_PORT}]
        }
    }))
    .expect("service object")
}

/// Service `i`'s endpoints: two addresses, plus a third while `extra`.
fn endpoints(i: usize, extra: bool) -> serde_json::Value {
    let count = if extra { 3 } else { 2 };
    let list: Vec<_> = (0..count)
        .map(|k| {
            serde_json::json!({
                "addresses": [endpoint_ip(2 * i + k).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node1"
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

fn slice(i: usize) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-a"), "labels": {
            "kubernetes.io/service-name": format!("svc-{i}"),
            "endpointslice.kubernetes.io/managed-by": "podnat-tests"
        }},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
        "endpoints": endpoints(i, false)
    }))
    .expect("endpointslice object")
}

/// The Services of the test namespace and their slices.
pub struct Services {
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    pub count: usize,
}

impl Services {
    /// Creates the namespace and `count` Services with their slices
    /// (32 requests in flight).
    pub fn create(rt: &Runtime, admin: &Client, count: usize) -> Services {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": SERVICE_NAMESPACE}}))
                .expect("namespace object");
        rt.block_on(Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns))
            .expect("create the services' namespace");
        let s = Services {
            services: Api::namespaced(admin.clone(), SERVICE_NAMESPACE),
            slices: Api::namespaced(admin.clone(), SERVICE_NAMESPACE),
            count,
        };
        rt.block_on(futures::stream::iter(0..count).for_each_concurrent(32, |i| s.create_one(i)));
        s
    }

    async fn create_one(&self, i: usize) {
        // A just-deleted Service's ClusterIP is released a moment later:
        // retry the create while the address is still taken.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .services
                .create(&PostParams::default(), &service(i))
                .await
            {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("create svc-{i}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create svc-{i}: {e}"),
            }
        }
        self.slices
            .create(&PostParams::default(), &slice(i))
            .await
            .unwrap_or_else(|e| panic!("create slice of svc-{i}: {e}"));
    }

    async fn delete_one(&self, i: usize) {
        let dp = DeleteParams::default();
        self.slices
            .delete(&format!("svc-{i}-a"), &dp)
            .await
            .unwrap_or_else(|e| panic!("delete slice of svc-{i}: {e}"));
        self.services
            .delete(&format!("svc-{i}"), &dp)
            .await
            .unwrap_or_else(|e| panic!("delete svc-{i}: {e}"));
    }

    async fn set_extra_endpoint(&self, i: usize, extra: bool) {
        let patch = serde_json::json!({"endpoints": endpoints(i, extra)});
        self.slices
            .patch(
                &format!("svc-{i}-a"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("endpoints of svc-{i}: {e}"));
    }

    /// `rate` changes per second for `duration`, then on to the end of
    /// the cycle, so that the Services and slices end exactly as they began.
    /// A cycle of four: an endpoint added to one Service, another Service
    /// deleted (with its slice), the endpoint removed, the Service created
    /// again with its ClusterIP. Service 0 is left alone (traffic checks
    /// use it). Returns the number of changes made.
    pub fn churn(&self, rt: &Runtime, duration: Duration, rate: u32) -> usize {
        assert!(self.count >= 3, "churn needs Services besides svc-0");
        let period = Duration::from_secs(1) / rate.max(1);
        let others = self.count - 1;
        let start = Instant::now();
        let mut changes = 0;
        while start.elapsed() < duration || changes % 4 != 0 {
            let cycle = changes / 4;
            let a = 1 + (cycle * 37) % others;
            let mut b = 1 + (cycle * 53 + 11) % others;
            if b == a {
                b = 1 + b % others;
            }
            rt.block_on(async {
                match changes % 4 {
                    0 => self.set_extra_endpoint(a, true).await,
                    1 => self.delete_one(b).await,
                    2 => self.set_extra_endpoint(a, false).await,
                    _ => self.create_one(b).await,
                }
            });
            changes += 1;
            let next = start + period * changes as u32;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        changes
    }
}

/// Service `i`'s ClusterIP and port, as a client connects to it.
pub fn service_address(i: usize) -> SocketAddr {
    SocketAddr::from((cluster_ip(i), SERVICE_PORT))
}
