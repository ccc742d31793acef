#![allow(dead_code)]
//! Test helpers: throw-away network namespaces, a real test cluster, and a
//! real kube-proxy with the Services it programs.

pub mod agent_view;
pub mod cluster;
pub mod crowd;
pub mod kube_proxy;
pub mod netns;
pub mod oci;
pub mod rules;
pub mod ruleset;
pub mod save;
pub mod services;
pub mod traffic;
