//! The `configmap` flavor: ConfigMap `podnat-controller-<node>` (the node's
//! first label, as the Go version named it), key `state.json`, in the agent's
//! own namespace — the only place its RBAC lets it write ConfigMaps.

use std::path::Path;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};

use super::{StateError, StateStore};
use crate::config::short_node_name;

/// The key of the record in the ConfigMap's data.
pub const KEY: &str = "state.json";

/// Where a pod's service account token mount says its namespace is.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The Go version's namespace when `NAMESPACE` was not set.
pub const DEFAULT_NAMESPACE: &str = "podnat-controller-system";

/// Field manager of the agent's server-side applies.
const FIELD_MANAGER: &str = "podnat-controller";

/// The agent's namespace and where it came from: env `NAMESPACE` (what the
/// Go version read, so its chart values keep working), else `POD_NAMESPACE`
/// (the downward API's usual name), else the service account's namespace
/// file, else the Go version's default.
pub fn agent_namespace(
    env: impl Fn(&str) -> Option<String>,
    service_account_file: &Path,
) -> (String, &'static str) {
    for var in ["NAMESPACE", "POD_NAMESPACE"] {
        if let Some(ns) = env(var)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
        {
            return (ns, var);
        }
    }
    if let Ok(text) = std::fs::read_to_string(service_account_file) {
        let ns = text.trim();
        if !ns.is_empty() {
            return (ns.to_string(), "service account");
        }
    }
    (DEFAULT_NAMESPACE.to_string(), "default")
}

/// The record's ConfigMap name for a node (full or short name).
pub fn configmap_name(node_id: &str) -> String {
    format!("podnat-controller-{}", short_node_name(node_id))
}

pub struct ConfigMapStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl ConfigMapStore {
    pub fn new(client: ::kube::Client, namespace: impl Into<String>, node_id: &str) -> Self {
        let namespace = namespace.into();
        ConfigMapStore {
            api: Api::namespaced(client, &namespace),
            name: configmap_name(node_id),
            namespace,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn error(&self, source: ::kube::Error) -> StateError {
        StateError::Kube {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }
}

impl StateStore for ConfigMapStore {
    fn flavor(&self) -> &'static str {
        "configmap"
    }

    fn location(&self) -> String {
        format!("ConfigMap {}/{} key {KEY}", self.namespace, self.name)
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<String>, StateError>> {
        Box::pin(async move {
            let cm = self
                .api
                .get_opt(&self.name)
                .await
                .map_err(|e| self.error(e))?;
            Ok(cm.and_then(|cm| cm.data).and_then(|mut d| d.remove(KEY)))
        })
    }

    fn save<'a>(&'a self, json: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            // Server-side apply: one request whether the ConfigMap exists or
            // not, no read-modify-write race, and keys other managers own stay.
            // Forced, so a ConfigMap the Go version wrote is taken over.
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
                },
                "data": { KEY: json },
            });
            self.api
                .patch(
                    &self.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cm),
                )
                .await
                .map_err(|e| self.error(e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn namespace_from_env_then_service_account_then_default() {
        let dir = std::env::temp_dir().join(format!("podnat-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sa = dir.join("namespace");
        std::fs::write(&sa, "from-sa\n").unwrap();
        let none = dir.join("missing");

        let both = env(&[("NAMESPACE", "ns-go"), ("POD_NAMESPACE", "ns-pod")]);
        assert_eq!(agent_namespace(both, &sa), ("ns-go".into(), "NAMESPACE"));
        let pod = env(&[("NAMESPACE", " "), ("POD_NAMESPACE", "ns-pod")]);
        assert_eq!(
            agent_namespace(pod, &sa),
            ("ns-pod".into(), "POD_NAMESPACE")
        );
        assert_eq!(
            agent_namespace(env(&[]), &sa),
            ("from-sa".into(), "service account")
        );
        assert_eq!(
            agent_namespace(env(&[]), &none),
            ("podnat-controller-system".into(), "default")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn named_after_the_short_node_name() {
        assert_eq!(
            configmap_name("node1.example.org"),
            "podnat-controller-node1"
        );
        assert_eq!(configmap_name("node1"), "podnat-controller-node1");
    }
}
