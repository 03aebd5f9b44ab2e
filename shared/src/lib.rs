//! Runtime-free pieces that both planes use: the config schema and its validated routing
//! table, the request classifier, OpenAI request views, usage events and the error taxonomy.
//! Must not: do I/O on sockets or depend on an async runtime.

pub mod cache_key;
pub mod category;
pub mod classifier;
pub mod config;
pub mod error;
pub mod needle;
pub mod openai;
pub mod routing;
pub mod usage;
