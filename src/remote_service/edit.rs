//! Edits made at a remote. They are written to the remote's own projection at once (its users
//! never wait for the network) and queued for `CRM_UP` in the same durable transaction; the
//! uploader publishes the queue in order whenever NATS is reachable, and forgets an edit only
//! once `CRM_UP` has acknowledged it. The main merges each edit and routes the result back like
//! any change; an edit it refuses comes back as a `reject` (see projector.rs).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Inner, Remote};
use crate::apply::HELD_LOCALLY;
use crate::error::ServiceError;
use crate::model::Record;
use crate::model::{self, Fields, Kind};
use crate::names;
use crate::outgoing::Upload;
use crate::store::{StoreError, Tables};
use crate::supervise::shut_down;
use crate::wire::{self, Envelope, Op};

/// Uploads published at once.
const UPLOAD_BATCH: usize = 512;
/// How long the uploader waits before trying NATS again after a failure.
const UPLOAD_RETRY: Duration = Duration::from_secs(1);

fn check_editable(kind: Kind) -> Result<(), ServiceError> {
    if kind.is_editable_at_remotes() {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "{} are managed at the main (they decide who sees what); make the change there",
            kind.plural()
        )))
    }
}

impl Remote {
    /// Creates a record here; it joins the main (and this remote's subscription list, if it is
    /// a contact) once uploaded and merged.
    pub async fn create(&self, kind: Kind, body: &serde_json::Value) -> Result<(String, Record), ServiceError> {
        self.create_keyed(kind, body, None).await
    }

    /// Creates a record; with an idempotency key, a repeated request creates nothing and
    /// answers with the record the first one created.
    pub async fn create_keyed(
        &self,
        kind: Kind,
        body: &serde_json::Value,
        key: Option<String>,
    ) -> Result<(String, Record), ServiceError> {
        check_editable(kind)?;
        let input = model::parse_input(kind, body, true)?;
        let id = input.id.clone().unwrap_or_else(names::new_id);
        let stamp = self.inner.clock.now();
        let id2 = id.clone();
        self.local_write(move |t, inner| {
            if let Some(earlier) = earlier(t, key.as_deref(), kind, input.id.as_deref())? {
                return Ok(earlier.and_then(|(id, stored)| {
                    stored.map(|s| (id.clone(), s)).ok_or(ServiceError::NotFound { kind, id })
                }));
            }
            let held = t.known(kind, &id2)?.record;
            if held.is_some() {
                return Ok(Err(ServiceError::Exists { kind, id: id2.clone() }));
            }
            if t.was_deleted(kind, &id2)? {
                return Ok(Err(ServiceError::Conflict(format!(
                    "the {kind} {id2} was deleted, and the main refuses to bring a deleted record back from a \
                         remote; create it without an id (one is made up) or with a new one"
                ))));
            }
            if let Err(e) = check_refs(t, kind, &input.patch)? {
                return Ok(Err(e));
            }
            let mut fields = Fields::new();
            crate::merge::apply_patch(&mut fields, &input.patch, stamp);
            if let Err(e) = model::check_record(kind, &fields) {
                return Ok(Err(e.into()));
            }
            let stored = Record { version: 0, holders: HELD_LOCALLY, fields };
            t.put(kind, &id2, &stored)?;
            queue(t, inner, kind, &id2, Op::Upsert, 0, Some(&stored.fields))?;
            remember(t, key.as_deref(), kind, &id2)?;
            Ok(Ok((id2, stored)))
        })
        .await
    }

    pub async fn update(&self, kind: Kind, id: &str, body: &serde_json::Value) -> Result<Record, ServiceError> {
        self.update_keyed(kind, id, body, None).await
    }

    pub async fn update_keyed(
        &self,
        kind: Kind,
        id: &str,
        body: &serde_json::Value,
        key: Option<String>,
    ) -> Result<Record, ServiceError> {
        check_editable(kind)?;
        let input = model::parse_input(kind, body, false)?;
        let stamp = self.inner.clock.now();
        let id = id.to_owned();
        self.local_write(move |t, inner| {
            if let Some(earlier) = earlier(t, key.as_deref(), kind, Some(&id))? {
                return Ok(earlier.and_then(|(id, stored)| stored.ok_or(ServiceError::NotFound { kind, id })));
            }
            let Some(mut stored) = t.get(kind, &id)? else {
                return Ok(Err(ServiceError::NotFound { kind, id: id.clone() }));
            };
            if let Err(e) = check_refs(t, kind, &input.patch)? {
                return Ok(Err(e));
            }
            if crate::merge::apply_patch(&mut stored.fields, &input.patch, stamp) {
                if let Err(e) = model::check_record(kind, &stored.fields) {
                    return Ok(Err(e.into()));
                }
                t.put(kind, &id, &stored)?;
                queue(t, inner, kind, &id, Op::Upsert, stored.version, Some(&stored.fields))?;
            }
            remember(t, key.as_deref(), kind, &id)?;
            Ok(Ok(stored))
        })
        .await
    }

    /// Deletes a record here (a contact with its children); the main deletes it when the
    /// upload is merged.
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<(), ServiceError> {
        self.delete_keyed(kind, id, None).await
    }

    pub async fn delete_keyed(&self, kind: Kind, id: &str, key: Option<String>) -> Result<(), ServiceError> {
        check_editable(kind)?;
        let id = id.to_owned();
        self.local_write(move |t, inner| {
            if let Some(earlier) = earlier(t, key.as_deref(), kind, Some(&id))? {
                return Ok(earlier.map(|_| ()));
            }
            let Some(stored) = t.get(kind, &id)? else {
                return Ok(Err(ServiceError::NotFound { kind, id: id.clone() }));
            };
            if kind == Kind::Contact {
                for (child_kind, child_id) in t.children(&id)? {
                    let version = t.known(child_kind, &child_id)?.record.map_or(0, |(v, _)| v);
                    t.delete_here(child_kind, &child_id, version)?;
                }
            }
            t.delete_here(kind, &id, stored.version)?;
            queue(t, inner, kind, &id, Op::Delete, stored.version, None)?;
            remember(t, key.as_deref(), kind, &id)?;
            Ok(Ok(()))
        })
        .await
    }

    /// Runs a local edit through the local writer, which commits it durably (with whatever
    /// other edits arrived meanwhile), and answers only once it is on disk.
    async fn local_write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tables<'_>, &Inner) -> Result<Result<R, ServiceError>, StoreError> + Send + 'static,
    ) -> Result<R, ServiceError> {
        if let Some(expired) = self.inner.expired() {
            return Err(ServiceError::Conflict(format!("{}; the edit was not saved", expired.notice)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |t, inner| {
            let result = f(t, inner)?;
            Ok(Box::new(move || {
                let _ = tx.send(result);
            }))
        });
        let not_saved = || match self.inner.write_error.lock().unwrap().as_ref() {
            Some(e) => ServiceError::Store(e.duplicate()),
            None => ServiceError::Internal(
                "the edit could not be saved (the remote's log says why); nothing was changed, try again".into(),
            ),
        };
        self.inner.edits.send(job).map_err(|_| not_saved())?;
        match rx.await {
            Ok(result) => result,
            Err(_) => {
                // The writer drops the group's answers as the transaction fails, just before it
                // records why: give it a moment to.
                for _ in 0..20 {
                    if self.inner.write_error.lock().unwrap().is_some() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(not_saved())
            }
        }
    }
}

/// A local edit for the writer: applies itself to the transaction and returns what answers
/// its caller, to be called once the transaction is durable.
pub(super) type Job = Box<dyn FnOnce(&mut Tables<'_>, &Inner) -> Result<Reply, StoreError> + Send>;
type Reply = Box<dyn FnOnce() + Send>;

/// How long a remote remembers a client's idempotency key, and how often it forgets older ones.
const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const KEY_FORGET_INTERVAL: Duration = Duration::from_secs(600);

/// Most local edits committed in one transaction.
const GROUP_COMMIT: usize = 256;

/// The local writer: commits the edits waiting at each turn in one durable transaction (a
/// group commit: one disk flush for all of them), then answers each. If the transaction
/// fails, none of them is answered as saved.
pub(super) async fn run_writer(
    inner: Arc<Inner>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_forget = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let inner2 = inner.clone();
        let forget_keys = last_forget.elapsed() >= KEY_FORGET_INTERVAL;
        if forget_keys {
            last_forget = std::time::Instant::now();
        }
        let committed = tokio::task::spawn_blocking(move || {
            inner2.store.write(true, |t| {
                if forget_keys {
                    t.forget_keys(crate::hlc::wall_ms().saturating_sub(KEY_LIFETIME.as_millis() as u64))?;
                }
                batch.into_iter().map(|job| job(t, &inner2)).collect::<Result<Vec<_>, _>>()
            })
        })
        .await;
        match committed {
            Ok(Ok(replies)) => {
                *inner.write_error.lock().unwrap() = None;
                replies.into_iter().for_each(|reply| reply());
                inner.upload_ready.notify_one();
            }
            Ok(Err(e)) => {
                tracing::error!("saving local edits failed: {e}");
                *inner.write_error.lock().unwrap() = Some(e);
            }
            Err(e) => tracing::error!("saving local edits failed: {e}"),
        }
    }
}

/// The record a change made here with this idempotency key left, if such a change was made:
/// the repeated request then changes nothing. A key used for another record is refused.
#[allow(clippy::type_complexity)]
fn earlier(
    t: &Tables<'_>,
    key: Option<&str>,
    kind: Kind,
    id: Option<&str>,
) -> Result<Option<Result<(String, Option<Record>), ServiceError>>, StoreError> {
    let Some(key) = key else { return Ok(None) };
    let Some(entry) = t.key_entry(key)? else { return Ok(None) };
    if entry.kind != kind || id.is_some_and(|id| id != entry.id) {
        return Ok(Some(Err(ServiceError::key_reused(key, entry.kind, &entry.id))));
    }
    let stored = t.get(kind, &entry.id)?;
    Ok(Some(Ok((entry.id, stored))))
}

/// Remembers the change a request with an idempotency key made, in its transaction.
fn remember(t: &mut Tables<'_>, key: Option<&str>, kind: Kind, id: &str) -> Result<(), StoreError> {
    match key {
        Some(key) => t.remember_key(
            key,
            &crate::store::KeyEntry { seq: 0, kind, id: id.to_owned(), at_ms: crate::hlc::wall_ms() },
        ),
        None => Ok(()),
    }
}

/// Checks that every reference in a patch points at a record this remote holds.
fn check_refs(t: &Tables<'_>, kind: Kind, patch: &model::Patch) -> Result<Result<(), ServiceError>, StoreError> {
    for (field, to, id) in model::refs(kind, patch) {
        if t.known(to, id)?.record.is_none() {
            return Ok(Err(ServiceError::MissingRef { field: field.to_owned(), kind: to, id: id.to_owned() }));
        }
    }
    Ok(Ok(()))
}

/// Queues an edit for `CRM_UP`: the whole record as held here, each field with its stamp, so
/// the main can keep, field by field, whichever change is newer.
fn queue(
    t: &mut Tables<'_>,
    inner: &Inner,
    kind: Kind,
    id: &str,
    op: Op,
    version: u64,
    fields: Option<&Fields>,
) -> Result<(), StoreError> {
    let bundle = &inner.bundle;
    let envelope = Envelope::change(&bundle.database_id, &bundle.remote, kind, id, op, version, fields.cloned());
    t.push_upload(&Upload {
        subject: wire::up_subject(&inner.bundle.remote, kind, id),
        payload: envelope.encode(),
        event: envelope.event,
    })
}

/// The uploader: publishes queued edits to `CRM_UP` in order, and drops each from the queue
/// once acknowledged. A failure leaves the queue as it is and tries again. While NATS is
/// unreachable it waits for it, and at shutdown it stops whatever it waits for: the queue is
/// on disk, and an upload sent but not yet dropped from it is sent again next time (NATS or the
/// main drops the repeat).
pub(super) async fn run_uploader(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let attempt = async {
            // Between scheduled sessions, and once expired, nothing is uploaded.
            let _ = inner.gate.subscribe().wait_for(|open| *open).await;
            inner.nats.connected().await;
            upload_all(&inner).await
        };
        let result = tokio::select! {
            result = attempt => result,
            () = shut_down(&mut shutdown) => return,
        };
        let wait = match result {
            Ok(()) => {
                inner.state.lock().unwrap().upload_error = None;
                Duration::from_secs(5)
            }
            Err(e) => {
                tracing::warn!("uploading edits: {e}");
                inner.state.lock().unwrap().upload_error = Some(e);
                UPLOAD_RETRY
            }
        };
        tokio::select! {
            _ = inner.upload_ready.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            () = shut_down(&mut shutdown) => return,
        }
    }
}

async fn upload_all(inner: &Inner) -> Result<(), String> {
    loop {
        let head = inner.store.uploads_head(UPLOAD_BATCH).map_err(|e| e.to_string())?;
        let Some((last, _)) = head.last() else { return Ok(()) };
        let last = *last;
        let (queue, base) = &inner.upload_queue;
        inner
            .nats
            .publish_uploads(&head, |n| format!("{queue}:{}", n.saturating_sub(*base)), inner.bundle.created_ms)
            .await
            .map_err(|e| e.to_string())?;
        inner.state.lock().unwrap().sent += head.len() as u64;
        // Not durable on its own: an upload sent again after a crash is dropped by NATS as a
        // duplicate, or merged again by the main without effect.
        let store = inner.store.clone();
        tokio::task::spawn_blocking(move || store.write(false, |t| t.pop_uploads(last)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
}
