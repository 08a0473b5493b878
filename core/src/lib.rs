//! The core of crmsync: every decision the engine makes, and no IO.
//!
//! This crate depends on no runtime, no storage and no network (its `Cargo.toml` is the
//! proof). The services fetch the facts a decision needs, call it here, and carry out the plan
//! it returns:
//! - [`names`], [`model`] (records and fields), [`date`], [`hlc`]: the data;
//! - [`query`]: the set query language; [`assign`]: the command line's `FIELD=VALUE` pairs;
//! - [`merge`]: stamps, newest-stamp-wins merging, and what the main accepts from a remote;
//! - [`routing`]: which targets hold a record, and what a change makes enter or leave them;
//! - [`access`]: who may do what through the APIs (roles), and see which records;
//! - [`apply`]: what a remote does with a message from the main;
//! - [`lifecycle`]: when a remote expires;
//! - [`outgoing`]: routed messages and uploads waiting to be published;
//! - [`schedule`]: when a remote syncs, continuously or hourly, daily or weekly at a UTC time;
//! - [`wire`]: the envelope and subjects every message uses, and [`schema`] for its JSON
//!   Schema documents; [`bundle`]: the file a remote is set up from.

pub mod access;
pub mod apply;
pub mod assign;
pub mod bundle;
pub mod date;
pub mod hlc;
pub mod lifecycle;
pub mod merge;
pub mod model;
pub mod names;
pub mod outgoing;
pub mod query;
pub mod rng;
pub mod routing;
pub mod schedule;
pub mod schema;
pub mod wire;

#[cfg(test)]
mod fuzzing;

#[cfg(test)]
mod boundary {
    /// The crate boundary is the architecture: the core decides and the services do the IO.
    /// A dependency on a runtime, a store or a network client here would let IO creep into the
    /// decisions, so it fails the build's tests rather than a review.
    #[test]
    fn the_core_depends_on_no_io_crate() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .expect("the manifest has a [dependencies] table");
        let names: Vec<&str> = deps
            .lines()
            .filter_map(|line| line.split('=').next().map(str::trim))
            .filter(|name| !name.is_empty() && !name.starts_with('#'))
            .collect();
        assert!(names.contains(&"serde"), "the dependency list was not read: {names:?}");
        for io in ["tokio", "redb", "async-nats", "axum", "reqwest", "hyper", "futures"] {
            assert!(!names.contains(&io), "the core must not depend on {io}: it does no IO");
        }
    }
}
