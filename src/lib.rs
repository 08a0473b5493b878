//! crmsync: main/remote synchronization of a contact database over NATS JetStream, with a
//! redb projection at every site.
//!
//! The modules follow the architecture (see ARCHITECTURE.md):
//! - the core, the crate `crmsync-core` (re-exported here): every decision, and no IO —
//!   [`names`], [`model`], [`date`], [`hlc`], [`routing`], [`query`], and the wire format,
//!   [`wire`] with [`schema`] for its JSON Schema documents;
//! - storage, the only module that knows redb: [`store`];
//! - transport, the only module that knows NATS: [`transport`], and [`natsd`] to run a server;
//! - the services: [`main_service`], [`remote_service`], with their HTTP APIs in [`http`], and
//!   [`supervise`], which restarts their long-running loops;
//! - the interfaces: [`cli`] (a client of the APIs, and `crmsync up`: everything on one
//!   machine) and [`bench`] (the benchmark);
//! - [`error`]: the error of a service operation; [`demo`]: generated demo data; [`files`]:
//!   data files and directories readable by their owner alone.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod error;
pub mod files;
pub mod http;
pub mod main_service;
pub mod natsd;
pub mod remote_service;
pub mod store;
pub mod supervise;
pub mod transport;

pub use crmsync_core::{date, hlc, model, names, query, routing, schema, wire};
