//! The `crmsync` binary: the command line ([`cli`]), the benchmark ([`bench`]) and the demo
//! data set ([`demo`]), over the engine in the library.

mod bench;
mod cli;
mod demo;

use clap::Parser;

fn main() {
    // glibc gives every thread that allocates an arena of its own; with tokio's workers and
    // the blocking pool that is many arenas, each holding freed memory. Two keep a background
    // sync small.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    crmsync::http::tls::install_default_provider();
    // A file that may not grow (a file size limit) must fail the write that grows it, which
    // the service reports and recovers from, instead of killing the process.
    // SAFETY: setting a signal's disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRMSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("crmsync=info,warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(cli::run(cli));
    std::process::exit(code);
}
