#![allow(dead_code)]
//! Test helpers: throw-away network namespaces and a real test cluster.

pub mod cluster;
pub mod netns;
pub mod rootfs;
pub mod save;
pub mod traffic;
