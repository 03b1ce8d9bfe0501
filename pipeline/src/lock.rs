//! The workspace lock: one run at a time. It is a file created exclusively (`O_EXCL`, which
//! shared file systems honour, unlike `flock`) that names its holder (host, process and the
//! process's start) and whose mtime the holder renews every few seconds. A lock whose process
//! is gone (same host), or whose heartbeat stopped (another host), is stale and taken over.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result, io};

/// How often the holder renews the lock's mtime.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A lock of another host not renewed for this long is stale.
const STALE: Duration = Duration::from_secs(60);
/// How often a run that waits for the lock looks again.
const RETRY: Duration = Duration::from_millis(250);

/// Held while a run uses the workspace; released on drop. A killed holder's lock is taken over
/// by the next run (see the module's documentation).
#[derive(Debug)]
pub struct WorkspaceLock {
    path: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes the lock at `path`, waiting for it when `wait`, else failing with who holds it.
pub(crate) fn acquire(path: &Path, root: &Path, wait: bool) -> Result<WorkspaceLock> {
    let me = Holder::this_process();
    loop {
        match fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut file) => {
                file.write_all(me.text().as_bytes()).and_then(|_| file.sync_all()).map_err(io(path))?;
                return Ok(start_heartbeat(path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(path).unwrap_or_default();
                let renewed = fs::metadata(path).and_then(|m| m.modified()).ok();
                if is_stale(&text, renewed, &me) {
                    tracing::warn!("taking over the workspace lock of a run that is gone: {}", text.trim());
                    // Only if it is still the stale holder's (another run may have taken it).
                    if fs::read_to_string(path).unwrap_or_default() == text {
                        let _ = fs::remove_file(path);
                    }
                    continue;
                }
                if !wait {
                    return Err(Error::Locked { path: root.to_path_buf(), holder: text.trim().to_owned() });
                }
                std::thread::sleep(RETRY);
            }
            // The lock file vanished between the two calls: try again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
        }
    }
}

fn start_heartbeat(path: &Path) -> WorkspaceLock {
    let (stop, stopped) = mpsc::channel::<()>();
    let beat = path.to_path_buf();
    let heartbeat = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
            if let Ok(f) = fs::File::options().write(true).open(&beat) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    });
    WorkspaceLock { path: path.to_path_buf(), stop: Some(stop), heartbeat: Some(heartbeat) }
}

/// Who holds a lock.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    pid: u32,
    host: String,
    /// The process's start, in clock ticks since boot: a reused pid is another process.
    started: String,
}

impl Holder {
    fn this_process() -> Holder {
        let pid = std::process::id();
        Holder { pid, host: host(), started: process_start(pid).unwrap_or_default() }
    }

    fn text(&self) -> String {
        format!(
            "pid {} on {} (started {}) since {}\n",
            self.pid,
            self.host,
            self.started,
            chrono::Utc::now().to_rfc3339()
        )
    }

    fn parse(text: &str) -> Option<Holder> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["pid", pid, "on", host, "(started", started, ..] => Some(Holder {
                pid: pid.parse().ok()?,
                host: (*host).to_owned(),
                started: started.trim_end_matches(')').to_owned(),
            }),
            _ => None,
        }
    }
}

/// Whether the lock written as `text` and last renewed at `renewed` has no live holder.
fn is_stale(text: &str, renewed: Option<SystemTime>, me: &Holder) -> bool {
    let silent = renewed.and_then(|t| t.elapsed().ok()).is_none_or(|age| age > STALE);
    match Holder::parse(text) {
        // On this host, the process tells: gone, or its pid now another process's.
        Some(h) if h.host == me.host => process_start(h.pid).is_none_or(|started| started != h.started),
        // On another host only the heartbeat tells; a half-written lock is judged by it too.
        _ => silent,
    }
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`), if it is running.
fn process_start(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_stale_when_its_process_is_gone_or_its_heartbeat_stopped() {
        let me = Holder::this_process();
        let now = Some(SystemTime::now());
        assert_eq!(Holder::parse(&me.text()), Some(Holder::this_process()));
        assert!(!is_stale(&me.text(), now, &me), "this process is alive");
        let gone = Holder { pid: u32::MAX - 1, ..Holder::this_process() };
        assert!(is_stale(&gone.text(), now, &me), "no such process");
        let reused = Holder { started: "1".into(), ..Holder::this_process() };
        assert!(is_stale(&reused.text(), now, &me), "the pid is another process's now");
        let elsewhere = Holder { host: "node7".into(), ..Holder::this_process() };
        assert!(!is_stale(&elsewhere.text(), now, &me), "another host's fresh heartbeat");
        let old = Some(SystemTime::now() - STALE * 2);
        assert!(is_stale(&elsewhere.text(), old, &me), "another host's heartbeat stopped");
    }

    #[test]
    fn a_held_lock_refuses_a_second_taker_and_a_dropped_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.lock");
        let held = acquire(&path, dir.path(), false).unwrap();
        let err = acquire(&path, dir.path(), false).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        assert!(!path.exists());
        // A dead process's lock is taken over at once.
        fs::write(&path, Holder { pid: u32::MAX - 1, ..Holder::this_process() }.text()).unwrap();
        let _taken = acquire(&path, dir.path(), false).unwrap();
    }
}
