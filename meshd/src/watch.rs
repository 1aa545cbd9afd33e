//! Follows the records and service-file directories: inotify for prompt updates, plus a periodic
//! rescan as the safety net (inotify can overflow, and records may be written
//! before the directory exists).

use std::{path::PathBuf, time::Duration};

use futures_util::{FutureExt as _, StreamExt as _};
use inotify::{Inotify, WatchMask};
use tracing::{debug, warn};

/// How long to wait after an event for the burst it belongs to.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Asks for a reconciliation (`trigger`) on every change in `dirs` (the
/// records, the Service files and the Pod files) and every `every`; never
/// returns unless the runtime shuts down or the reconciler is gone.
pub async fn run(trigger: tokio::sync::mpsc::Sender<()>, dirs: Vec<PathBuf>, every: Duration) {
    let mut events = match watch(&dirs) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(dirs = ?dirs, error = %e, "cannot watch the records and service directories; relying on periodic rescans");
            None
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => debug!("periodic rescan"),
            ev = async { events.as_mut().expect("guarded").next().await }, if events.is_some() => {
                match ev {
                    Some(Ok(ev)) => {
                        debug!(name = ?ev.name, mask = ?ev.mask, "records changed");
                        tokio::time::sleep(DEBOUNCE).await;
                        let s = events.as_mut().expect("guarded");
                        while let Some(Some(_)) = s.next().now_or_never() {}
                    }
                    Some(Err(e)) => warn!(error = %e, "reading inotify events"),
                    None => {
                        warn!("inotify stream ended; relying on periodic rescans");
                        events = None;
                    }
                }
            }
        }
        // A full channel means a reconciliation is already due.
        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = trigger.try_send(()) {
            return;
        }
    }
}

fn watch(dirs: &[PathBuf]) -> std::io::Result<inotify::EventStream<[u8; 4096]>> {
    let inotify = Inotify::init()?;
    for dir in dirs {
        std::fs::create_dir_all(dir)?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE
                | WatchMask::CREATE,
        )?;
    }
    inotify.into_event_stream([0u8; 4096])
}
