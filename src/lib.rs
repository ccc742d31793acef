//! podnat-controller: direct DNAT/SNAT on the node's public IPv4 for annotated
//! pods, programmed natively through nf_tables netlink batches.

pub mod annotation;
pub mod coalesce;
pub mod config;
pub mod firewall;
pub mod http;
pub mod kube;
pub mod metrics;
pub mod model;
pub mod net;
pub mod plan;
pub mod reconcile;
pub mod state;
pub mod status;
