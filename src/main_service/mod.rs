//! The main: owner of the authoritative projection, writer of `CRM_EVENTS`, publisher of
//! what routing sends to `CRM_SYNC`, merger of what remotes upload.
//!
//! A write is published to `CRM_EVENTS` first (with `Nats-Msg-Id` and
//! `Nats-Expected-Last-Subject-Sequence`); the projector applies it from the stream, and the
//! write returns once the projector has applied it (read-your-writes). Nothing writes the
//! projection except the projector, so the projection is always a prefix of the stream.

mod credentials;
mod lifecycle;
mod merger;
mod projector;
mod publisher;
mod remotes;
mod sets;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::error::ServiceError;
use crate::hlc::Clock;
use crate::model::Record;
use crate::model::{self, Field, Fields, Kind, Value};
use crate::names;
use crate::store::{APPLIED, DATABASE_ID, KeyEntry, Store, StoreError};
use crate::supervise::{Stop, supervise};
use crate::transport::{Incoming, Nats, TransportError};
use crate::wall_clock::WallClock;
use crate::wire::{self, EVENTS_STREAM, Envelope, ORIGIN_MAIN, Op, PRODUCT, SCHEMA_MAJOR};

/// How long a write waits for the projector before it reports the projection as behind.
const APPLY_WAIT: Duration = Duration::from_secs(15);
/// The same for a change of configuration (a set, a user, a remote), which may move many
/// records: creating a set on a main of a million contacts routes all of them.
const CONFIG_APPLY_WAIT: Duration = Duration::from_secs(600);
/// How often a write is retried when another writer to the same record came first. Within
/// one main, writes to one record take turns ([`Inner::record_locks`]), so a race is only ever
/// lost to a writer outside this process; each attempt first catches up with the stream.
const MAX_ATTEMPTS: usize = 100;
/// How long the main remembers a client's idempotency key, and how often it forgets older ones.
const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const KEY_FORGET_INTERVAL: Duration = Duration::from_secs(600);
/// How long a write waits for its change to be read back while NATS is unreachable.
const OFFLINE_WAIT: Duration = Duration::from_secs(2);
/// Stripes of the per-record write locks: writes to different records rarely share one.
const RECORD_LOCKS: usize = 4096;
pub const PROJECTOR_BATCH: usize = 2000;

#[derive(Debug, Clone)]
pub struct MainConfig {
    pub nats_url: String,
    pub data_dir: PathBuf,
    /// The clock remotes expire by.
    pub clock: WallClock,
    /// How often the main looks for remotes that expired.
    pub expiry_check: Duration,
    /// The NATS authority file (`crmsync nats-auth`): the main connects with credentials of
    /// its own and issues each remote's. `None`: a server without authentication.
    pub authority: Option<PathBuf>,
    /// The certificate authority of NATS's TLS certificate (a PEM file): the main's connections
    /// require TLS, and each remote's bundle carries the authority.
    pub nats_ca: Option<PathBuf>,
    /// Copies JetStream keeps of each stream (and so of each consumer): 1 on a single server,
    /// 3 on a cluster, where the loss of one node loses nothing. Streams made with another
    /// count are changed to this one at start.
    pub replicas: usize,
}

impl MainConfig {
    /// How the main's own connections log in: over TLS if configured, with credentials of the
    /// authority, if any.
    fn login(&self) -> anyhow::Result<crate::transport::Login> {
        let creds = self.authority.as_ref().map(|path| crate::identity::Authority::load(path)).transpose()?;
        Ok(crate::transport::Login {
            creds: creds.map(|a| a.main_creds()),
            inbox_prefix: None,
            ca: self.nats_ca.clone(),
        })
    }

    pub fn new(nats_url: String, data_dir: PathBuf) -> MainConfig {
        MainConfig {
            nats_url,
            data_dir,
            clock: WallClock::system(),
            expiry_check: EXPIRY_CHECK,
            authority: None,
            nats_ca: None,
            replicas: 1,
        }
    }
}

/// How often the main looks for remotes that expired, unless configured: a remote expires
/// after days, so a minute late is on time.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(60);

pub use crate::bundle::{Bundle, consumer_name};
pub use credentials::{ADMIN_TOKEN_FILE, ADMIN_USER};

#[derive(Clone)]
pub struct Main {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    nats: Nats,
    config: MainConfig,
    database_id: String,
    clock: Clock,
    applied: watch::Receiver<u64>,
    /// Writes to one record take turns: each decides on the state the previous one left, so
    /// PATCHes of different fields of one record never lose a race against each other.
    record_locks: Vec<tokio::sync::Mutex<()>>,
    shutdown: watch::Sender<bool>,
    /// Changes when a halted remote is resumed, so the merger merges the uploads it kept.
    resumed: watch::Sender<u64>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Each remote's NATS credentials, when this main issues them.
    credentials: Option<credentials::Credentials>,
}

/// Opens the main's projection, rebuilding a file of another layout from CRM_EVENTS and
/// recovering a damaged one.
async fn open_projection(config: &MainConfig) -> anyhow::Result<Store> {
    let path = config.data_dir.join("main.redb");
    Ok(match Store::open(&path) {
        Err(StoreError::Format { found, .. }) => {
            // The projection is a copy of CRM_EVENTS: a file of another layout is rebuilt.
            tracing::warn!("{} has storage format {found}; rebuilding it from CRM_EVENTS", path.display());
            rebuild(config, |_, _| {}).await?;
            Store::open(&path)?
        }
        Err(StoreError::Damaged { detail, .. }) => {
            recover(config, &detail).await?;
            Store::open(&path)?
        }
        other => other?,
    })
}

/// Connects to NATS, with the main's own credentials when it issues the remotes' ones.
async fn connect(config: &MainConfig) -> anyhow::Result<(Option<credentials::Credentials>, Nats)> {
    let base = crate::transport::Login { ca: config.nats_ca.clone(), ..Default::default() };
    let (credentials, login) = match &config.authority {
        Some(path) => {
            let (credentials, login) = credentials::Credentials::open(path.clone(), &config.nats_url, base).await?;
            (Some(credentials), login)
        }
        None => (None, base),
    };
    let nats = Nats::connect_as(&config.nats_url, "crmsync-main", &login).await?;
    Ok((credentials, nats))
}

/// Creates the streams on first start and checks that the data directory and the NATS server
/// belong to the same database; returns its id.
async fn claim_database(config: &MainConfig, store: &Store, nats: &Nats) -> anyhow::Result<String> {
    let stored_id = store.meta_str(DATABASE_ID)?;
    let candidate = stored_id.clone().unwrap_or_else(names::new_id);
    let database_id = nats.ensure_streams(&candidate, config.replicas).await?;
    if let Some(stored_id) = stored_id
        && stored_id != database_id
    {
        anyhow::bail!(
            "the data directory {} belongs to database {stored_id}, but the NATS server at {} holds database {database_id}; \
             point --nats at the right server, or use another --data directory",
            config.data_dir.display(),
            config.nats_url
        );
    }
    Ok(database_id)
}

impl Main {
    /// Opens the main's data directory, connects to NATS, creates the streams on first start,
    /// and starts the projector and the outbox publisher.
    pub async fn start(config: MainConfig) -> anyhow::Result<Main> {
        crate::files::private_dir(&config.data_dir)?;
        let store = open_projection(&config).await?;
        let (credentials, nats) = connect(&config).await?;
        let database_id = claim_database(&config, &store, &nats).await?;
        store.write(true, |t| {
            t.set_meta_str(DATABASE_ID, &database_id)?;
            t.set_meta_str("role", "main")
        })?;
        let (applied_tx, applied) = watch::channel(store.meta(APPLIED)?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let notify = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            store: store.clone(),
            nats: nats.clone(),
            config,
            database_id: database_id.clone(),
            clock: Clock::new(),
            applied,
            record_locks: (0..RECORD_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            shutdown,
            resumed: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
            credentials,
        });
        let projector =
            Projector { store: store.clone(), nats: nats.clone(), database_id, applied_tx, notify: notify.clone() };
        let projector = tokio::spawn(run_projector(projector, shutdown_rx.clone()));
        let publisher = tokio::spawn(publisher::run(store.clone(), nats, notify, shutdown_rx.clone()));
        let flusher = tokio::spawn(store.flush_periodically(shutdown_rx));
        inner.tasks.lock().unwrap().extend([projector, publisher, flusher]);
        let main = Main { inner };
        let merger = tokio::spawn(merger::run(main.clone(), main.inner.shutdown.subscribe()));
        let expiry = main.inner.config.expiry_check;
        let expiry = tokio::spawn(lifecycle::run_expiry(main.clone(), expiry, main.inner.shutdown.subscribe()));
        main.inner.tasks.lock().unwrap().extend([merger, expiry]);
        main.first_administrator().await?;
        main.reconcile_creds().await?;
        Ok(main)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn database_id(&self) -> &str {
        &self.inner.database_id
    }

    /// Stops the projector and the outbox publisher and waits for them.
    pub async fn stop(&self) {
        let _ = self.inner.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Waits until the projector has applied `seq`.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), ServiceError> {
        self.wait_applied_for(seq, APPLY_WAIT).await
    }

    async fn wait_applied_for(&self, seq: u64, limit: Duration) -> Result<(), ServiceError> {
        let mut rx = self.inner.applied.clone();
        let started = tokio::time::Instant::now();
        let mut offline_since = None;
        loop {
            tokio::select! {
                r = rx.wait_for(|a| *a >= seq) => return r.map(|_| ()).map_err(|_| ServiceError::Internal(
                    "the main is shutting down".into())),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            // The projector reads the change back from NATS: without NATS it cannot, so say so
            // at once rather than after the whole wait.
            if self.inner.nats.is_connected() {
                offline_since = None;
            } else if offline_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= OFFLINE_WAIT {
                return Err(ServiceError::Committed(format!(
                    "the change is committed (CRM_EVENTS sequence {seq}), but NATS became unreachable before the \
                     main could read it back; it shows once NATS is back. Do not make it again (repeating the \
                     request with the same Idempotency-Key is safe)"
                )));
            }
            if let Some(e) = self.inner.store.unwritable()
                && started.elapsed() >= OFFLINE_WAIT
            {
                return Err(ServiceError::Committed(format!(
                    "the change is committed (CRM_EVENTS sequence {seq}), but the main cannot write its own copy: \
                     {e} It shows once there is room. Do not make it again (repeating the request with the same \
                     Idempotency-Key is safe)"
                )));
            }
            if started.elapsed() >= limit {
                return Err(ServiceError::Committed(format!(
                    "the change is committed to CRM_EVENTS at sequence {seq}, but the main's projection has not \
                     applied it within {} s; it will appear once the projector catches up (see the main's log)",
                    limit.as_secs()
                )));
            }
        }
    }

    /// Waits until the projector has applied everything in `CRM_EVENTS` now.
    pub async fn catch_up(&self) -> Result<(), ServiceError> {
        let last = self.inner.nats.last_sequence(EVENTS_STREAM).await?;
        self.wait_applied(last).await
    }

    /// Commits one change to a record. `decide` sees the current record and returns the new
    /// fields, `None` to delete, or an error; it is called again if another write to the same
    /// record commits first, so no change is ever made against a stale state.
    pub(crate) async fn commit(
        &self,
        kind: Kind,
        id: &str,
        decide: impl Fn(Option<&Record>) -> Result<Decision, ServiceError>,
    ) -> Result<Option<Record>, ServiceError> {
        self.commit_from(ORIGIN_MAIN, kind, id, decide).await
    }

    /// [`Main::commit`] of a change made at `origin` (the main, or a remote whose edit is merged).
    pub(crate) async fn commit_from(
        &self,
        origin: &str,
        kind: Kind,
        id: &str,
        decide: impl Fn(Option<&Record>) -> Result<Decision, ServiceError>,
    ) -> Result<Option<Record>, ServiceError> {
        match self.commit_keyed(origin, kind, id, None, None, decide).await? {
            Committed::Now(stored) => Ok(stored),
            Committed::Before(entry) => Ok(self.inner.store.get(entry.kind, &entry.id)?),
        }
    }

    /// [`Main::commit_from`] with a client's idempotency key: if a change was committed with
    /// that key before (a request repeated after an unclear answer), nothing is changed and
    /// that change is returned. `upload` is the place (`queue:n`) of the remote upload the
    /// change merges, recorded with it.
    async fn commit_keyed(
        &self,
        origin: &str,
        kind: Kind,
        id: &str,
        key: Option<&str>,
        upload: Option<&str>,
        decide: impl Fn(Option<&Record>) -> Result<Decision, ServiceError>,
    ) -> Result<Committed, ServiceError> {
        if let Some(entry) = self.key_entry(key)? {
            return Ok(Committed::Before(entry));
        }
        if let Some(e) = self.inner.store.unwritable() {
            // The projector could not apply it: refuse before committing anything.
            return Err(e.into());
        }
        let subject = wire::event_subject(kind, id);
        let _turn = self.record_lock(kind, id).lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (current, known) = self.inner.store.get_known(kind, id)?;
            let decision = match decide(current.as_ref()) {
                Ok(d) => d,
                Err(e) => {
                    // The change may have been committed by an earlier request with this key
                    // that was only applied just now (a create that now finds its record).
                    if key.is_some() {
                        self.catch_up().await?;
                        if let Some(entry) = self.key_entry(key)? {
                            return Ok(Committed::Before(entry));
                        }
                    }
                    return Err(e);
                }
            };
            let (op, record) = match decision {
                Decision::Unchanged => return Ok(Committed::Now(current)),
                Decision::Upsert(fields) => (Op::Upsert, Some(fields)),
                Decision::Delete => (Op::Delete, None),
            };
            let envelope = self.envelope(origin, kind, id, known, op, record);
            let msg_id = key.unwrap_or(&envelope.event);
            match self.inner.nats.publish_event(subject.clone(), msg_id, known, envelope.encode(), key, upload).await {
                Ok((seq, repeated)) => return self.read_back(kind, id, key, seq, repeated).await,
                Err(TransportError::WrongLastSequence) => {
                    // Someone else changed the record: catch up with the stream and decide again.
                    self.catch_up().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Busy(format!(
            "the {kind} {id} is being changed by another writer to CRM_EVENTS at the same time (is a second main \
             running on this database?); {MAX_ATTEMPTS} attempts lost the race. Nothing was changed; try again"
        )))
    }

    /// The event of a change to a record at version `known`, made at `origin`.
    fn envelope(&self, origin: &str, kind: Kind, id: &str, known: u64, op: Op, record: Option<Fields>) -> Envelope {
        Envelope::change(&self.inner.database_id, origin, kind, id, op, known, record)
    }

    /// What a change published at `seq` committed, once the projector has applied it: the
    /// record as it is now, or the change first committed with the same key (`repeated`: the
    /// publish was a duplicate).
    async fn read_back(
        &self,
        kind: Kind,
        id: &str,
        key: Option<&str>,
        seq: u64,
        repeated: bool,
    ) -> Result<Committed, ServiceError> {
        let limit = if matches!(kind, Kind::Set | Kind::User | Kind::Remote) { CONFIG_APPLY_WAIT } else { APPLY_WAIT };
        self.wait_applied_for(seq, limit).await?;
        if repeated && let Some(entry) = self.key_entry(key)? {
            return Ok(Committed::Before(entry));
        }
        Ok(Committed::Now(self.inner.store.get(kind, id)?))
    }

    /// The change committed with an idempotency key, once applied.
    fn key_entry(&self, key: Option<&str>) -> Result<Option<KeyEntry>, ServiceError> {
        match key {
            Some(key) => Ok(self.inner.store.key_entry(key)?),
            None => Ok(None),
        }
    }

    /// The record a change committed with an idempotency key left, checked to be a change of
    /// the same kind of record (and the same record, when the request named it).
    fn repeated(&self, key: &str, entry: KeyEntry, kind: Kind, id: Option<&str>) -> Result<String, ServiceError> {
        if entry.kind != kind || id.is_some_and(|id| id != entry.id) {
            return Err(ServiceError::key_reused(key, entry.kind, &entry.id));
        }
        Ok(entry.id)
    }

    fn record_lock(&self, kind: Kind, id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (kind, id).hash(&mut h);
        &self.inner.record_locks[(h.finish() % RECORD_LOCKS as u64) as usize]
    }

    /// Checks that every reference in a patch points at an existing record.
    fn check_refs(&self, kind: Kind, patch: &model::Patch) -> Result<(), ServiceError> {
        for (field, to, id) in model::refs(kind, patch) {
            if self.inner.store.get(to, id)?.is_none() {
                return Err(ServiceError::MissingRef { field: field.to_owned(), kind: to, id: id.to_owned() });
            }
        }
        Ok(())
    }

    pub async fn create(&self, kind: Kind, body: &serde_json::Value) -> Result<(String, Record), ServiceError> {
        self.create_keyed(kind, body, None).await
    }

    /// Creates a record; with an idempotency key, a repeated request creates nothing and
    /// answers with the record the first one created.
    pub async fn create_keyed(
        &self,
        kind: Kind,
        body: &serde_json::Value,
        key: Option<&str>,
    ) -> Result<(String, Record), ServiceError> {
        check_data_kind(kind)?;
        let input = model::parse_input(kind, body, true)?;
        self.check_refs(kind, &input.patch)?;
        let id = input.id.clone().unwrap_or_else(names::new_id);
        let stamp = self.inner.clock.now();
        let committed = self
            .commit_keyed(ORIGIN_MAIN, kind, &id, key, None, |current| {
                if current.is_some() {
                    return Err(ServiceError::Exists { kind, id: id.clone() });
                }
                let mut fields = Fields::new();
                crate::merge::apply_patch(&mut fields, &input.patch, stamp);
                model::check_record(kind, &fields)?;
                Ok(Decision::Upsert(fields))
            })
            .await?;
        let (id, stored) = match committed {
            Committed::Now(stored) => (id, stored),
            Committed::Before(entry) => {
                let id = self.repeated(key.unwrap_or_default(), entry, kind, input.id.as_deref())?;
                let stored = self.inner.store.get(kind, &id)?;
                (id, stored)
            }
        };
        let stored = stored.ok_or_else(|| ServiceError::NotFound { kind, id: id.clone() })?;
        Ok((id, stored))
    }

    pub async fn update(&self, kind: Kind, id: &str, body: &serde_json::Value) -> Result<Record, ServiceError> {
        self.update_keyed(kind, id, body, None).await
    }

    pub async fn update_keyed(
        &self,
        kind: Kind,
        id: &str,
        body: &serde_json::Value,
        key: Option<&str>,
    ) -> Result<Record, ServiceError> {
        check_data_kind(kind)?;
        let input = model::parse_input(kind, body, false)?;
        self.check_refs(kind, &input.patch)?;
        let stamp = self.inner.clock.now();
        let committed = self
            .commit_keyed(ORIGIN_MAIN, kind, id, key, None, |current| {
                let Some(current) = current else {
                    return Err(ServiceError::NotFound { kind, id: id.to_owned() });
                };
                let mut fields = current.fields.clone();
                if crate::merge::apply_patch(&mut fields, &input.patch, stamp) {
                    model::check_record(kind, &fields)?;
                    Ok(Decision::Upsert(fields))
                } else {
                    Ok(Decision::Unchanged)
                }
            })
            .await?;
        let stored = match committed {
            Committed::Now(stored) => stored,
            Committed::Before(entry) => {
                self.repeated(key.unwrap_or_default(), entry, kind, Some(id))?;
                self.inner.store.get(kind, id)?
            }
        };
        stored.ok_or_else(|| ServiceError::NotFound { kind, id: id.to_owned() })
    }

    /// Deletes a record; a contact's notes, histories, activities and memberships go first, so
    /// no child is ever left without its contact.
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<(), ServiceError> {
        self.delete_from(ORIGIN_MAIN, kind, id, None, None).await.map(|_| ())
    }

    pub async fn delete_keyed(&self, kind: Kind, id: &str, key: Option<&str>) -> Result<(), ServiceError> {
        self.delete_from(ORIGIN_MAIN, kind, id, key, None).await.map(|_| ())
    }

    /// [`Main::delete`] of a delete made at `origin`; the idempotency key and the upload's
    /// place go with the delete of the record itself, the last of its events. Returns whether
    /// that delete was committed now.
    pub(crate) async fn delete_from(
        &self,
        origin: &str,
        kind: Kind,
        id: &str,
        key: Option<&str>,
        upload: Option<&str>,
    ) -> Result<bool, ServiceError> {
        check_data_kind(kind)?;
        if let Some(entry) = self.key_entry(key)? {
            self.repeated(key.unwrap_or_default(), entry, kind, Some(id))?;
            return Ok(false);
        }
        if self.inner.store.get(kind, id)?.is_none() {
            return Err(ServiceError::NotFound { kind, id: id.to_owned() });
        }
        if kind == Kind::Contact {
            for (child_kind, child_id) in self.inner.store.children(id)? {
                self.commit_from(origin, child_kind, &child_id, |current| {
                    Ok(if current.is_some() { Decision::Delete } else { Decision::Unchanged })
                })
                .await?;
            }
        }
        let committed = self
            .commit_keyed(origin, kind, id, key, upload, |current| {
                if current.is_none() {
                    return Err(ServiceError::NotFound { kind, id: id.to_owned() });
                }
                Ok(Decision::Delete)
            })
            .await?;
        match committed {
            Committed::Before(entry) => {
                self.repeated(key.unwrap_or_default(), entry, kind, Some(id))?;
                Ok(false)
            }
            Committed::Now(_) => Ok(true),
        }
    }

    /// Registers a remote: creates its durable consumer on `CRM_SYNC` and returns its bundle.
    pub async fn create_remote(&self, req: &RemoteRequest) -> Result<Bundle, ServiceError> {
        names::check("remote name", &req.name)?;
        names::check("set name", &req.set)?;
        let expires_days = req.expires_days.unwrap_or(crate::lifecycle::DEFAULT_EXPIRES_DAYS);
        if !crate::lifecycle::EXPIRES_DAYS.contains(&expires_days) {
            return Err(ServiceError::Invalid(format!(
                "expires_days is {expires_days}; a remote expires after 2 to 90 days without syncing"
            )));
        }
        if self.inner.store.get(Kind::Set, &req.set)?.is_none() {
            return Err(ServiceError::MissingRef { field: "set".into(), kind: Kind::Set, id: req.set.clone() });
        }
        if self.inner.store.get(Kind::Remote, &req.name)?.is_some() {
            return Err(ServiceError::Exists { kind: Kind::Remote, id: req.name.clone() });
        }
        let consumer = consumer_name(&req.name);
        self.inner.nats.create_remote_consumer(&consumer, wire::remote_filters(&req.set, &req.name)).await?;
        // By the lifecycle clock, which its expiry is counted by.
        let created_ms = self.inner.config.clock.now_ms();
        let stamp = self.inner.clock.now();
        let creds = self.issue_creds(&req.name, &consumer, &req.set)?;
        let mut fields: Fields = [
            ("set", Value::Str(req.set.clone())),
            ("expires_days", Value::Int(expires_days.into())),
            ("created_ms", Value::Int(created_ms as i64)),
            ("enabled", Value::Bool(true)),
        ]
        .into_iter()
        .map(|(k, value)| (k.to_owned(), Field { value, stamp }))
        .collect();
        if let Some((_, user)) = &creds {
            fields.insert(credentials::NATS_USER.into(), Field { value: Value::Str(user.clone()), stamp });
        }
        let name = req.name.clone();
        self.commit(Kind::Remote, &name, |current| {
            if current.is_some() {
                return Err(ServiceError::Exists { kind: Kind::Remote, id: name.clone() });
            }
            Ok(Decision::Upsert(fields.clone()))
        })
        .await?;
        let nats_url = req.nats_url.clone().unwrap_or_else(|| self.inner.config.nats_url.clone());
        let bundle = Bundle::of_remote(&self.inner.database_id, &req.name, &fields, nats_url);
        Ok(Bundle { creds: creds.map(|(creds, _)| creds), users: self.users()?, nats_ca: self.nats_ca()?, ..bundle })
    }

    /// The NATS server's certificate authority (PEM), for a bundle, when NATS speaks TLS.
    fn nats_ca(&self) -> Result<Option<String>, ServiceError> {
        let Some(path) = &self.inner.config.nats_ca else { return Ok(None) };
        std::fs::read_to_string(path).map(Some).map_err(|e| {
            ServiceError::Internal(format!("cannot read the NATS certificate authority {}: {e}", path.display()))
        })
    }

    /// Every user, for a bundle.
    fn users(&self) -> Result<Vec<(String, Fields)>, ServiceError> {
        let mut users = Vec::new();
        self.inner.store.for_each(Kind::User, |id, user| users.push((id.to_owned(), user.fields)))?;
        Ok(users)
    }

    /// The bundle of a registered remote, as `create_remote` returned it.
    pub fn bundle(&self, name: &str) -> Result<Bundle, ServiceError> {
        let stored = self
            .inner
            .store
            .get(Kind::Remote, name)?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: name.to_owned() })?;
        Ok(Bundle::of_remote(&self.inner.database_id, name, &stored.fields, self.inner.config.nats_url.clone()))
    }

    /// Each remote's edits waiting for the main: in `CRM_UP`, and kept at the main (halted, or
    /// waiting for an earlier one); `None` for one whose count NATS could not give.
    pub async fn remote_uploads_waiting(&self, names: &[&str]) -> Vec<Option<u64>> {
        let nats = &self.inner.nats;
        let kept = self.inner.store.parked_by_remote().unwrap_or_default();
        let queued =
            futures::future::join_all(names.iter().map(|n| nats.for_status(nats.uploads_waiting_from(n)))).await;
        names.iter().zip(queued).map(|(n, q)| Some(q? + kept.get(*n).copied().unwrap_or(0))).collect()
    }

    /// Messages waiting for a remote, from its consumer.
    pub async fn remote_backlog(&self, name: &str) -> Option<u64> {
        let consumer = self.consumer_of(name).ok()?;
        self.inner.nats.remote_backlog(&consumer).await.ok()
    }

    pub async fn status(&self) -> Result<serde_json::Value, ServiceError> {
        let counts = self.inner.store.counts()?;
        let nats = &self.inner.nats;
        let stream_last = nats.for_status(nats.last_sequence(EVENTS_STREAM)).await;
        let applied = self.inner.store.meta(APPLIED)?;
        let (refused, log) = self.inner.store.sync_log(10)?;
        Ok(serde_json::json!({
            "role": "main",
            "product": PRODUCT,
            "schema": SCHEMA_MAJOR,
            "database_id": self.inner.database_id,
            "nats": {
                "url": self.inner.config.nats_url,
                "connected": self.inner.nats.is_connected(),
                "replicas": self.inner.config.replicas,
            },
            "counts": model::counts_json(&counts),
            "applied": applied,
            "stream_last": stream_last,
            "backlog": stream_last.map(|l| l.saturating_sub(applied)),
            "outbox": self.inner.store.outbox_len()?,
            "uploads_waiting": nats.for_status(nats.uploads_waiting()).await,
            "accepting_syncs": nats.for_status(nats.accepting_uploads()).await,
            // Uploads kept at the main: of a halted remote, until it is resumed, or that came
            // before an earlier upload of the same remote, until that one arrives (the remote
            // sends it again by itself).
            "uploads_parked": self.inner.store.parked_len()?,
            "refused": refused,
            "sync_log": log.iter().map(|(_, e)| e.to_json()).collect::<Vec<_>>(),
            "quarantined": self.inner.store.quarantine(0)?.0,
            "recovered": self.inner.store.meta_str(crate::store::RECOVERED)?
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok()),
        }))
    }
}

/// What a commit did: committed a change now, or found one committed before with the same
/// idempotency key.
enum Committed {
    Now(Option<Record>),
    Before(KeyEntry),
}

/// What a write decided, given the current record.
pub(crate) enum Decision {
    Unchanged,
    Upsert(Fields),
    Delete,
}

fn check_data_kind(kind: Kind) -> Result<(), ServiceError> {
    if Kind::DATA.contains(&kind) {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!("{} are changed through /v1/{}", kind.plural(), kind.plural())))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequest {
    pub name: String,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRequest {
    pub name: String,
    pub set: String,
    #[serde(default)]
    pub expires_days: Option<u32>,
    /// The NATS address the remote site should use, when it differs from the main's.
    #[serde(default)]
    pub nats_url: Option<String>,
}

/// The projector task: `CRM_EVENTS` in order from the stored position, applied batch by batch,
/// until shutdown. Any failure starts it again from the stored position.
async fn run_projector(mut projector: Projector, shutdown: watch::Receiver<bool>) {
    let _ = supervise("projector", shutdown, &mut projector, |p, shutdown| {
        async move { project(p, shutdown).await.map_err(Stop::from) }.boxed()
    })
    .await;
}

/// What the projector needs, kept across its restarts.
struct Projector {
    store: Store,
    nats: Nats,
    database_id: String,
    applied_tx: watch::Sender<u64>,
    notify: Arc<Notify>,
}

async fn project(p: &Projector, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let start = p.store.meta(APPLIED)? + 1;
    // Loaded afresh at every start: a batch that failed may have changed it half-way.
    let state = Arc::new(Mutex::new(projector::RoutingState::load(&p.store)?));
    let mut batches = p.nats.events(start, PROJECTOR_BATCH, shutdown).await?;
    let mut last_forget = std::time::Instant::now();
    while let Some(incoming) = batches.next().await? {
        let forget_keys = last_forget.elapsed() >= KEY_FORGET_INTERVAL;
        if forget_keys {
            last_forget = std::time::Instant::now();
        }
        // Large batches (a catch-up) commit durably: many non-durable commits in a row make
        // redb's file grow, because pages are only freed by a durable commit.
        let durable = incoming.len() >= crate::store::DURABLE_BATCH;
        let last = apply_events(&p.store, &state, &p.database_id, incoming, durable, forget_keys).await?;
        p.applied_tx.send_replace(last);
        p.notify.notify_one();
    }
    Ok(())
}

/// Applies a batch of events in one transaction (forgetting expired idempotency keys in it
/// when `forget_keys`), and returns the position applied.
async fn apply_events(
    store: &Store,
    state: &Arc<Mutex<projector::RoutingState>>,
    database_id: &str,
    incoming: Vec<Incoming>,
    durable: bool,
    forget_keys: bool,
) -> anyhow::Result<u64> {
    let (store, state, db) = (store.clone(), state.clone(), database_id.to_owned());
    let last = tokio::task::spawn_blocking(move || {
        let mut state = state.lock().unwrap();
        store.write(durable, |t| {
            let last = projector::apply_batch(t, &mut state, &db, &incoming)?;
            if forget_keys {
                t.forget_keys(crate::hlc::wall_ms().saturating_sub(KEY_LIFETIME.as_millis() as u64))?;
            }
            Ok(last)
        })
    })
    .await??;
    Ok(last)
}

/// Set when a damaged file lost the merge positions of the remotes' upload queues: the merger
/// then takes the first upload it sees of a queue it has no position for as that queue's next.
pub const UPLOAD_POSITIONS_LOST: &str = "upload_positions_lost";

/// Sets a damaged `main.redb` aside and rebuilds the main's projection from `CRM_EVENTS` into a
/// new one. What is not a copy of the stream is kept as far as it reads: the merge position of
/// each remote's upload queue, parked uploads and the sync log. Routing starts again from the
/// first change that may not have been published.
async fn recover(config: &MainConfig, reason: &str) -> anyhow::Result<()> {
    use crate::store::{RECOVERED, Recovery};
    let path = config.data_dir.join("main.redb");
    let (aside, salvage) = crate::store::set_aside(&path, reason, EVENTS_STREAM).map_err(anyhow::Error::msg)?;
    let meta_read = !salvage.unreadable.contains(&"meta");
    // Everything up to the applied position was routed, except what still waited in the outbox.
    let route_from = match (meta_read && !salvage.unreadable.contains(&"outbox"), salvage.meta.get(APPLIED)) {
        (true, Some(applied)) => salvage.outbox_first.unwrap_or(applied + 1).min(applied + 1),
        _ => 0,
    };
    let recovery = Recovery {
        at_ms: crate::hlc::wall_ms(),
        reason: reason.to_owned(),
        damaged_file: aside,
        uploads_kept: salvage.parked.len(),
        uploads_file: None,
        uploads_scanned: false,
        unreadable: salvage.unreadable.iter().map(|t| t.to_string()).collect(),
    };
    let database_id = match salvage.meta_str.get(DATABASE_ID) {
        Some(id) => id.clone(),
        None => Nats::connect_as(&config.nats_url, "crmsync-main-recovery", &config.login()?)
            .await?
            .database_id()
            .await?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is damaged and the NATS server at {} holds no CRM_EVENTS to rebuild it from; point --nats at \
                 the server of this database",
                    path.display(),
                    config.nats_url
                )
            })?,
    };
    let store = Store::open(&path)?;
    store.write(true, |t| {
        salvage.restore(t, |k| {
            k.starts_with("upload_next:")
                || k.starts_with(&crate::store::last_sync_key(""))
                || [crate::store::SESSIONS_NEXT, "sync_log_next"].contains(&k)
        })?;
        t.set_meta_str(DATABASE_ID, &database_id)?;
        t.set_meta_str("role", "main")?;
        t.set_meta(projector::ROUTE_FROM, route_from)?;
        if !meta_read {
            t.set_meta(UPLOAD_POSITIONS_LOST, 1)?;
        }
        t.set_meta_str(RECOVERED, &serde_json::to_string(&recovery).unwrap_or_default())
    })?;
    drop(store);
    rebuild(config, |_, _| {}).await?;
    Ok(())
}

/// Rebuilds the main's projection from `CRM_EVENTS`, offline: the main service must not be
/// running. Routed messages already published are not published again. Returns the number of
/// events replayed.
pub async fn rebuild(config: &MainConfig, progress: impl Fn(u64, u64)) -> anyhow::Result<u64> {
    let store = Store::open_any_format(&config.data_dir.join("main.redb"))?;
    let nats = Nats::connect_as(&config.nats_url, "crmsync-main-rebuild", &config.login()?).await?;
    let database_id = store.meta_str(DATABASE_ID)?.ok_or_else(|| {
        anyhow::anyhow!("{} holds no main database; start `crmsync main serve` first", config.data_dir.display())
    })?;
    let last = nats.last_sequence(EVENTS_STREAM).await?;
    let applied = store.meta(APPLIED)?;
    let route_from = store.meta(projector::ROUTE_FROM)?.max(applied + 1);
    store.clear_projection(|t| t.set_meta(projector::ROUTE_FROM, route_from))?;
    // Offline: nothing shuts the rebuild down but the process.
    let (_running, shutdown) = watch::channel(false);
    let mut batches = nats.events(1, PROJECTOR_BATCH, shutdown).await?.through_reconnects();
    let state = Arc::new(Mutex::new(projector::RoutingState::default()));
    let mut applied = 0u64;
    let mut done = 0u64;
    while applied < last {
        let Some(incoming) = batches.next().await? else { anyhow::bail!("the rebuild was stopped") };
        done += incoming.len() as u64;
        applied = apply_events(&store, &state, &database_id, incoming, true, false).await?;
        progress(applied, last);
    }
    store.write(true, |_| Ok(()))?;
    Ok(done)
}
