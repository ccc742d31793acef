#![allow(dead_code)]
//! Test helpers: throw-away network namespaces and a real test cluster.

pub mod cluster;
pub mod crowd;
pub mod netns;
pub mod rootfs;
pub mod rules;
pub mod save;
pub mod traffic;
