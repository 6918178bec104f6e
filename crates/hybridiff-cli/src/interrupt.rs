//! Ctrl-C (SIGINT, and SIGTERM alike) during a `generate --prompts` batch (issue 28). The
//! first one stops
//! taking prompts and cancels the running image at its next denoiser module ([`CANCEL`], the
//! flag the warm ranks check); the batch then closes its manifest, which lists exactly the
//! images in the folder, and exits with status 130. The second one exits at once, unless it
//! arrives in the few microseconds in which a finished image is renamed into place and
//! listed ([`Commit`]): then it exits as soon as that is done, so the folder and the
//! manifest agree after either. A temporary file a write in progress had open is left; the
//! next run that writes in that folder removes it
//! ([`hybridiff_engine::io::remove_stale_temp_files`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set by the first SIGINT; the running job's ranks stop at their next module.
pub static CANCEL: AtomicBool = AtomicBool::new(false);
/// SIGINTs received.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Inside a [`Commit`].
static IN_COMMIT: AtomicBool = AtomicBool::new(false);
/// A second SIGINT arrived during a [`Commit`]: exit when it ends.
static EXIT_PENDING: AtomicBool = AtomicBool::new(false);

/// The exit status of a process stopped by SIGINT, as shells report it (128 + 2).
pub const EXIT_STATUS: u8 = 130;

/// Writes `msg` to stderr from a signal handler (write(2) is async-signal-safe; printing
/// through std is not).
fn say(msg: &str) {
    // SAFETY: writes a valid buffer to fd 2; the result is deliberately ignored.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

fn exit_now() -> ! {
    // SAFETY: _exit is async-signal-safe; nothing else runs after it.
    unsafe { libc::_exit(EXIT_STATUS as libc::c_int) }
}

/// Only atomics, write(2) and _exit: all async-signal-safe.
fn on_sigint() {
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    CANCEL.store(true, Ordering::SeqCst);
    if n == 1 {
        say("\nhybridiff: interrupted: stopping after the current step and closing the manifest (Ctrl-C again to exit at once)\n");
        return;
    }
    if IN_COMMIT.load(Ordering::SeqCst) {
        EXIT_PENDING.store(true, Ordering::SeqCst);
    } else {
        say("\nhybridiff: interrupted again: exiting now\n");
        exit_now();
    }
}

/// Replaces the default of SIGINT and SIGTERM (ending the process at once) by the two-step
/// handling above: a service manager's SIGTERM gets the same clean stop as Ctrl-C.
pub fn install() -> anyhow::Result<()> {
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        // SAFETY: the action only touches atomics and calls async-signal-safe functions.
        unsafe { signal_hook_registry::register(signal, on_sigint) }
            .map_err(|e| anyhow::anyhow!("cannot handle {name}: {e}"))?;
    }
    Ok(())
}

/// Whether a SIGINT has arrived.
pub fn requested() -> bool {
    CANCEL.load(Ordering::SeqCst)
}

/// While it lives, a second SIGINT waits for it to end before exiting: hold one while a
/// finished image is moved into place and listed in the manifest.
pub struct Commit(());

impl Commit {
    pub fn begin() -> Self {
        IN_COMMIT.store(true, Ordering::SeqCst);
        Commit(())
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        IN_COMMIT.store(false, Ordering::SeqCst);
        if EXIT_PENDING.load(Ordering::SeqCst) {
            say("\nhybridiff: interrupted again: exiting now\n");
            exit_now();
        }
    }
}

/// The error of a run stopped by Ctrl-C: its message says what was kept; the process exits
/// with [`EXIT_STATUS`].
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}
