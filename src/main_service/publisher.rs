//! Publishes the outbox to `CRM_SYNC`, in order, and drops each entry once NATS has
//! acknowledged it. An entry published twice (a crash between the ack and the drop, or a
//! replay of the stream after a crash) carries the same version, so the remote's version check
//! discards the copy; messages carry no `Nats-Msg-Id` (ARCHITECTURE decision 44).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::outgoing::OutboxEntry;
use crate::store::Store;
use crate::transport::Nats;

const BATCH: usize = 2000;

pub async fn run(store: Store, nats: Nats, notify: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let head = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.outbox_head(BATCH)).await
        };
        let entries = match head {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => {
                tracing::error!("cannot read the outbox: {e}");
                Vec::new()
            }
            Err(e) => {
                tracing::error!("outbox reader failed: {e}");
                Vec::new()
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let last = entries.last().map(|(k, _)| *k).unwrap_or(0);
        let batch: Vec<OutboxEntry> = entries.into_iter().map(|(_, e)| e).collect();
        match nats.publish_routed(&batch).await {
            Ok(()) => {
                let store = store.clone();
                let popped = tokio::task::spawn_blocking(move || store.write(false, |t| t.pop_outbox(last))).await;
                if let Ok(Err(e)) = popped {
                    tracing::error!("cannot trim the outbox: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("routing paused, will retry: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
