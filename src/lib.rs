//! crmsync: main/remote synchronization of a contact database over NATS JetStream, with a
//! redb projection at every site.
//!
//! The modules follow the architecture (see ARCHITECTURE.md):
//! - the core, the crate `crmsync-core` (re-exported here): every decision, and no IO —
//!   [`names`], [`model`], [`date`], [`hlc`], [`routing`], [`query`], and the wire format,
//!   [`wire`] with [`schema`] for its JSON Schema documents and [`bundle`] for a remote's set-up file;
//! - storage, the only module that knows redb: [`store`];
//! - transport, the only module that knows NATS: [`transport`], and [`natsd`] to run a server;
//! - the services: [`main_service`], [`remote_service`], with their HTTP APIs in [`http`], and
//!   [`supervise`], which restarts their long-running loops;
//! - [`error`]: the error of a service operation; [`files`]: data files and directories
//!   readable by their owner alone.
//!
//! The command line, the benchmark and the demo data are the binary's (`src/main.rs`), not
//! the library's: they are clients of the engine, through its APIs and these modules.

pub mod error;
pub mod files;
pub mod http;
pub mod main_service;
pub mod natsd;
pub mod remote_service;
pub mod store;
pub mod supervise;
pub mod transport;

pub use crmsync_core::{apply, bundle, date, hlc, merge, model, names, outgoing, query, routing, schema, wire};
