//! The command line: `crmsync <noun> <verb>`. Record, set, remote and status commands are
//! clients of a service's HTTP API; `main serve`, `remote serve`, `remote init`, the offline
//! rebuilds and `up` run the services themselves.

mod client;
mod records;
mod services;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use client::Client;

use crmsync::remote_service::{RemoteConfig, SessionLimits};

/// The main's API address, the default of `--api`.
pub const DEFAULT_API: &str = "http://127.0.0.1:7420";

#[derive(Debug, Parser)]
#[command(name = "crmsync", version, about = "Main/remote synchronization of a contact database over NATS JetStream")]
pub struct Cli {
    /// The API of the service to talk to (a main or a remote).
    #[arg(long, global = true, env = "CRMSYNC_API", default_value = DEFAULT_API)]
    pub api: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The API token to sign in with (else CRMSYNC_TOKEN, else the file CRMSYNC_TOKEN_FILE
    /// names); a main writes its administrator's to `<data>/admin.token` on first start.
    #[arg(long, global = true, env = "CRMSYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A certificate authority (PEM) to trust, besides the system's, for an https:// --api.
    #[arg(long, global = true, env = "CRMSYNC_CA")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything locally: nats-server, a main, two demo remotes.
    Up(UpArgs),
    /// Measure rebuild, catch-up, commit, latency, memory and disk beside the raw limits of
    /// NATS and redb, on a nats-server of its own.
    Bench(crate::bench::BenchArgs),
    /// Run or rebuild the main.
    #[command(subcommand)]
    Main(MainCommand),
    /// Create, list and show remotes (at the main); set up, run and rebuild one (at its site).
    #[command(subcommand)]
    Remote(RemoteCommand),
    /// Sync sets: which records remotes hold.
    #[command(subcommand)]
    Set(SetCommand),
    /// Subscription lists: extra contacts for one remote.
    #[command(subcommand)]
    Subscription(SubscriptionCommand),
    /// The service's state: database id, role, counts, stream position, backlog.
    Status,
    /// Set up NATS authentication: make the authority (operator, accounts and their keys) if
    /// FILE does not exist, and write the server's authentication settings to include in its
    /// configuration. Give the main `--authority FILE`; it issues each remote's credentials.
    NatsAuth {
        /// The authority file (made 0600; it signs every credential: keep it on the main).
        #[arg(long)]
        authority: PathBuf,
        /// Where nats-server keeps account updates (revocations pushed by the main).
        #[arg(long)]
        resolver_dir: PathBuf,
        /// Write the settings here instead of to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sync sessions, newest last: at a remote its own, at the main every remote's.
    Sessions {
        /// Only this remote's (at the main).
        #[arg(long)]
        remote: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Rebuild the service behind --api (a remote) from the stream, with progress.
    Rebuild,
    /// Contacts: people, with company, address, custom fields, record manager and access.
    #[command(subcommand)]
    Contact(RecordCommand),
    /// Companies.
    #[command(subcommand)]
    Company(RecordCommand),
    /// Groups of contacts.
    #[command(subcommand)]
    Group(RecordCommand),
    /// Group memberships (contact_id, group_id).
    #[command(subcommand)]
    Membership(RecordCommand),
    /// Notes on a contact.
    #[command(subcommand)]
    Note(RecordCommand),
    /// Histories: calls, meetings, e-mails done with a contact.
    #[command(subcommand)]
    History(RecordCommand),
    /// Activities: calls, meetings, to-dos scheduled with a contact.
    #[command(subcommand)]
    Activity(RecordCommand),
    /// Users, with role and teams.
    #[command(subcommand)]
    User(UserCommand),
    /// Teams of users.
    #[command(subcommand)]
    Team(RecordCommand),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the nats-server store, the main and the remotes keep their data.
    #[arg(long, default_value = "crmsync-data")]
    pub data: PathBuf,
    /// The nats-server client port.
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// The main's API address.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub main_listen: SocketAddr,
    /// The demo remotes' API addresses.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7421,127.0.0.1:7422")]
    pub remote_listen: Vec<SocketAddr>,
    /// Contacts generated on first start.
    #[arg(long, default_value_t = 1000)]
    pub contacts: usize,
    /// Run a JetStream cluster of three nodes (client ports --nats-port and the next two)
    /// instead of one server, with every stream on three replicas.
    #[arg(long)]
    pub cluster: bool,
}

#[derive(Debug, Args)]
pub struct NatsArg {
    /// The NATS server; for a cluster, its nodes' URLs separated by commas.
    #[arg(long = "nats", env = "CRMSYNC_NATS", default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// The NATS authority file (`crmsync nats-auth`): the main logs in with its own credentials
    /// and issues each remote's. Without it, NATS must not require authentication.
    #[arg(long, env = "CRMSYNC_NATS_AUTHORITY")]
    pub authority: Option<PathBuf>,
    /// The certificate authority (PEM) of NATS's TLS certificate: the main then requires TLS,
    /// and each remote's bundle carries it.
    #[arg(long, env = "CRMSYNC_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
}

/// HTTPS for a service's API.
#[derive(Debug, Args)]
pub struct TlsArg {
    /// The API's TLS certificate chain (PEM, its own certificate first): the API then answers
    /// HTTPS only. Give --tls-key with it.
    #[arg(long, env = "CRMSYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "CRMSYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArg {
    /// The server's TLS, when configured; a clear error for files that do not make one.
    pub fn load(&self) -> anyhow::Result<Option<crmsync::http::tls::ServerTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Ok(Some(crmsync::http::tls::ServerTls::load(cert, key).map_err(anyhow::Error::msg)?))
            }
            _ => Ok(None),
        }
    }

    /// The scheme the API answers in.
    pub fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() { "https" } else { "http" }
    }
}

/// Users: the record commands, and their API tokens.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    #[command(flatten)]
    Record(RecordCommand),
    /// Make a new API token for a user (at the main; administrators and managers). It is
    /// shown once: keep it (`--token`, CRMSYNC_TOKEN or a file CRMSYNC_TOKEN_FILE names).
    Token { user: String },
    /// List the ids of a user's API tokens (at the main; administrators and managers).
    Tokens { user: String },
    /// Revoke one API token of a user by its id (shown when it was made, and by `user
    /// tokens`): a lost laptop's token stops working while the user's others go on.
    RevokeToken { user: String, token_id: String },
    /// Revoke every API token of a user (at the main; administrators and managers): a lost
    /// laptop's token stops working, at the main at once and at each remote once it syncs.
    RevokeTokens { user: String },
}

#[derive(Debug, Subcommand)]
pub enum MainCommand {
    /// Run the main service: API, projector, outbox publisher, merger.
    Serve {
        #[command(flatten)]
        nats: NatsArg,
        #[arg(long, default_value = "crmsync-data/main")]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArg,
        /// Copies JetStream keeps of each stream: 1 on a single server, 3 on a cluster of three
        /// or more nodes (a node lost loses nothing). Existing streams are changed to it.
        #[arg(long, env = "CRMSYNC_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
    /// Rebuild the main's projection from CRM_EVENTS (with the service stopped).
    Rebuild {
        #[command(flatten)]
        nats: NatsArg,
        #[arg(long, default_value = "crmsync-data/main")]
        data: PathBuf,
    },
    /// Stop (off) or restart (on) merging what remotes upload; while off, uploads wait in
    /// CRM_UP and nothing is lost. (A client of the main behind --api.)
    AcceptSyncs {
        #[arg(value_enum)]
        state: OnOff,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Register a remote at the main and write its bundle file.
    Create {
        name: String,
        /// The sync set the remote holds.
        #[arg(long)]
        set: String,
        /// Days without sync after which the remote expires (2-90).
        #[arg(long, default_value_t = 30)]
        expires_days: u32,
        /// Where to write the bundle (default NAME.bundle.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The NATS address the remote site uses, if not the main's.
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// List the remotes registered at the main, with their states and backlogs.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one remote, with its state and backlog.
    Show { name: String },
    /// Halt a remote: it receives nothing, and its uploads wait at the main until resumed.
    Halt { name: String },
    /// Resume a halted remote: what waited for it, both ways, flows again.
    Resume { name: String },
    /// Delete a remote: its consumer, its subscription list and its record; its bundle stops
    /// syncing.
    Delete { name: String },
    /// Re-create a remote: a new bundle (written like `create` writes one) for the same name,
    /// set and subscription list; the copy set up from the old bundle stops syncing.
    Recreate {
        name: String,
        /// Where to write the bundle (default NAME.bundle.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Set up a remote's data directory from its bundle.
    Init {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        data: PathBuf,
    },
    /// Run a remote: sync in the background, API in front.
    Serve {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7421")]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArg,
        /// Overrides the NATS address in the bundle.
        #[arg(long)]
        nats: Option<String>,
        /// Most messages applied per transaction.
        #[arg(long, default_value_t = crmsync::remote_service::SYNC_BATCH)]
        batch: usize,
        /// When to sync: continuous, hourly, hourly:MM, daily@HH:MM or weekly@DAY@HH:MM (UTC).
        /// Between scheduled sessions the remote serves and takes edits, and syncs nothing.
        #[arg(long, default_value = "continuous")]
        sync: crmsync::schedule::Schedule,
    },
    /// One sync session of a stopped remote: upload what waits, receive the main's answer and
    /// everything up to the head of its set, print a summary, and exit.
    Sync {
        /// Sync once and exit (`remote serve` syncs continuously).
        #[arg(long, required = true)]
        once: bool,
        #[arg(long)]
        data: PathBuf,
        /// Overrides the NATS address in the bundle.
        #[arg(long)]
        nats: Option<String>,
        /// Give up (exit 1, nothing lost) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Seconds to wait for the main's answer to the edits sent, once they are sent.
        #[arg(long, default_value_t = 30)]
        wait_merged: u64,
    },
    /// Throw a remote's projection away and replay its set (with the service stopped).
    Rebuild {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        nats: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// Create a sync set: every record (--all), or what some users can access (--users),
    /// narrowed by a query over contact fields (--query).
    Create {
        name: String,
        #[command(flatten)]
        spec: SetSpecArgs,
    },
    /// Change a set's users, query or description; records it gains or loses move at once.
    Edit {
        name: String,
        #[command(flatten)]
        spec: SetSpecArgs,
        /// Remove the query.
        #[arg(long, conflicts_with = "query")]
        no_query: bool,
    },
    /// A new set with the same users and query.
    Copy { name: String, new_name: String },
    /// Delete a set no remote uses.
    Delete { name: String },
    /// How many contacts a set holds now, and which.
    Preview {
        name: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// List the sync sets.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one sync set.
    Show { name: String },
}

/// One page of a list of sets or remotes, in name order.
#[derive(Debug, Args)]
pub struct PageArgs {
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Start after this name (the `--after` a full page ends with).
    #[arg(long)]
    pub after: Option<String>,
}

impl PageArgs {
    /// The page as query parameters.
    pub fn query(&self) -> Vec<(String, String)> {
        let mut query = vec![("limit".to_owned(), self.limit.to_string())];
        query.extend(self.after.iter().map(|after| ("after".to_owned(), after.clone())));
        query
    }
}

#[derive(Debug, Args)]
pub struct SetSpecArgs {
    /// The set holds every record of the main.
    #[arg(long, conflicts_with_all = ["users", "query"])]
    pub all: bool,
    /// The users whose accessible records the set holds, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub users: Vec<String>,
    /// A query over contact fields, e.g. "state = NY and city starts with Al".
    #[arg(long)]
    pub query: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Add contacts to a remote's subscription list (contacts its users may access).
    Add {
        #[arg(long)]
        remote: String,
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Remove contacts that were added through the list.
    Remove {
        #[arg(long)]
        remote: String,
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// The contacts of a remote's subscription list.
    List {
        #[arg(long)]
        remote: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecordCommand {
    /// Create a record: FIELD=VALUE pairs (lists comma-separated, custom.NAME=VALUE for custom fields).
    Add {
        fields: Vec<String>,
        /// The whole record as a JSON object, merged under the FIELD=VALUE pairs.
        #[arg(long = "from-json")]
        from_json: Option<String>,
    },
    /// Change some fields of a record; FIELD= clears one.
    Edit {
        id: String,
        fields: Vec<String>,
        #[arg(long = "from-json")]
        from_json: Option<String>,
    },
    Show {
        id: String,
    },
    /// List records, optionally filtered by FIELD=VALUE pairs.
    List {
        filters: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        after: Option<String>,
    },
    Delete {
        id: String,
    },
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Up(args) => services::up(args).await,
        Command::Bench(args) => crate::bench::run(args, cli.json).await,
        Command::Main(cmd) if !matches!(cmd, MainCommand::AcceptSyncs { .. }) => services::main(cmd).await,
        Command::Remote(RemoteCommand::Init { bundle, data }) => services::remote_init(&bundle, &data, cli.json),
        Command::NatsAuth { authority, resolver_dir, out } => {
            services::nats_auth(&authority, &resolver_dir, out.as_deref())
        }
        Command::Remote(RemoteCommand::Serve { data, listen, tls, nats, batch, sync }) => {
            let mode = crmsync::remote_service::Mode::of(sync);
            let config = RemoteConfig { nats_url: nats, batch, mode, ..RemoteConfig::new(data) };
            services::remote_serve(config, listen, &tls).await
        }
        Command::Remote(RemoteCommand::Rebuild { data, nats }) => services::remote_rebuild(data, nats, cli.json).await,
        Command::Remote(RemoteCommand::Sync { data, nats, timeout, wait_merged, .. }) => {
            let limits =
                SessionLimits { timeout: Duration::from_secs(timeout), answers: Duration::from_secs(wait_merged) };
            let mode = crmsync::remote_service::Mode::Once;
            services::remote_sync_once(
                RemoteConfig { nats_url: nats, mode, ..RemoteConfig::new(data) },
                limits,
                cli.json,
            )
            .await
        }
        command => return run_client(&cli.api, cli.token, cli.ca.as_deref(), command, cli.json).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Runs a client command against a service's API.
async fn run_client(
    api: &str,
    token: Option<String>,
    ca: Option<&std::path::Path>,
    command: Command,
    as_json: bool,
) -> i32 {
    // A client's output may go to `head` or a closed pager: end quietly like any Unix tool
    // instead of panicking on the broken pipe. (Services keep the default of ignoring SIGPIPE,
    // where a peer's closed socket must not kill the process.)
    // SAFETY: restoring the default action of a signal before any thread writes.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let client = client::token(token).and_then(|token| Client::new(api, token, ca));
    let result = match client {
        Ok(client) => records::run(&client, command, as_json).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
