//! SIGINT / SIGTERM while training (Ctrl-C, a scheduler's preemption): the first lets the current
//! step finish, the trainer saves a checkpoint and the process exits 0 with a message saying how
//! to resume; a second exits at once (status 130). Outside `train` the signals act as usual.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // only async-signal-safe work here: an atomic swap, and _exit
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and ends the process.
        unsafe { libc::_exit(130) };
    }
}

/// While alive, SIGINT and SIGTERM mark the run interrupted instead of killing the process; the
/// handlers that were there before come back when it drops.
pub struct Guard {
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

impl Guard {
    pub fn install() -> Guard {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only touches an atomic and calls _exit.
        let previous = [libc::SIGINT, libc::SIGTERM].into_iter().map(|s| (s, unsafe { libc::signal(s, handler) })).collect();
        Guard { previous }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for &(signal, previous) in &self.previous {
            // SAFETY: restores the handler that was installed before.
            unsafe { libc::signal(signal, previous) };
        }
    }
}

/// Whether a SIGINT or SIGTERM arrived since the guard was installed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
