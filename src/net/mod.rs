//! The node's own network as the agent needs it, read through netlink:
//! which addresses are the public ones (rtnetlink), when that changes, and
//! which ports the node itself serves (sock_diag).

pub mod address;
pub mod dump;
pub mod sockets;
