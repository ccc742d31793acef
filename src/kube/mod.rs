//! The Kubernetes edge: pod objects in, events out.

pub mod pod;
