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
#[derive(Debug, Clone)]
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
        match e {
            // Only an administrator can give it back: trying again changes nothing.
            TransportError::ConsumerGone { .. } => Stop::Fatal(e.to_string()),
            other => Stop::Retry(other.to_string()),
        }
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

/// Returns once the service shuts down (at once if it has): what a task selects on to drop
/// whatever it waits for, NATS included, when it must stop.
pub async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    // An error: the sender is gone, which means shutdown too.
    let _ = shutdown.wait_for(|stop| *stop).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `supervise` over a loop that ends each run with the next of `ends` (then `Ok`),
    /// on a paused clock; returns what it returned, how many runs it made, and the time
    /// the pauses took.
    async fn supervised(ends: Vec<Stop>) -> (Result<(), String>, usize, Duration) {
        let (_tx, rx) = watch::channel(false);
        let mut ends = ends.into_iter();
        let mut runs = 0;
        let start = tokio::time::Instant::now();
        let result = supervise("test loop", rx, &mut runs, |runs, _| {
            *runs += 1;
            let end = ends.next();
            Box::pin(async move { end.map_or(Ok(()), Err) })
        })
        .await;
        (result, runs, start.elapsed())
    }

    fn retry() -> Stop {
        Stop::Retry("NATS unreachable".into())
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_after_pauses_that_double_up_to_five_seconds() {
        let (result, runs, paused) = supervised((0..6).map(|_| retry()).collect()).await;
        assert_eq!((result, runs), (Ok(()), 7));
        // 0.3 + 0.6 + 1.2 + 2.4 + 4.8 + 5 (the longest pause) seconds.
        assert_eq!(paused, Duration::from_millis(300 + 600 + 1200 + 2400 + 4800 + 5000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_starts_the_loop_again_at_once() {
        let (result, runs, paused) = supervised(vec![Stop::Restart("reconnected".into()); 3]).await;
        assert_eq!((result, runs, paused), (Ok(()), 4, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_stop_is_not_retried_and_says_why() {
        let (result, runs, _) = supervised(vec![retry(), Stop::Fatal("a message of another database".into())]).await;
        assert_eq!((result, runs), (Err("a message of another database".into()), 2));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_pause() {
        let (tx, rx) = watch::channel(false);
        let mut runs = 0;
        let supervisor = supervise("test loop", rx, &mut runs, |runs, _| {
            *runs += 1;
            Box::pin(async { Err(retry()) })
        });
        let stop = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(true).unwrap();
        };
        let (result, ()) = tokio::join!(supervisor, stop);
        assert_eq!((result, runs), (Ok(()), 1), "stopped during the first pause, not run again");
    }
}
