//! The integration tests: one binary, each test against its own real nats-server (a free
//! port, a temporary store), real redb files, and the services' real HTTP APIs.

mod harness;

mod api;
mod bench;
mod chaos;
mod cluster;
mod durability;
mod edits;
mod hostile;
mod lifecycle;
mod offline;
mod pipeline;
mod rebuild;
mod resilience;
mod schedule;
mod security;
mod sets;
mod wire;
