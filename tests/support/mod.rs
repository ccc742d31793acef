#![allow(dead_code)]
//! Test helpers: throw-away network namespaces, a real test cluster, and a
//! real kube-proxy with the Services it programs.

pub mod agent_view;
pub mod cluster;
pub mod kube_proxy;
pub mod netns;
pub mod ruleset;
pub mod services;
pub mod traffic;
