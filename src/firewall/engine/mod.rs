//! The engine: one applier drives every flavor (generation, cache, retries,
//! echoes), on its own thread, woken by nf_tables notifications; around it
//! the forward-drop check and the conntrack flush after a commit.

pub(crate) mod applier;
pub(crate) mod cache;
pub mod coexist;
pub(crate) mod conntrack;
pub mod monitor;
pub(crate) mod worker;
