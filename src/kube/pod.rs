//! Kubernetes Pod objects → the planner's `PodFacts`. Pure, shared by the pod
//! watcher and the cluster-less `--pods-file` mode.

use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;

use crate::model::DualStack;
use crate::plan::PodFacts;

/// Extracts what the planner needs from a pod. `annotation_key` selects the
/// podnat annotation.
pub fn facts(pod: &Pod, annotation_key: &str) -> PodFacts {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    // `podIP` first, then `podIPs` (a dual-stack pod lists both families
    // there); the first address of each family counts.
    let ips: DualStack = status
        .and_then(|s| s.pod_ip.as_deref())
        .into_iter()
        .chain(
            status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.ip.as_str()),
        )
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    let phase = status.and_then(|s| s.phase.as_deref());
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    PodFacts {
        pod: super::watch::pod_ref(pod),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ips,
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        ready,
        terminating: meta.deletion_timestamp.is_some(),
        finished: matches!(phase, Some("Succeeded") | Some("Failed")),
        host_network: pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false),
        annotation: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation_key))
            .cloned(),
        // The namespace watch fills it in (`kube::namespace`).
        namespace_policy: Default::default(),
    }
}

/// Why a pods file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    #[error("cannot read pods file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pods file {path} is not a JSON pod list (kubectl get pods -o json): {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("pods file {path}: items[{index}] is not a pod: {source}")]
    Item {
        path: String,
        index: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a JSON pod list (`kubectl get pods -o json`), or a single pod.
pub fn read_pods_file(path: &Path) -> Result<Vec<Pod>, PodsFileError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PodsFileError::Read {
        path: p.clone(),
        source,
    })?;
    parse_pod_list(&text).map_err(|e| match e {
        ListError::Parse(source) => PodsFileError::Parse { path: p, source },
        ListError::Item(index, source) => PodsFileError::Item {
            path: p,
            index,
            source,
        },
    })
}

enum ListError {
    Parse(serde_json::Error),
    Item(usize, serde_json::Error),
}

fn parse_pod_list(text: &str) -> Result<Vec<Pod>, ListError> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(ListError::Parse)?;
    match doc.get("items").and_then(|i| i.as_array()) {
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| serde_json::from_value(v.clone()).map_err(|e| ListError::Item(i, e)))
            .collect(),
        None => serde_json::from_value(doc)
            .map(|p| vec![p])
            .map_err(ListError::Parse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodRef;
    use std::net::Ipv4Addr;

    #[test]
    fn facts_from_a_kubectl_pod_list() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
          {"metadata":{"name":"mx-0","namespace":"mail","creationTimestamp":"2026-01-02T03:04:05Z",
             "annotations":{"bln.space/podnat":"{\"entries\":[]}"}},
           "spec":{"nodeName":"node1","containers":[]},
           "status":{"phase":"Running","podIP":"10.1.0.5",
             "conditions":[{"type":"Ready","status":"True"}]}},
          {"metadata":{"name":"gone","namespace":"mail","deletionTimestamp":"2026-01-02T03:04:05Z"},
           "spec":{"containers":[]},"status":{"phase":"Succeeded","podIPs":[{"ip":"fd00::1"},{"ip":"10.1.0.9"}]}}
        ]}"#;
        let pods = match parse_pod_list(text) {
            Ok(p) => p,
            Err(_) => panic!("parse failed"),
        };
        let a = facts(&pods[0], "bln.space/podnat");
        assert_eq!(a.pod, PodRef::new("mail", "mx-0"));
        assert_eq!(a.node.as_deref(), Some("node1"));
        assert_eq!(a.ips.v4, Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert!(a.ready && !a.terminating && !a.finished);
        assert_eq!(a.annotation.as_deref(), Some("{\"entries\":[]}"));
        assert_eq!(a.created.unwrap().as_second(), 1767323045);
        let b = facts(&pods[1], "bln.space/podnat");
        assert!(b.terminating && b.finished && !b.ready);
        // Dual-stack: the IPv6 address listed first in podIPs counts too.
        assert_eq!(b.ips.v4, Some(Ipv4Addr::new(10, 1, 0, 9)));
        assert_eq!(b.ips.v6, Some("fd00::1".parse().unwrap()));
        assert_eq!(b.annotation, None);
        assert!(facts(&pods[0], "other/key").annotation.is_none());
    }
}
