//! The merger: takes the edits remotes upload off the `CRM_UP` work queue, one at a time and
//! in order, and merges each into the main. The uploads of a halted remote wait, parked in the
//! main's store, until it is resumed. An edit is checked (it belongs to this database,
//! its remote exists, the record is one the remote holds or a new one its users
//! may access, its fields are valid), then merged with the main's record, newest stamp winning
//! (field by field for contacts, companies and groups), and committed to `CRM_EVENTS` like any
//! change: the router sends the result back to every target that holds the record. An edit
//! that fails a check is refused: the main's sync log records it with the edit, and the remote
//! is told on its own reject subject, so no edit is dropped without a trace.
//!
//! Only after that is the upload acknowledged. A crash in between merges it again, which
//! changes nothing (the same stamps are already held).

use std::collections::{BTreeMap, BTreeSet};

use futures::FutureExt;
use tokio::sync::watch;

use super::{Decision, Main};
use crate::error::ServiceError;
use crate::merge::{self, Facts, Plan};
use crate::model::Record;
use crate::model::{self, Kind};
use crate::routing::{Basis, RoutingConfig, SetSpec, TargetDef};
use crate::store::{LogEntry, Parked};
use crate::supervise::{Stop, supervise};
// An upload to merge: taken off `CRM_UP`, or out of the parked table.
use crate::transport::Uploaded as Upload;
use crate::wire::{self, Decoded, Envelope, Op};

pub(super) async fn run(mut main: Main, shutdown: watch::Receiver<bool>) {
    let _ = supervise("merger", shutdown, &mut main, |main, shutdown| {
        async move {
            match merge_loop(main, shutdown).await {
                Ok(Ended::Shutdown) => Ok(()),
                // Its uploads waited at the main: start again, which merges them first.
                Ok(Ended::Resumed) => Err(Stop::Restart("a halted remote was resumed".into())),
                Err(e) => Err(Stop::from(e)),
            }
        }
        .boxed()
    })
    .await;
}

/// Why a run of the merger ended without an error.
enum Ended {
    Shutdown,
    /// A halted remote was resumed: its parked uploads can go on.
    Resumed,
}

/// Uploads taken off the queue at most at once.
const MERGE_BATCH: usize = 256;
/// Parked uploads merged at once when the upload they waited for has come.
const UNPARK_BATCH: usize = 256;

use crate::store::next_upload_key as next_key;

/// Where each upload of a batch goes, by its place in its queue.
#[derive(Default)]
struct Sorted {
    /// In order: merge now.
    merge: Vec<(usize, Upload)>,
    /// An earlier upload of its queue has not arrived: keep until it has.
    park: Vec<(usize, Upload)>,
    /// Merged before (a publish repeated after the deduplication window): drop.
    repeated: Vec<usize>,
}

async fn merge_loop(main: &Main, shutdown: watch::Receiver<bool>) -> anyhow::Result<Ended> {
    // The merge positions come with the merged changes: after a restart the projector must
    // have applied all of them before the merger reads where each queue stands.
    main.catch_up().await?;
    let mut resumed = main.inner.resumed.subscribe();
    resumed.mark_unchanged();
    let mut uploads = main.inner.nats.uploads(MERGE_BATCH, shutdown).await?;
    // The next number expected from each upload queue, as committed: read afresh at every
    // start, because a failed batch may have advanced it here but not on disk.
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    // The queues with parked uploads: those that can go on are merged at start and after
    // each batch.
    let mut parked: BTreeSet<String> = main.inner.store.parked_queues()?;
    unpark_all(main, &mut parked, &mut next).await?;
    loop {
        let batch = tokio::select! {
            batch = uploads.next() => match batch? {
                Some(batch) => batch,
                None => return Ok(Ended::Shutdown),
            },
            _ = resumed.changed() => return Ok(Ended::Resumed),
        };
        // Session reports are no edits: each is taken in at once, in no queue's order.
        let (reports, batch): (Vec<_>, Vec<_>) =
            batch.into_iter().enumerate().partition(|(_, u)| wire::is_session_subject(&u.subject));
        for (_, report) in &reports {
            main.record_session(report)?;
        }
        uploads.ack_each(reports.iter().map(|(i, _)| *i)).await;
        let halted = Halted::of(main, batch.iter().map(|(_, u)| u))?;
        let sorted = sort_batch(&main.inner.store, &mut next, &halted, batch.into_iter())?;
        park(main, &sorted.park)?;
        parked.extend(sorted.park.iter().filter_map(|(_, u)| u.order.as_ref().map(|(q, _)| q.clone())));
        let mut start = 0;
        while start < sorted.merge.len() {
            let end = start + wave_len(&sorted.merge[start..]);
            let wave = &sorted.merge[start..end];
            if !merge_wave(main, wave.iter().map(|(_, u)| u)).await? {
                // Some changed nothing (or were refused): no event records their place.
                commit_order(main, wave.iter().map(|(_, u)| u))?;
            }
            uploads.ack_each(wave.iter().map(|(i, _)| *i)).await;
            start = end;
        }
        uploads.ack_each(sorted.park.iter().map(|(i, _)| *i).chain(sorted.repeated.iter().copied())).await;
        unpark_all(main, &mut parked, &mut next).await?;
    }
}

/// Merges the parked uploads of every queue that can go on: those that waited for one merged
/// since, or for their remote to be resumed. A halted remote's stay parked.
async fn unpark_all(
    main: &Main,
    parked: &mut BTreeSet<String>,
    next: &mut BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    for queue in parked.clone() {
        let head = main.inner.store.parked(&queue, 0, 1)?;
        let Some((_, first)) = head.first() else {
            parked.remove(&queue);
            continue;
        };
        if Halted::remote(main, wire::up_remote(&first.subject).unwrap_or_default())? {
            continue;
        }
        let from = match next.get(&queue) {
            Some(n) => *n,
            None => main.inner.store.meta(&next_key(&queue))?,
        };
        unpark(main, &queue, from, next).await?;
        if main.inner.store.parked(&queue, 0, 1)?.is_empty() {
            parked.remove(&queue);
        }
    }
    Ok(())
}

/// The remotes of a batch's uploads that are halted at the main: their uploads wait, parked,
/// until they are resumed.
struct Halted(BTreeSet<String>);

impl Halted {
    fn of<'a>(main: &Main, batch: impl Iterator<Item = &'a Upload>) -> Result<Halted, ServiceError> {
        let remotes: BTreeSet<&str> = batch.filter_map(|u| wire::up_remote(&u.subject)).collect();
        let mut halted = BTreeSet::new();
        for remote in remotes {
            if Halted::remote(main, remote)? {
                halted.insert(remote.to_owned());
            }
        }
        Ok(Halted(halted))
    }

    fn remote(main: &Main, remote: &str) -> Result<bool, ServiceError> {
        Ok(main.inner.store.get(Kind::Remote, remote)?.is_some_and(|r| model::remote_halted(&r.fields)))
    }

    fn holds(&self, upload: &Upload) -> bool {
        wire::up_remote(&upload.subject).is_some_and(|r| self.0.contains(r))
    }
}

/// Keeps, durably, uploads that came before an earlier one of their queue, until that one is
/// merged, and the uploads of a halted remote, until it is resumed.
fn park(main: &Main, uploads: &[(usize, Upload)]) -> Result<(), ServiceError> {
    if uploads.is_empty() {
        return Ok(());
    }
    main.inner.store.write(true, |t| {
        for (_, u) in uploads {
            let (queue, n) = u.order.as_ref().expect("only ordered uploads are parked");
            tracing::info!(queue, n, "keeping an upload until the one before it is merged, or its remote resumed");
            let parked = Parked {
                subject: u.subject.clone(),
                payload: u.payload.to_vec(),
                bundle_created_ms: u.bundle_created_ms,
            };
            t.park(queue, *n, &parked)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Sorts uploads by their place in their queue against the next number expected of it,
/// advancing `next` over those merged now.
fn sort_batch(
    store: &crate::store::Store,
    next: &mut BTreeMap<String, u64>,
    halted: &Halted,
    uploads: impl Iterator<Item = (usize, Upload)>,
) -> Result<Sorted, ServiceError> {
    let mut sorted = Sorted::default();
    // The positions were lost with a damaged file (those of uploads that changed nothing are
    // in no event): the first upload seen of each queue is taken as its next.
    let lost = store.meta(super::UPLOAD_POSITIONS_LOST)? == 1;
    for (i, upload) in uploads {
        let Some((queue, n)) = &upload.order else {
            sorted.merge.push((i, upload));
            continue;
        };
        let stored = || -> Result<u64, ServiceError> { Ok(store.meta_opt(&next_key(queue))?.unwrap_or(0)) };
        if halted.holds(&upload) {
            // Its remote is halted: it waits, whatever its place, and nothing advances.
            sorted.park.push((i, upload));
            continue;
        }
        let mut expected = match next.get(queue) {
            Some(e) => *e,
            None => {
                let e = if lost { stored()?.max(*n) } else { stored()? };
                *next.entry(queue.clone()).or_insert(e)
            }
        };
        if *n > expected {
            // Before calling it a gap, look again: the projector may have recorded more.
            expected = expected.max(stored()?);
            next.insert(queue.clone(), expected);
        }
        match n.cmp(&expected) {
            std::cmp::Ordering::Less => sorted.repeated.push(i),
            std::cmp::Ordering::Equal => {
                next.insert(queue.clone(), n + 1);
                sorted.merge.push((i, upload));
            }
            std::cmp::Ordering::Greater => sorted.park.push((i, upload)),
        }
    }
    Ok(sorted)
}

/// Commits, durably, that these uploads are merged: the next number of each of their queues,
/// for uploads that committed no change (refused, or changing nothing), whose place no event
/// records. Only then are they acknowledged, so an upload acknowledged is never merged twice,
/// and one merged but not yet recorded is merged again after a crash, which changes nothing.
fn commit_order<'a>(main: &Main, merged: impl Iterator<Item = &'a Upload>) -> Result<(), ServiceError> {
    let mut advanced: BTreeMap<&str, u64> = BTreeMap::new();
    for (queue, n) in merged.filter_map(|u| u.order.as_ref()) {
        let e = advanced.entry(queue.as_str()).or_default();
        *e = (*e).max(n + 1);
    }
    if advanced.is_empty() {
        return Ok(());
    }
    main.inner.store.write(true, |t| {
        for (queue, next) in &advanced {
            t.advance_upload(queue, *next)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Merges, one at a time and in order, the parked uploads of `queue` that follow its merged
/// ones without a gap.
async fn unpark(main: &Main, queue: &str, from: u64, next: &mut BTreeMap<String, u64>) -> anyhow::Result<()> {
    let mut n = from;
    loop {
        let parked = main.inner.store.parked(queue, n, UNPARK_BATCH)?;
        let ready: Vec<Upload> = parked
            .into_iter()
            .enumerate()
            .take_while(|(i, (number, _))| *number == n + *i as u64)
            .map(|(_, (number, p))| Upload {
                subject: p.subject,
                payload: p.payload.into(),
                order: Some((queue.to_owned(), number)),
                bundle_created_ms: p.bundle_created_ms,
            })
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        tracing::info!(queue, from = n, uploads = ready.len(), "merging parked uploads");
        for upload in &ready {
            if !merge_wave(main, std::iter::once(upload)).await? {
                commit_order(main, std::iter::once(upload))?;
            }
            n += 1;
            next.insert(queue.to_owned(), n);
        }
    }
}

/// How many uploads from the head of `uploads` can be merged at once: uploads of different
/// records, and never a contact together with a note, history, activity or membership (which
/// may belong to it), so the order in which a remote made them still holds where it matters.
fn wave_len(uploads: &[(usize, Upload)]) -> usize {
    let mut records = BTreeSet::new();
    let (mut contacts, mut children) = (false, false);
    for (n, (_, upload)) in uploads.iter().enumerate() {
        let Some((kind, id)) = wire::subject_record(&upload.subject) else { return n.max(1) };
        let child = kind.parent_field().is_some();
        contacts |= kind == Kind::Contact;
        children |= child;
        if !records.insert((kind, id)) || (contacts && children) {
            return n.max(1);
        }
    }
    uploads.len()
}

/// Merges a wave of uploads concurrently, then adds the contacts created in it to their
/// remotes' lists. Returns whether every upload of the wave committed a change carrying its
/// place in its queue (then the projector recorded that place). `Err` if one could not be
/// decided now: the caller starts again from the first upload not committed as merged.
///
/// The uploads of a wave commit concurrently, so their changes reach `CRM_EVENTS` in any order:
/// only the first upload of each queue in the wave carries its place with its change. A crash
/// (or a failed merge) part-way through a wave then leaves the recorded place at or before
/// every upload of the wave not yet committed, which is merged again at the next start (those
/// committed already merge again without effect); the wave's last place is recorded by
/// [`commit_order`] once all of it is merged.
async fn merge_wave<'a>(main: &Main, wave: impl Iterator<Item = &'a Upload>) -> anyhow::Result<bool> {
    let wave: Vec<&Upload> = wave.collect();
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    for (queue, n) in wave.iter().filter_map(|u| u.order.as_ref()) {
        let e = first.entry(queue.as_str()).or_insert(*n);
        *e = (*e).min(*n);
    }
    let carries = |u: &Upload| u.order.as_ref().is_some_and(|(queue, n)| first.get(queue.as_str()) == Some(n));
    let results = futures::future::join_all(wave.iter().map(|u| main.merge_upload(u, carries(u)))).await;
    let mut created: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut all_ordered = true;
    for (upload, result) in wave.iter().zip(&results) {
        match result {
            Ok(merged) => {
                all_ordered &= merged.ordered || upload.order.is_none();
                if let Some((remote, contact)) = &merged.created {
                    created.entry(remote.clone()).or_default().push(contact.clone());
                }
            }
            // NATS or the store failed: the uploads stay in the queue and come again, in order.
            Err(e) => anyhow::bail!("merging an upload from {}: {e}", upload.subject),
        }
    }
    for (remote, contacts) in created {
        // Contacts made at a remote join its subscription list, so they never vanish from the
        // place they were made.
        if let Err(e) = main.add_subscriptions(&remote, contacts).await {
            tracing::warn!(remote, "contacts made at the remote could not join its list: {e}");
        }
    }
    Ok(all_ordered)
}

/// What merging an upload did.
#[derive(Debug, Default)]
struct Merged {
    /// The remote and contact, when it created a contact its remote's list does not hold yet.
    created: Option<(String, String)>,
    /// Whether a change was committed carrying the upload's place in its queue: the projector
    /// then records that place with the change, so nothing else must.
    ordered: bool,
}

/// Why an edit was not merged.
enum Outcome {
    /// Refused for good: told to the remote, kept in the sync log.
    Refused(String),
    /// Could not be decided now (NATS, the store): try again.
    Retry(ServiceError),
}

impl From<ServiceError> for Outcome {
    fn from(e: ServiceError) -> Outcome {
        match e {
            ServiceError::Busy(_)
            | ServiceError::Committed(_)
            | ServiceError::Unavailable(_)
            | ServiceError::Store(_)
            | ServiceError::Internal(_) => Outcome::Retry(e),
            other => Outcome::Refused(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for Outcome {
    fn from(e: crate::store::StoreError) -> Outcome {
        Outcome::Retry(e.into())
    }
}

impl Main {
    /// Merges one upload. `Err` only when it could not be decided now and must come again.
    /// Merges one upload; `carry`: its change carries its place in its queue (see
    /// [`merge_wave`]).
    async fn merge_upload(&self, upload: &Upload, carry: bool) -> Result<Merged, ServiceError> {
        let (subject, payload) = (&upload.subject, &upload.payload);
        let order = upload.order.as_ref().filter(|_| carry).map(|(queue, n)| format!("{queue}:{n}"));
        let remote = wire::up_remote(subject).unwrap_or_default().to_owned();
        let env = match wire::decode_checked(payload, &self.inner.database_id) {
            Decoded::Ok(env) => env,
            Decoded::Foreign(f) => return self.log_refusal(&remote, None, f.to_string()).map(|_| Merged::default()),
            Decoded::Malformed(e) => {
                let why = format!("the upload on {subject} does not decode: {e}");
                return self.log_refusal(&remote, None, why).map(|_| Merged::default());
            }
        };
        match self.merge_edit(&remote, &env, order.as_deref(), upload.bundle_created_ms).await {
            // Its place is recorded only if its change carried it.
            Ok(merged) => Ok(Merged { ordered: merged.ordered && order.is_some(), ..merged }),
            Err(Outcome::Retry(e)) => Err(e),
            Err(Outcome::Refused(reason)) => {
                tracing::warn!(remote, kind = %env.kind, id = %env.id, "refused an edit: {reason}");
                self.log_refusal(&remote, Some(&env), reason.clone())?;
                let reject = Envelope { op: Op::Reject, reason: Some(reason), ..env.clone() };
                self.inner
                    .nats
                    .publish_reject(
                        wire::reject_subject(&remote, env.kind, &env.id),
                        &format!("{}:rejected", env.event),
                        reject.encode(),
                    )
                    .await?;
                Ok(Merged::default())
            }
        }
    }

    /// Merges one edit; `order` is its place in its remote's upload queue, committed with the
    /// change it makes.
    async fn merge_edit(
        &self,
        remote: &str,
        env: &Envelope,
        order: Option<&str>,
        bundle_created_ms: Option<u64>,
    ) -> Result<Merged, Outcome> {
        let (kind, id) = (env.kind, env.id.as_str());
        let facts = Facts { bundle_created_ms, ..self.facts(remote, env)? };
        match merge::judge(remote, env, &facts).map_err(|r| Outcome::Refused(r.0))? {
            Plan::Nothing => Ok(Merged::default()),
            Plan::Ignore(why) => {
                tracing::warn!(remote, kind = %kind, id, "ignored an upload: {why}");
                self.log_refusal(remote, Some(env), why)?;
                Ok(Merged::default())
            }
            Plan::Delete => match self.delete_from(remote, kind, id, None, order).await {
                Err(ServiceError::NotFound { .. }) => Ok(Merged::default()),
                Err(e) => Err(e.into()),
                Ok(committed) => Ok(Merged { ordered: committed, ..Merged::default() }),
            },
            Plan::Merge { fields, existed, join_list } => {
                let committed = self
                    .commit_keyed(remote, kind, id, None, order, |now| {
                        match merge::merge_into(kind, id, now.map(|s| &s.fields), &fields, existed) {
                            Ok(Some(merged)) => Ok(Decision::Upsert(merged)),
                            Ok(None) => Ok(Decision::Unchanged),
                            Err(refusal) => Err(ServiceError::Conflict(refusal.0)),
                        }
                    })
                    .await?;
                Ok(Merged {
                    created: join_list.then(|| (remote.to_owned(), id.to_owned())),
                    ordered: matches!(committed, super::Committed::Now(_)),
                })
            }
        }
    }

    /// What judging an upload needs to know, read from the projection: the remote and its
    /// targets, the main's record and what routing decides it by, the upload's references.
    fn facts(&self, remote: &str, env: &Envelope) -> Result<Facts, ServiceError> {
        let store = &self.inner.store;
        let (kind, id) = (env.kind, env.id.as_str());
        let (remote_record, targets) = match self.remote_targets(remote)? {
            Some((record, targets)) => (Some(record.fields), targets),
            None => (None, Vec::new()),
        };
        let (current, known) = store.get_known(kind, id)?;
        let contact = |contact: &str| Ok::<_, ServiceError>(store.get(Kind::Contact, contact)?.map(|c| c.fields));
        let incoming = env.record.clone().unwrap_or_default();
        let missing_ref = match self.check_refs(kind, &model::as_patch(&incoming)) {
            Err(e @ ServiceError::MissingRef { .. }) => Some(e.to_string()),
            other => other.map(|()| None)?,
        };
        Ok(Facts {
            remote: remote_record,
            exists: current.is_some(),
            deleted: current.is_none() && known > 0,
            held_basis: match &current {
                Some(stored) => Basis::of(kind, id, &stored.fields, contact)?,
                None => None,
            },
            new_basis: match &current {
                None if env.op == Op::Upsert => Basis::of(kind, id, &incoming, contact)?,
                _ => None,
            },
            targets,
            missing_ref,
            bundle_created_ms: None,
        })
    }

    /// A remote's record and its two targets (its set and its subscription list), built from
    /// what they depend on alone.
    fn remote_targets(&self, remote: &str) -> Result<Option<(Record, Vec<TargetDef>)>, ServiceError> {
        let store = &self.inner.store;
        let Some(record) = store.get(Kind::Remote, remote)? else { return Ok(None) };
        let mut config = RoutingConfig::default();
        config.apply(Kind::Remote, remote, Some(&record.fields));
        let set = model::text(&record.fields, "set").unwrap_or_default();
        if let Some(set_record) = store.get(Kind::Set, set)? {
            for user in SetSpec::from_fields(&set_record.fields).users {
                if let Some(u) = store.get(Kind::User, &user)? {
                    config.apply(Kind::User, &user, Some(&u.fields));
                }
            }
            config.apply(Kind::Set, set, Some(&set_record.fields));
        }
        Ok(Some((record, config.target_defs())))
    }

    async fn add_subscriptions(&self, remote: &str, contacts: Vec<String>) -> Result<Vec<String>, ServiceError> {
        self.change_subscriptions(remote, move |list| {
            for contact in &contacts {
                if !list.contains(contact) {
                    list.push(contact.clone());
                }
            }
            Ok(())
        })
        .await
    }

    fn log_refusal(&self, remote: &str, env: Option<&Envelope>, reason: String) -> Result<(), ServiceError> {
        if env.is_none() {
            tracing::error!(remote, "refused an upload: {reason}");
        }
        let entry = LogEntry {
            at_ms: crate::hlc::wall_ms(),
            remote: remote.to_owned(),
            kind: env.map_or(Kind::Contact, |e| e.kind),
            id: env.map(|e| e.id.clone()).unwrap_or_default(),
            event: env.map(|e| e.event.clone()).unwrap_or_default(),
            reason,
            edit: env.and_then(|e| e.record.clone()),
        };
        self.inner.store.write(true, |t| t.log(&entry))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uploads(records: &[(Kind, &str)]) -> Vec<(usize, Upload)> {
        let upload = |(kind, id): &(Kind, &str)| Upload {
            subject: wire::up_subject("laptop", *kind, id),
            payload: Default::default(),
            order: None,
            bundle_created_ms: None,
        };
        records.iter().map(upload).enumerate().collect()
    }

    #[test]
    fn a_wave_merges_different_records_and_keeps_a_contact_before_its_notes() {
        use Kind::{Company, Contact, Note};
        type Case<'a> = (&'a str, &'a [(Kind, &'a str)], usize);
        let cases: [Case; 5] = [
            ("different contacts go together", &[(Contact, "a"), (Contact, "b"), (Company, "c")], 3),
            ("a record edited twice waits for its first edit", &[(Contact, "a"), (Contact, "b"), (Contact, "a")], 2),
            ("a note never goes with a contact", &[(Contact, "a"), (Note, "n1")], 1),
            ("notes go together until a contact", &[(Note, "n1"), (Note, "n2"), (Contact, "a")], 2),
            ("one upload is always a wave", &[(Note, "n1")], 1),
        ];
        for (rule, records, len) in cases {
            assert_eq!(wave_len(&uploads(records)), len, "{rule}");
        }
    }
}
