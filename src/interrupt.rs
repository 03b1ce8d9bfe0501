//! Signals. Ctrl-C (SIGINT) and SIGTERM during `run`: the first asks the run to stop (finished
//! nodes are published and the run is recorded), the second exits at once. A closed output pipe
//! (`hmil-flow … | head`) ends the process quietly, as it does other command-line tools.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first signal.
pub static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    const MESSAGE: &[u8] = b"\ninterrupted: stopping the run and recording it (again to quit at once)\n";
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    // SAFETY: `write` is async-signal-safe; the message is a static buffer.
    unsafe { libc::write(libc::STDERR_FILENO, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
}

/// Routes SIGINT and SIGTERM to [`REQUESTED`].
pub fn catch() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores (making every print
/// to a closed pipe a panic).
pub fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default is always sound.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
