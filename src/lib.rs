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
pub mod identity;
pub mod main_service;
pub mod natsd;
pub mod remote_service;
pub mod store;
pub mod supervise;
pub mod transport;
pub mod wall_clock;

pub use crmsync_core::{
    access, apply, assign, bundle, date, hlc, lifecycle, merge, model, names, outgoing, query, rng, routing, schedule,
    schema, wire,
};

#[cfg(test)]
mod layers {
    //! The layering, checked on the source rather than stated: each outside crate is named by
    //! the one module that adapts it, and every subject is spelled in `wire`.

    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The files (relative to the workspace root) whose code outside their tests names `word`.
    fn naming(word: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        sources(&root.join("src"), &mut files);
        sources(&root.join("core/src"), &mut files);
        let mut out: Vec<String> = files
            .into_iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                code.lines().any(|l| !l.trim_start().starts_with("//") && l.contains(word))
            })
            .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn each_outside_crate_is_named_by_its_adapter_alone() {
        // The benchmark's raw baselines must bypass crmsync, so they use NATS and redb bare.
        assert_eq!(naming("async_nats"), ["src/bench/raw.rs", "src/transport.rs"]);
        assert_eq!(naming("nkeys"), ["src/identity.rs"]);
        let redb = naming("redb::");
        assert!(redb.iter().any(|f| f.starts_with("src/store/")), "the store is read: {redb:?}");
        assert!(redb.iter().all(|f| f.starts_with("src/store/") || f == "src/bench/raw.rs"), "{redb:?}");
        assert!(naming("axum").iter().all(|f| f.starts_with("src/http/")), "{:?}", naming("axum"));
        let reqwest = naming("reqwest");
        assert!(reqwest.iter().all(|f| f.starts_with("src/cli/") || f.starts_with("src/bench/")), "{reqwest:?}");
    }

    #[test]
    fn every_subject_is_spelled_in_wire() {
        assert_eq!(naming("\"crm."), ["core/src/wire.rs"]);
    }
}
