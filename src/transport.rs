//! NATS JetStream: the only module that knows async-nats. Streams, consumers, publishing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::watch;

use crate::wire::{self, EVENTS_ALL, EVENTS_STREAM, SYNC_ALL, SYNC_STREAM, UP_ALL, UP_STREAM};

/// How long NATS remembers a `Nats-Msg-Id` to drop a duplicate publish.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Deletes and leaves stay in `CRM_SYNC` this long: the longest a remote may stay offline.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long a delivered message waits for its ack before redelivery: long enough for a batch
/// to be committed, short enough that a remote restarted after a crash resumes quickly.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// Publish acknowledgements awaited at most at once by one pipelined publisher.
pub const PUBLISH_WINDOW: usize = 1024;
const DATABASE_ID_KEY: &str = "crmsync.database_id";
/// The durable consumer of the main's merger on `CRM_UP`.
pub use crate::wire::MERGER;
/// How long a write waits for JetStream to confirm one sending of it.
pub const PUBLISH_ACK_WAIT: Duration = Duration::from_secs(2);
/// How long a write is sent again while its stream has no leader (a cluster electing one after
/// a node failed) before answering that it may or may not have been committed.
pub const LEADER_WAIT: Duration = Duration::from_secs(12);
/// How long a write waits for the client to reconnect (to another node of a cluster) before
/// answering that NATS is unreachable.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long a status page waits for a figure it asks NATS for; past it the figure is shown as
/// unknown.
pub const STATUS_WAIT: Duration = Duration::from_millis(1500);
/// Header of an event published with a client's `Idempotency-Key` (also its `Nats-Msg-Id`).
pub const IDEMPOTENCY_KEY: &str = "Crmsync-Idempotency-Key";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "cannot reach NATS at {url}: {source}. Is nats-server running there? \
         (`crmsync up` starts one; `ops/install-nats-server` installs it)"
    )]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("NATS request failed while {doing}: {detail}")]
    Request { doing: String, detail: String },
    #[error(
        "{url:?} is not a NATS address: {detail}. Give nats://HOST:PORT (or tls://, ws://, wss://), \
         several separated by commas for the nodes of a cluster"
    )]
    Address { url: String, detail: String },
    #[error(
        "this remote's consumer {consumer} is gone from the server: the remote was deleted or re-created at \
         the main, and this copy no longer syncs. Ask an administrator for a new bundle \
         (`crmsync remote recreate NAME`) and set the remote up again from it; edits not yet uploaded are \
         in this copy's store"
    )]
    ConsumerGone { consumer: String },
    #[error("the change conflicts with a newer version of the record (wrong last sequence)")]
    WrongLastSequence,
    #[error(
        "NATS at {url} is unreachable (the service reconnects by itself); nothing was changed. \
         Try again once it is back (`status` shows the connection)"
    )]
    NotConnected { url: String },
    #[error(
        "NATS did not confirm the change within {} s: it may have been committed, or may still be once NATS \
         is back. Read the record before trying again, or send the same request again with the same \
         Idempotency-Key header, which never applies a change twice",
        LEADER_WAIT.as_secs()
    )]
    Unconfirmed,
}

impl TransportError {
    /// A failure a JetStream cluster shows while it elects its leaders, which passes by itself.
    fn is_transient_cluster(&self) -> bool {
        let TransportError::Request { detail, .. } = self else { return false };
        let detail = detail.to_lowercase();
        ["timed out", "no responders", "jetstream not", "temporarily unavailable", "insufficient resources", "leader"]
            .iter()
            .any(|s| detail.contains(s))
    }

    pub fn request(doing: impl Into<String>, err: impl std::fmt::Display) -> TransportError {
        TransportError::Request { doing: doing.into(), detail: err.to_string() }
    }

    /// A request about a remote's consumer: [`TransportError::ConsumerGone`] when the server
    /// says it has no such consumer.
    fn about_consumer(consumer: &str, doing: &str, err: impl std::fmt::Display) -> TransportError {
        let detail = err.to_string();
        if detail.to_lowercase().contains("consumer not found") {
            TransportError::ConsumerGone { consumer: consumer.to_owned() }
        } else {
            TransportError::Request { doing: format!("{doing} consumer {consumer}"), detail }
        }
    }
}

/// Who a connection logs in as: nobody (a server without authentication), or a user's
/// credentials (a `.creds` text, see [`crate::identity`]) and, for a remote, the inbox prefix
/// its permissions allow it to receive replies on.
#[derive(Clone, Debug, Default)]
pub struct Login {
    pub creds: Option<String>,
    pub inbox_prefix: Option<String>,
    /// The certificate authority of the server's TLS certificate (a PEM file): the connection
    /// then requires TLS and trusts that authority (besides the system's).
    pub ca: Option<std::path::PathBuf>,
}

/// A connection and its JetStream context.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Counts connections made: it changes on every reconnect, so long-running consumers can
    /// start afresh at once instead of waiting for a heartbeat to time out.
    pub connections: tokio::sync::watch::Receiver<u64>,
    pub url: String,
    /// When the connection was lost (or, for a client that started without one, when it
    /// started), in milliseconds since the epoch; 0 while connected.
    offline_since: Arc<AtomicU64>,
    /// What the server last said was wrong (credentials refused, a permission violation),
    /// until the next connection.
    server_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Nats {
    /// Connects, waiting for the first connection (failing if NATS cannot be reached); after
    /// that the client reconnects by itself for as long as the process runs. For a service
    /// that cannot do anything without NATS (the main owns the streams).
    pub async fn connect(url: &str, name: &str) -> Result<Nats, TransportError> {
        Nats::open(url, name, &Login::default(), false).await
    }

    /// [`Nats::connect`] with credentials.
    pub async fn connect_as(url: &str, name: &str, login: &Login) -> Result<Nats, TransportError> {
        Nats::open(url, name, login, false).await
    }

    /// Returns at once, connecting in the background and reconnecting for as long as the
    /// process runs: for a service that works without NATS (a remote). Only an address that
    /// does not parse is an error; [`Nats::connected`] waits for the connection.
    pub async fn connect_in_background(url: &str, name: &str, login: &Login) -> Result<Nats, TransportError> {
        Nats::open(url, name, login, true).await
    }

    async fn open(url: &str, name: &str, login: &Login, in_background: bool) -> Result<Nats, TransportError> {
        let (tx, connections) = tokio::sync::watch::channel(0u64);
        let server_error = Arc::new(std::sync::Mutex::new(None));
        let said = server_error.clone();
        // Offline until the first connection, if that is not waited for.
        let offline_since = Arc::new(AtomicU64::new(if in_background { crate::hlc::wall_ms() } else { 0 }));
        let offline = offline_since.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            // The first attempt at once, then retry quickly: the server is usually on the same
            // host or network, and every second without a connection is a second of writes
            // refused.
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let (tx, offline, said) = (tx.clone(), offline.clone(), said.clone());
                async move {
                    match event {
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!("NATS refused: {e}");
                            *said.lock().unwrap() = Some(e.to_string());
                        }
                        async_nats::Event::Connected => {
                            *said.lock().unwrap() = None;
                            offline.store(0, Ordering::SeqCst);
                            tx.send_modify(|n| *n += 1);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            let _ =
                                offline.compare_exchange(0, crate::hlc::wall_ms(), Ordering::SeqCst, Ordering::SeqCst);
                            tracing::warn!("disconnected from NATS; reconnecting");
                        }
                        // A reconnection the server refused: the credentials were revoked. What
                        // the server said when it closed the connection ("User Authentication
                        // Revoked") says more, and stays.
                        async_nats::Event::ClientError(async_nats::ClientError::Other(e))
                            if e.contains("authoriz") || e.contains("authenticat") =>
                        {
                            tracing::warn!("NATS refused: {e}");
                            said.lock().unwrap().get_or_insert(e);
                        }
                        other => tracing::debug!("NATS: {other}"),
                    }
                }
            });
        if in_background {
            options = options.retry_on_initial_connect();
        }
        if let Some(creds) = &login.creds {
            options = options.credentials(creds).map_err(|e| {
                TransportError::request(
                    "reading the NATS credentials",
                    format!("{e} (the bundle's creds are damaged: re-create the remote)"),
                )
            })?;
        }
        if let Some(prefix) = &login.inbox_prefix {
            options = options.custom_inbox_prefix(prefix.as_str());
        }
        if let Some(ca) = &login.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(server_addrs(url)?)
            .await
            .map_err(|source| TransportError::Connect { url: url.to_owned(), source })?;
        let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(10)).build(client.clone());
        Ok(Nats { client, js, connections, url: url.to_owned(), offline_since, server_error })
    }

    /// What the server last refused (credentials, a permission), while it stands.
    pub fn server_error(&self) -> Option<String> {
        self.server_error.lock().unwrap().clone()
    }

    /// Pushes an account JWT (new revocations) to the running server: needs a connection of
    /// the system account. The server applies it at once and keeps it.
    pub async fn push_account_jwt(&self, jwt: &str) -> Result<(), TransportError> {
        let reply = self
            .client
            .request(crate::identity::CLAIMS_UPDATE_SUBJECT, jwt.to_owned().into())
            .await
            .map_err(|e| TransportError::request("pushing the account JWT to NATS", e))?;
        crate::identity::check_claims_update_reply(&reply.payload)
            .map_err(|e| TransportError::request("pushing the account JWT to NATS", e))
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Since when NATS is unreachable (milliseconds since the epoch), or `None` while connected.
    pub fn offline_since_ms(&self) -> Option<u64> {
        if self.is_connected() {
            return None;
        }
        // 0: the client noticed before its event reached us, a moment ago.
        Some(match self.offline_since.load(Ordering::SeqCst) {
            0 => crate::hlc::wall_ms(),
            since => since,
        })
    }

    /// Returns once the client is connected (at once if it is). Callers that must stop at
    /// shutdown select on it.
    pub async fn connected(&self) {
        let mut connections = self.connections.clone();
        while !self.is_connected() {
            // The connection counter moves just before the client's own state does: look again
            // shortly after, whichever comes first.
            tokio::select! {
                _ = connections.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// A figure for a status page: asked only while connected, and given up after
    /// [`STATUS_WAIT`], so a status page answers at once whatever NATS does.
    pub async fn for_status<T, E>(&self, ask: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
        if !self.is_connected() {
            return None;
        }
        tokio::time::timeout(STATUS_WAIT, ask).await.ok()?.ok()
    }

    /// Creates the three streams if they are missing and returns the database id kept in the
    /// events stream's metadata, making `candidate` the id of a new database.
    pub async fn ensure_streams(&self, candidate: &str, replicas: usize) -> Result<String, TransportError> {
        // A cluster that has just started elects its JetStream leader first: until then every
        // request fails, and the main waits for it rather than giving up.
        let deadline = tokio::time::Instant::now() + CLUSTER_READY;
        loop {
            match self.try_ensure_streams(candidate, replicas).await {
                Err(e) if tokio::time::Instant::now() < deadline && e.is_transient_cluster() => {
                    tracing::info!("JetStream is not ready yet ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_ensure_streams(&self, candidate: &str, replicas: usize) -> Result<String, TransportError> {
        let database_id = match self.js.get_stream(EVENTS_STREAM).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| TransportError::request("reading CRM_EVENTS", e))?;
                info.config.metadata.get(DATABASE_ID_KEY).cloned().unwrap_or_else(|| candidate.to_owned())
            }
            Err(e) if !matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => {
                return Err(TransportError::request("reading CRM_EVENTS", e));
            }
            Err(_) => {
                let metadata = HashMap::from([(DATABASE_ID_KEY.to_owned(), candidate.to_owned())]);
                self.js
                    .create_stream(stream::Config {
                        name: EVENTS_STREAM.into(),
                        description: Some("crmsync: every committed change, the source of truth".into()),
                        subjects: vec![EVENTS_ALL.into()],
                        storage: stream::StorageType::File,
                        duplicate_window: DEDUP_WINDOW,
                        allow_direct: true,
                        metadata,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| TransportError::request("creating CRM_EVENTS", e))?;
                candidate.to_owned()
            }
        };
        let sync = stream::Config {
            name: SYNC_STREAM.into(),
            description: Some("crmsync: latest state of each record in each target".into()),
            subjects: vec![SYNC_ALL.into()],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            duplicate_window: DEDUP_WINDOW,
            allow_message_ttl: true,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        };
        let up = stream::Config {
            name: UP_STREAM.into(),
            description: Some("crmsync: edits made at remotes, on their way to the main".into()),
            subjects: vec![UP_ALL.into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        };
        for config in [sync, up] {
            let doing = format!("creating {}", config.name);
            self.js.get_or_create_stream(config).await.map_err(|e| TransportError::request(doing, e))?;
        }
        for name in [EVENTS_STREAM, SYNC_STREAM, UP_STREAM] {
            self.set_replicas(name, replicas).await?;
        }
        Ok(database_id)
    }

    /// Changes a stream's replica count to `replicas` if it has another (JetStream moves the
    /// copies itself; its consumers follow).
    async fn set_replicas(&self, name: &str, replicas: usize) -> Result<(), TransportError> {
        let doing = || format!("reading {name}");
        let mut s = self.js.get_stream(name).await.map_err(|e| TransportError::request(doing(), e))?;
        let info = s.info().await.map_err(|e| TransportError::request(doing(), e))?;
        if info.config.num_replicas == replicas.max(1) {
            return Ok(());
        }
        tracing::warn!(stream = name, from = info.config.num_replicas, to = replicas, "changing the stream's replicas");
        let config = stream::Config { num_replicas: replicas, ..info.config.clone() };
        self.js
            .update_stream(config)
            .await
            .map_err(|e| TransportError::request(format!("changing {name} to {replicas} replicas"), e))?;
        Ok(())
    }

    /// The database id kept in `CRM_EVENTS`' metadata, if the stream exists.
    pub async fn database_id(&self) -> Result<Option<String>, TransportError> {
        match self.js.get_stream(EVENTS_STREAM).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| TransportError::request("reading CRM_EVENTS", e))?;
                Ok(info.config.metadata.get(DATABASE_ID_KEY).cloned())
            }
            Err(_) => Ok(None),
        }
    }

    pub async fn stream(&self, name: &str) -> Result<stream::Stream<()>, TransportError> {
        self.js.get_stream_no_info(name).await.map_err(|e| TransportError::request(format!("opening {name}"), e))
    }

    /// The last sequence of a stream.
    pub async fn last_sequence(&self, name: &str) -> Result<u64, TransportError> {
        Ok(self.stream_state(name).await?.last_sequence)
    }

    async fn stream_state(&self, name: &str) -> Result<stream::State, TransportError> {
        let mut s =
            self.js.get_stream(name).await.map_err(|e| TransportError::request(format!("opening {name}"), e))?;
        let info = s.info().await.map_err(|e| TransportError::request(format!("reading {name}"), e))?;
        Ok(info.state.clone())
    }

    /// Publishes one event with deduplication and optimistic concurrency, and waits for the ack.
    /// A client's idempotency key, if any, is the message id and travels as
    /// [`IDEMPOTENCY_KEY`] for the projector to remember. Returns the event's sequence and
    /// whether JetStream had it already (a repeated message id).
    ///
    /// On a cluster a node may fail and its streams elect new leaders: meanwhile the stream
    /// has no responder, or does not answer. The event is sent again (the same message id, so
    /// never stored twice) for up to [`LEADER_WAIT`], and the client waits up to
    /// [`RECONNECT_WAIT`] for a connection to another node; past those the write is refused
    /// (not connected: nothing was changed) or unconfirmed.
    pub async fn publish_event(
        &self,
        subject: String,
        msg_id: &str,
        expected_last_subject_sequence: u64,
        payload: Vec<u8>,
        idempotency_key: Option<&str>,
        upload_order: Option<&str>,
    ) -> Result<(u64, bool), TransportError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        if let Some(key) = idempotency_key {
            headers.insert(IDEMPOTENCY_KEY, key);
        }
        if let Some(order) = upload_order {
            headers.insert(crate::wire::UPLOAD_ORDER, order);
        }
        let payload = bytes::Bytes::from(payload);
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut sent = false;
        loop {
            if !self.wait_connected(RECONNECT_WAIT).await {
                // Not even handed to the client (it would send it whenever NATS comes back);
                // if an earlier attempt was, it may have been stored.
                return Err(if sent {
                    TransportError::Unconfirmed
                } else {
                    TransportError::NotConnected { url: self.url.clone() }
                });
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .expected_last_subject_sequence(expected_last_subject_sequence);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| TransportError::request("publishing an event", e))?;
            sent = true;
            let again = match tokio::time::timeout(PUBLISH_ACK_WAIT, ack).await {
                Ok(Ok(ack)) => return Ok((ack.sequence, ack.duplicate)),
                Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    return Err(TransportError::WrongLastSequence);
                }
                // No stream took it (its leader is being elected): nothing stored.
                Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                    TransportError::request("publishing an event", e)
                }
                Err(_) => TransportError::Unconfirmed,
                Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::TimedOut => TransportError::Unconfirmed,
                Ok(Err(e)) => return Err(TransportError::request("publishing an event", e)),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(again);
            }
            tracing::info!("publishing an event again ({again})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the client is connected, waiting up to `limit` for it to be.
    async fn wait_connected(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Publishes routed messages in order, pipelined, and waits for every ack.
    ///
    /// Without `Nats-Msg-Id`: a main that replays the stream after a crash routes the same
    /// changes again, older states before newer ones, and each subject must end with the
    /// newest. With message ids, a nats-server restarted in between remembers only the ids of
    /// the messages it still holds: the replayed older state (whose message a newer one had
    /// replaced) was taken as new, and the newer one dropped as a repeat. A state sent twice
    /// costs a remote nothing (it applies a version only once).
    pub async fn publish_routed(&self, batch: &[crate::outgoing::OutboxEntry]) -> Result<(), TransportError> {
        let ttl = format!("{}s", TOMBSTONE_TTL.as_secs());
        let mut messages = Vec::new();
        for entry in batch {
            let payload = bytes::Bytes::from(entry.payload.clone());
            for subject in &entry.subjects {
                let mut headers = HeaderMap::new();
                if entry.tombstone {
                    headers.insert("Nats-TTL", ttl.as_str());
                }
                let publish = jetstream::message::PublishMessage::build().payload(payload.clone()).headers(headers);
                messages.push((subject.clone(), publish));
            }
        }
        self.publish_pipelined(messages).await.map_err(|e| TransportError::request("publishing to CRM_SYNC", e))
    }

    /// Publishes messages in order with at most [`PUBLISH_WINDOW`] acks outstanding, and waits
    /// for every ack. (Holding more unresolved acks than the context's in-flight limit would
    /// wait forever for a permit.)
    pub async fn publish_pipelined(
        &self,
        messages: impl IntoIterator<Item = (String, jetstream::message::PublishMessage)>,
    ) -> Result<(), async_nats::Error> {
        let mut in_flight = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW);
        for (subject, publish) in messages {
            if in_flight.len() >= PUBLISH_WINDOW
                && let Some(ack) = in_flight.pop_front()
            {
                ack.await?;
            }
            in_flight.push_back(self.js.send_publish(subject, publish).await?);
        }
        for ack in in_flight {
            ack.await?;
        }
        Ok(())
    }

    /// Publishes a remote's edits to `CRM_UP` in order, each with its event id as
    /// `Nats-Msg-Id` (a retried upload is dropped as a duplicate) and its place in the remote's
    /// queue (`order` of its queue number) as [`crate::wire::UPLOAD_ORDER`], and waits for every
    /// ack.
    pub async fn publish_uploads(
        &self,
        uploads: &[(u64, crate::outgoing::Upload)],
        order: impl Fn(u64) -> String,
        bundle_created_ms: u64,
    ) -> Result<(), TransportError> {
        if !self.is_connected() {
            // Handed to a disconnected client, they would wait in its buffer and be sent
            // whenever NATS comes back, however often they were tried meanwhile.
            return Err(TransportError::NotConnected { url: self.url.clone() });
        }
        let mut messages = Vec::with_capacity(uploads.len());
        for (n, u) in uploads {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", u.event.as_str());
            headers.insert(crate::wire::UPLOAD_ORDER, order(*n).as_str());
            headers.insert(crate::wire::UPLOAD_BUNDLE, bundle_created_ms.to_string().as_str());
            let publish =
                jetstream::message::PublishMessage::build().payload(u.payload.clone().into()).headers(headers);
            messages.push((u.subject.clone(), publish));
        }
        self.publish_pipelined(messages).await.map_err(|e| TransportError::request("uploading edits to CRM_UP", e))
    }

    /// Sends a remote's report of a sync session to `CRM_UP` (once: its id is the message's).
    pub async fn publish_report(
        &self,
        report: &crate::wire::SessionReport,
        bundle_created_ms: u64,
    ) -> Result<(), TransportError> {
        if !self.is_connected() {
            return Err(TransportError::NotConnected { url: self.url.clone() });
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", report.id.as_str());
        headers.insert(crate::wire::UPLOAD_BUNDLE, bundle_created_ms.to_string().as_str());
        let publish = jetstream::message::PublishMessage::build().payload(report.encode().into()).headers(headers);
        self.publish_pipelined([(crate::wire::session_subject(&report.remote), publish)])
            .await
            .map_err(|e| TransportError::request("reporting a sync session to CRM_UP", e))
    }

    /// Tells a remote that its edit was refused: one message on its own reject subject, which
    /// expires like a tombstone.
    pub async fn publish_reject(&self, subject: String, msg_id: &str, payload: Vec<u8>) -> Result<(), TransportError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert("Nats-TTL", format!("{}s", TOMBSTONE_TTL.as_secs()).as_str());
        let publish = jetstream::message::PublishMessage::build().payload(payload.into()).headers(headers);
        self.publish_pipelined([(subject, publish)])
            .await
            .map_err(|e| TransportError::request("publishing a refusal to CRM_SYNC", e))
    }

    /// The last message on a subject of `CRM_SYNC`, if any: the current state of a record in
    /// one target.
    pub async fn last_on(&self, subject: &str) -> Result<Option<bytes::Bytes>, TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => Ok(Some(msg.payload)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(TransportError::request(format!("reading the last message on {subject}"), e)),
        }
    }

    /// The main's merger: one durable consumer taking every upload off the `CRM_UP` work queue,
    /// in order, acknowledging each once it is merged, refused or parked.
    ///
    /// It is reset to the first upload still in the queue every time the merger starts: uploads
    /// delivered to an earlier run (a main that was stopped or killed) and never acknowledged
    /// come first again, at once, instead of after their ack wait, behind later ones.
    async fn merger_consumer(&self) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        let stream = self.stream(UP_STREAM).await?;
        let consumer = stream
            .get_or_create_consumer(
                MERGER,
                consumer::pull::Config {
                    durable_name: Some(MERGER.into()),
                    description: Some("crmsync main: merges edits from remotes".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    filter_subject: UP_ALL.into(),
                    max_ack_pending: 1000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| TransportError::request("creating the merger's consumer on CRM_UP", e))?;
        stream
            .reset_consumer(MERGER, None)
            .await
            .map_err(|e| TransportError::request("resetting the merger's consumer on CRM_UP", e))?;
        Ok(consumer)
    }

    /// Edits of one remote waiting in `CRM_UP` (its session reports are not counted).
    pub async fn uploads_waiting_from(&self, remote: &str) -> Result<u64, TransportError> {
        self.edits_in(&wire::up_filter(remote), &wire::session_subject(remote)).await
    }

    /// Session reports of one remote waiting in `CRM_UP`.
    pub async fn reports_waiting_from(&self, remote: &str) -> Result<u64, TransportError> {
        self.count_up(&wire::session_subject(remote)).await
    }

    /// Edits waiting in `CRM_UP` for the merger (session reports are not counted).
    pub async fn uploads_waiting(&self) -> Result<u64, TransportError> {
        self.edits_in(wire::UP_ALL, wire::SESSIONS_ALL).await
    }

    /// Messages on `all` but not on `reports`. The reports are counted before and after the
    /// total, and the total is kept only when no report came or went in between (a remote
    /// reports a session as its uploads drain).
    async fn edits_in(&self, all: &str, reports: &str) -> Result<u64, TransportError> {
        let mut before = self.count_up(reports).await?;
        let mut tries = 0;
        loop {
            let total = if all == wire::UP_ALL {
                self.stream_state(UP_STREAM).await?.messages
            } else {
                self.count_up(all).await?
            };
            let after = self.count_up(reports).await?;
            tries += 1;
            if after == before || tries == 5 {
                return Ok(total.saturating_sub(after.max(before)));
            }
            before = after;
        }
    }

    /// Messages in `CRM_UP` on the subjects of `filter`.
    async fn count_up(&self, filter: &str) -> Result<u64, TransportError> {
        use futures::TryStreamExt;
        let reading = |e: &dyn std::fmt::Display| TransportError::request(format!("counting messages on {filter}"), e);
        let stream = self.stream(UP_STREAM).await?;
        let mut subjects = stream.info_with_subjects(filter).await.map_err(|e| reading(&e))?;
        let mut total = 0;
        while let Some((_, n)) = subjects.try_next().await.map_err(|e| reading(&e))? {
            total += n as u64;
        }
        Ok(total)
    }

    /// Creates a remote's durable consumer on `CRM_SYNC`, filtered to its two subjects. The
    /// remote itself only ever pulls from it (and resets it to rebuild).
    pub async fn create_remote_consumer(
        &self,
        consumer_name: &str,
        filters: Vec<String>,
    ) -> Result<(), TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(consumer_name.to_owned()),
                description: Some("crmsync remote".into()),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: ACK_WAIT,
                filter_subjects: filters,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| TransportError::request(format!("creating consumer {consumer_name}"), e))?;
        Ok(())
    }

    pub async fn remote_consumer(
        &self,
        consumer_name: &str,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        stream
            .get_consumer(consumer_name)
            .await
            .map_err(|e| TransportError::about_consumer(consumer_name, "opening", e))
    }

    /// `CRM_EVENTS` in order from sequence `from` (the projector; 1 or less: from the start, to
    /// rebuild), through an ordered consumer: nothing to acknowledge, and after a reconnect it
    /// goes on by itself from the last event delivered.
    pub async fn events(
        &self,
        from: u64,
        max: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Batches<Incoming>, TransportError> {
        let deliver_policy = match from {
            0 | 1 => consumer::DeliverPolicy::All,
            start_sequence => consumer::DeliverPolicy::ByStartSequence { start_sequence },
        };
        let consumer = self
            .stream(EVENTS_STREAM)
            .await?
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: EVENTS_ALL.into(),
                deliver_policy,
                // Pulls expire after this (and heartbeats come every half of it), so an ordered
                // consumer lost with a cluster node is noticed (two missed heartbeats) and made
                // again within seconds, not the half minute of the defaults.
                max_expires: ORDERED_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(|e| TransportError::request("creating an ordered consumer on CRM_EVENTS", e))?;
        let messages = consumer.messages().await.map_err(|e| TransportError::request("reading CRM_EVENTS", e))?;
        Ok(Batches::new(
            self,
            EVENTS_STREAM,
            messages.map_err(|e| e.to_string()).boxed(),
            Incoming::from_message,
            max,
            shutdown,
        ))
    }

    /// The uploads waiting in `CRM_UP`, for the merger, through its consumer
    /// ([`Nats::merger_consumer`], reset first). Acknowledge each once it is merged or parked.
    pub async fn uploads(
        &self,
        max: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Batches<Uploaded>, TransportError> {
        let consumer = self.merger_consumer().await?;
        let messages = pull(&consumer, max).await.map_err(|e| TransportError::request("pulling from CRM_UP", e))?;
        Ok(Batches::new(self, UP_STREAM, messages, Uploaded::from_message, max, shutdown))
    }

    /// A remote's messages on `CRM_SYNC`, through the consumer the main made for it. Its
    /// acknowledgements cover every earlier message: acknowledge only what is committed.
    pub async fn sync_messages(
        &self,
        consumer_name: &str,
        max: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Batches<Incoming>, TransportError> {
        let consumer = self.remote_consumer(consumer_name).await?;
        let messages = pull(&consumer, max)
            .await
            .map_err(|e| TransportError::request(format!("pulling from consumer {consumer_name}"), e))?;
        Ok(Batches::new(self, SYNC_STREAM, messages, Incoming::from_message, max, shutdown))
    }

    /// Moves a remote's consumer to stream sequence `next` (1 replays everything), dropping
    /// any delivered but unacknowledged messages. Returns the messages now pending.
    pub async fn reset_remote_consumer(&self, consumer_name: &str, next: u64) -> Result<u64, TransportError> {
        // The server does not answer a reset of a consumer it does not have: ask for it first,
        // so a consumer deleted at the main is said to be gone rather than timing out.
        self.remote_consumer(consumer_name).await?;
        let stream = self.stream(SYNC_STREAM).await?;
        let resp = stream
            .reset_consumer(consumer_name, Some(next.max(1)))
            .await
            .map_err(|e| TransportError::about_consumer(consumer_name, "resetting", e))?;
        Ok(resp.info.num_pending)
    }

    /// Removes every message of a target from `CRM_SYNC` (a deleted set no remote uses).
    pub async fn purge_target(&self, target: &crate::wire::Target) -> Result<(), TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        stream
            .purge()
            .filter(wire::target_filter(target))
            .await
            .map_err(|e| TransportError::request(format!("purging {}", wire::target_filter(target)), e))?;
        Ok(())
    }

    /// Halts delivery to a remote's consumer (NATS pauses it: its pulls get nothing) until
    /// [`Nats::resume_remote_consumer`]. Takes effect at once, without a server restart.
    pub async fn pause_remote_consumer(&self, consumer_name: &str) -> Result<(), TransportError> {
        self.pause(SYNC_STREAM, consumer_name, true).await
    }

    pub async fn resume_remote_consumer(&self, consumer_name: &str) -> Result<(), TransportError> {
        self.pause(SYNC_STREAM, consumer_name, false).await
    }

    /// Stops (`false`) or restarts (`true`) the merging of uploads: the merger's consumer is
    /// paused, so uploads wait in `CRM_UP`. Kept by the server, across restarts of the main.
    pub async fn accept_uploads(&self, accept: bool) -> Result<(), TransportError> {
        self.pause(UP_STREAM, MERGER, !accept).await
    }

    /// Whether uploads are merged: the merger's consumer is not paused.
    pub async fn accepting_uploads(&self) -> Result<bool, TransportError> {
        let mut consumer: consumer::PullConsumer = self
            .stream(UP_STREAM)
            .await?
            .get_consumer(MERGER)
            .await
            .map_err(|e| TransportError::request("opening the merger's consumer", e))?;
        let info = consumer.info().await.map_err(|e| TransportError::request("reading the merger's consumer", e))?;
        Ok(!info.paused)
    }

    async fn pause(&self, stream: &str, consumer_name: &str, pause: bool) -> Result<(), TransportError> {
        let doing = if pause { "pausing" } else { "resuming" };
        let stream = self.stream(stream).await?;
        let result = if pause {
            let until = async_nats::datetime::parse_rfc3339(PAUSED_UNTIL)
                .map_err(|e| TransportError::request("reading the pause deadline", e))?;
            stream.pause_consumer(consumer_name, until).await
        } else {
            stream.resume_consumer(consumer_name).await
        };
        result.map_err(|e| TransportError::request(format!("{doing} consumer {consumer_name}"), e))?;
        Ok(())
    }

    /// Stops a remote's delivery for good because it expired at `on_ms`: its consumer is
    /// paused, and says why in its metadata, which the remote reads to tell its people.
    pub async fn expire_remote_consumer(&self, consumer_name: &str, on_ms: u64) -> Result<(), TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        let mut consumer = self.remote_consumer(consumer_name).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| TransportError::request(format!("reading consumer {consumer_name}"), e))?;
        let mut config =
            <consumer::pull::Config as consumer::FromConsumer>::try_from_consumer_config(info.config.clone())
                .map_err(|e| TransportError::request(format!("reading consumer {consumer_name}'s settings"), e))?;
        config.metadata.insert(EXPIRED_KEY.into(), on_ms.to_string());
        stream
            .update_consumer(config)
            .await
            .map_err(|e| TransportError::request(format!("marking consumer {consumer_name} expired"), e))?;
        self.pause(SYNC_STREAM, consumer_name, true).await
    }

    /// Deletes a remote's consumer; one already gone is not an error.
    pub async fn delete_remote_consumer(&self, consumer_name: &str) -> Result<(), TransportError> {
        let stream = self.stream(SYNC_STREAM).await?;
        match stream.delete_consumer(consumer_name).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(TransportError::request(format!("deleting consumer {consumer_name}"), e)),
        }
    }

    /// Messages waiting for a remote: not yet delivered plus delivered but unacknowledged.
    pub async fn remote_backlog(&self, consumer_name: &str) -> Result<u64, TransportError> {
        Ok(self.remote_delivery(consumer_name).await?.backlog)
    }

    /// What a remote's consumer says of its delivery: the messages waiting, and whether the
    /// main halted it.
    pub async fn remote_delivery(&self, consumer_name: &str) -> Result<Delivery, TransportError> {
        let mut c = self.remote_consumer(consumer_name).await?;
        let info =
            c.info().await.map_err(|e| TransportError::request(format!("reading consumer {consumer_name}"), e))?;
        Ok(Delivery {
            backlog: info.num_pending + info.num_ack_pending as u64,
            halted: info.paused,
            expired_ms: info.config.metadata.get(EXPIRED_KEY).and_then(|ms| ms.parse().ok()),
        })
    }
}

/// A remote consumer's delivery, as [`Nats::remote_delivery`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Messages not yet delivered, plus delivered but unacknowledged.
    pub backlog: u64,
    /// Paused by the main (`remote halt`, or expiry).
    pub halted: bool,
    /// When the remote expired, if the main expired it.
    pub expired_ms: Option<u64>,
}

/// The metadata key of a remote's consumer that says when the remote expired.
const EXPIRED_KEY: &str = "crmsync_expired_ms";

/// How long a paused consumer stays paused: until it is resumed.
const PAUSED_UNTIL: &str = "2999-12-31T00:00:00Z";

/// The pause before connection attempt `attempts` (counted from 1 since the last connection):
/// none before the first, then 100 ms more for each failed one, up to a second.
/// The servers of a NATS address: one URL, or several separated by commas (the nodes of a
/// cluster; the client connects to any and moves to another when it fails).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, TransportError> {
    let addrs = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Address { url: url.to_owned(), detail: e.to_string() })?;
    if addrs.is_empty() {
        return Err(TransportError::Address { url: url.to_owned(), detail: "it names no server".into() });
    }
    Ok(addrs)
}

/// The longest pull of the projector's ordered consumer on `CRM_EVENTS`.
const ORDERED_EXPIRES: Duration = Duration::from_secs(4);

/// How long the main waits for a JetStream cluster that has just started to elect its leader.
const CLUSTER_READY: Duration = Duration::from_secs(60);

fn reconnect_delay(attempts: usize) -> Duration {
    Duration::from_millis((attempts.saturating_sub(1) as u64 * 100).min(1000))
}

/// A message taken off a stream, reduced to what the projections need.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub seq: u64,
    /// Messages still waiting after this one, as the server counted at delivery.
    pub pending: u64,
    pub subject: String,
    pub payload: bytes::Bytes,
    /// The client's idempotency key the event was published with, if any.
    pub idempotency_key: Option<String>,
    /// The remote upload the event merged: its queue and number.
    pub upload_order: Option<(String, u64)>,
}

impl Incoming {
    pub fn from_message(msg: &jetstream::Message) -> Option<Incoming> {
        let info = msg.info().ok()?;
        Some(Incoming {
            seq: info.stream_sequence,
            pending: info.pending,
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
            idempotency_key: msg.headers.as_ref().and_then(|h| h.get(IDEMPOTENCY_KEY)).map(|v| v.as_str().to_owned()),
            upload_order: upload_order(msg),
        })
    }
}

/// The remote upload a message carries or merged ([`crate::wire::UPLOAD_ORDER`]): its queue
/// and number.
fn upload_order(msg: &jetstream::Message) -> Option<(String, u64)> {
    let value = msg.headers.as_ref()?.get(crate::wire::UPLOAD_ORDER)?;
    crate::wire::parse_upload_order(value.as_str()).map(|(queue, n)| (queue.to_owned(), n))
}

/// An upload taken off `CRM_UP`, reduced to what the merger needs.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub subject: String,
    pub payload: bytes::Bytes,
    /// Its remote queue and number in it ([`crate::wire::UPLOAD_ORDER`]; none from a remote
    /// older than the header).
    pub order: Option<(String, u64)>,
    /// The `created_ms` of the bundle the uploading copy was set up from
    /// ([`crate::wire::UPLOAD_BUNDLE`]; none from a remote older than the header).
    pub bundle_created_ms: Option<u64>,
}

impl Uploaded {
    fn from_message(msg: &jetstream::Message) -> Option<Uploaded> {
        let bundle_created_ms =
            msg.headers.as_ref().and_then(|h| h.get(crate::wire::UPLOAD_BUNDLE)).and_then(|v| v.as_str().parse().ok());
        Some(Uploaded {
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
            order: upload_order(msg),
            bundle_created_ms,
        })
    }
}

/// A consumer's messages, whatever the kind of consumer.
type Messages = futures::stream::BoxStream<'static, Result<jetstream::Message, String>>;

/// Opens a pull consumer's message stream: up to `max` messages a pull, with heartbeats, so a
/// stream whose server went away ends with an error instead of waiting forever.
async fn pull(consumer: &consumer::PullConsumer, max: usize) -> Result<Messages, consumer::StreamError> {
    let messages = consumer
        .stream()
        .max_messages_per_batch(max)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    Ok(messages.map_err(|e| e.to_string()).boxed())
}

/// Why [`Batches::next`] gave no batch: the loop reading it starts again from its stored
/// position.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// The client reconnected: the consumer may have lost its place on the server, so start
    /// afresh at once instead of waiting for a heartbeat to time out.
    #[error("reconnected to NATS; reading on from the stored position")]
    Reconnected,
    #[error("the consumer on {0} ended")]
    Ended(&'static str),
    #[error("reading {stream}: {detail}")]
    Failed { stream: &'static str, detail: String },
}

/// The one way every loop reads a stream: batch by batch ([`next_batch`]), until shutdown or a
/// reconnect, acknowledging by place in the last batch once it is committed.
pub struct Batches<T> {
    stream: &'static str,
    messages: Messages,
    read: fn(&jetstream::Message) -> Option<T>,
    max: usize,
    shutdown: watch::Receiver<bool>,
    /// Watched for reconnects, unless the reader goes on through them.
    connections: Option<watch::Receiver<u64>>,
    /// The messages of the last batch, in the order of what [`Batches::next`] returned.
    delivered: Vec<jetstream::Message>,
}

impl<T> Batches<T> {
    fn new(
        nats: &Nats,
        stream: &'static str,
        messages: Messages,
        read: fn(&jetstream::Message) -> Option<T>,
        max: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Batches<T> {
        let mut connections = nats.connections.clone();
        connections.mark_unchanged();
        Batches { stream, messages, read, max, shutdown, connections: Some(connections), delivered: Vec::new() }
    }

    /// Reads on through reconnects instead of stopping at each: for a reader that cannot start
    /// again from a stored position (the main's offline rebuild), on an ordered consumer, which
    /// goes on by itself from the last message delivered. (Stopping would drop the messages of
    /// a batch half taken.)
    pub fn through_reconnects(mut self) -> Batches<T> {
        self.connections = None;
        self
    }

    /// The next batch, or `None` once the service shuts down.
    pub async fn next(&mut self) -> Result<Option<Vec<T>>, Interrupted> {
        let batch = tokio::select! {
            b = next_batch(&mut self.messages, self.max) => b,
            _ = self.shutdown.changed() => return Ok(None),
            () = reconnected(&mut self.connections) => return Err(Interrupted::Reconnected),
        };
        let messages = match batch {
            None => return Err(Interrupted::Ended(self.stream)),
            Some(Err(detail)) => return Err(Interrupted::Failed { stream: self.stream, detail }),
            Some(Ok(messages)) => messages,
        };
        self.delivered.clear();
        let mut batch = Vec::with_capacity(messages.len());
        for msg in messages {
            if let Some(item) = (self.read)(&msg) {
                batch.push(item);
                self.delivered.push(msg);
            }
        }
        Ok(Some(batch))
    }

    /// Acknowledges the first `n` messages of the last batch with one ack of the `n`th, which
    /// covers the earlier ones on a consumer that acknowledges all (a remote's).
    pub async fn ack_first(&mut self, n: usize) {
        if let Some(last) = n.checked_sub(1) {
            self.ack_each([last]).await;
        }
    }

    /// Acknowledges each of these messages of the last batch, by place.
    pub fn ack_each(&mut self, places: impl IntoIterator<Item = usize>) -> impl Future<Output = ()> + Send + '_ {
        // Taken out of the iterator first, so that the future holds no closure of the caller's.
        let places: Vec<usize> = places.into_iter().collect();
        async move {
            for msg in places.into_iter().filter_map(|i| self.delivered.get(i)) {
                if let Err(e) = msg.ack().await {
                    // What was committed and not acknowledged comes again, and is recognised (by
                    // its version, or its number in its upload queue).
                    tracing::warn!("acknowledging a message of {} failed: {e}", self.stream);
                }
            }
        }
    }
}

/// Returns when the client has connected again (at once if it is gone); never without
/// `connections`.
async fn reconnected(connections: &mut Option<watch::Receiver<u64>>) {
    match connections {
        Some(connections) => {
            let _ = connections.changed().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits for one message, then takes whatever else is already there, up to `max`: batches
/// grow with the backlog and shrink to one message when traffic is light, so the latency of a
/// single change stays that of one message. While the server says more messages are pending
/// for this consumer, it also waits (briefly) for them: during a rebuild or a catch-up, large
/// transactions are what makes applying cheap.
async fn next_batch(messages: &mut Messages, max: usize) -> Option<Result<Vec<jetstream::Message>, String>> {
    let pending = |m: &jetstream::Message| m.info().map(|i| i.pending).unwrap_or(0);
    let first = match messages.next().await? {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    let mut more_coming = pending(&first) > 0;
    let mut batch = vec![first];
    while batch.len() < max {
        let next = match messages.next().now_or_never() {
            Some(next) => next,
            None if more_coming => match tokio::time::timeout(BATCH_WAIT, messages.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => break,
        };
        match next {
            Some(Ok(m)) => {
                more_coming = pending(&m) > 0;
                batch.push(m);
            }
            // An error ends the batch early; one that persists shows again on the next call.
            _ => break,
        }
    }
    Some(Ok(batch))
}

/// How long a batch waits for messages the server said were pending.
const BATCH_WAIT: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connection_attempt_is_made_at_once_and_later_ones_back_off_to_a_second() {
        let delays: Vec<u128> = [1, 2, 3, 11, 12, 100].map(|n| reconnect_delay(n).as_millis()).to_vec();
        assert_eq!(delays, [0, 100, 200, 1000, 1000, 1000]);
    }
}
