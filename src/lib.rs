//! Facade over the Samverkan crates, so that the cross-crate tests in `tests/`
//! and the programs in `examples/` can use everything through one dependency.

pub mod playout;

pub use samverkan_net as net;
pub use samverkan_node as node;
pub use samverkan_relay as relay;
pub use samverkan_shared as shared;
pub use samverkan_store as store;
