//! The wire: nf_tables netlink messages, batches and attributes, and the
//! native expressions both flavors' rules are made of.

pub(crate) mod encode;
pub mod netlink;
pub(crate) mod udata;
