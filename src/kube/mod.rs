//! The Kubernetes edge: the client connection, pod objects in (watcher and
//! store), events out. Everything that talks to the apiserver lives here.

pub mod events;
pub mod ledger;
pub mod namespace;
pub mod pod;
pub mod store;
pub mod watch;

use std::path::{Path, PathBuf};

use ::kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use ::kube::Client;

/// Errors at the Kubernetes boundary.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes cluster to watch: not running in a pod, no --kubeconfig, no KUBECONFIG \
         and no ~/.kube/config; pass --kubeconfig FILE, or --pods-file FILE for one run \
         without a cluster (a JSON pod list, as `kubectl get pods -o json` prints)"
    )]
    NoCluster {
        /// Not a `#[source]`: its text repeats what the message says, in
        /// kube's words; it is logged at debug level instead.
        detail: Box<InferConfigError>,
    },
    #[error("cannot use kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("cannot build the Kubernetes client")]
    Client(#[source] ::kube::Error),
}

impl KubeError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            KubeError::NoCluster { .. } => "no_cluster",
            KubeError::Kubeconfig { .. } => "kubeconfig",
            KubeError::Client(_) => "client",
        }
    }
}

/// Where the client configuration came from, for the start-up log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--kubeconfig FILE`.
    Flag(PathBuf),
    /// kube's inference: KUBECONFIG or ~/.kube/config, else the pod's
    /// service account (in-cluster).
    Inferred,
}

/// Builds a client: `--kubeconfig` when given, else kube's `Config::infer`
/// (KUBECONFIG or ~/.kube/config, then the in-cluster service account — inside
/// a pod, where there is no kubeconfig, that is the service account). No
/// request is made here: an unreachable apiserver shows up in the watcher,
/// which retries.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<(Client, ConfigSource), KubeError> {
    let (config, source) = match kubeconfig {
        Some(path) => {
            let err = |source| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            let config = ::kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?;
            (config, ConfigSource::Flag(path.to_path_buf()))
        }
        None => {
            let config = ::kube::Config::infer().await.map_err(|e| {
                tracing::debug!(error = %e, "kube config inference failed");
                KubeError::NoCluster {
                    detail: Box::new(e),
                }
            })?;
            (config, ConfigSource::Inferred)
        }
    };
    tracing::info!(server = %config.cluster_url, source = ?source, "Kubernetes API");
    let client = Client::try_from(config).map_err(KubeError::Client)?;
    Ok((client, source))
}
