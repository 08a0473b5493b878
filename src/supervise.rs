//! The supervisor of every long-running loop (the main's projector and merger, a remote's
//! sync): it runs the loop, and when a run ends on an error, starts it again after a pause
//! that grows while the failures repeat, until the service shuts down or the loop gives up.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::transport::{Interrupted, TransportError};

/// The pause after a first failure: short, because the usual cause (NATS restarting, a
/// consumer busy) passes quickly, and every moment a loop is down is a moment of lag.
const FIRST_PAUSE: Duration = Duration::from_millis(300);
/// The longest pause: a loop failing for a long time (NATS gone for minutes) tries again, and
/// logs, this often.
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// A run that lasted this long went well for a while: the next failure pauses shortly again.
const SETTLED: Duration = Duration::from_secs(30);

/// Why a run of a loop ended before shutdown.
#[derive(Debug)]
pub enum Stop {
    /// Start again at once, from the stored position (NATS reconnected, a rebuild emptied
    /// the projection): nothing failed.
    Restart(String),
    /// Start again after a pause (NATS unreachable, a consumer busy, a full disk).
    Retry(String),
    /// Stop for good: the loop cannot go on without the operator (a message of another
    /// database, a damaged store).
    Fatal(String),
}

impl From<Interrupted> for Stop {
    fn from(e: Interrupted) -> Stop {
        match e {
            Interrupted::Reconnected => Stop::Restart(e.to_string()),
            other => Stop::Retry(other.to_string()),
        }
    }
}

impl From<TransportError> for Stop {
    fn from(e: TransportError) -> Stop {
        Stop::Retry(e.to_string())
    }
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Stop {
        match e.downcast::<Interrupted>() {
            Ok(interrupted) => interrupted.into(),
            Err(e) => Stop::Retry(format!("{e:#}")),
        }
    }
}

/// Runs `run` (given `state` and a receiver of the shutdown signal) until it returns `Ok` (it
/// saw the shutdown, or has nothing more to do), the service shuts down, or it stops with
/// [`Stop::Fatal`], whose reason is returned. `name` names the loop in the log.
pub async fn supervise<S: Send>(
    name: &str,
    mut shutdown: watch::Receiver<bool>,
    state: &mut S,
    mut run: impl for<'a> FnMut(&'a mut S, watch::Receiver<bool>) -> BoxFuture<'a, Result<(), Stop>>,
) -> Result<(), String> {
    let mut pause = FIRST_PAUSE;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let why = match run(state, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(Stop::Fatal(why)) => {
                tracing::error!("{name} stopped: {why}");
                return Err(why);
            }
            Err(_) if *shutdown.borrow() => return Ok(()),
            Err(Stop::Restart(why)) => {
                tracing::info!("{name} starting again: {why}");
                continue;
            }
            Err(Stop::Retry(why)) => why,
        };
        if started.elapsed() >= SETTLED {
            pause = FIRST_PAUSE;
        }
        tracing::warn!("{name} interrupted, starting again in {} ms: {why}", pause.as_millis());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}
