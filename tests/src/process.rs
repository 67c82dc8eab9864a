//! The `eliot` binary as a child process, for the faults that need a real
//! process: SIGKILL, SIGTERM and restarts.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait::wait_until;

/// A running `eliot run`. Dropping it kills the process.
pub struct HostProcess {
    child: Child,
    log: PathBuf,
}

impl HostProcess {
    /// Starts `binary run --config config`, with standard error (the log)
    /// in `log`, and waits until the host is connected to its broker.
    ///
    /// # Panics
    ///
    /// Panics when the process cannot start or does not connect within
    /// 60 s, with the log.
    pub fn start(binary: &Path, config: &Path, log: &Path) -> Self {
        Self::spawn(binary, config, log, &[], "info")
    }

    /// Does the same as [`HostProcess::start`] with the environment
    /// variables `env` set for the process.
    ///
    /// # Panics
    ///
    /// See [`HostProcess::start`].
    pub fn start_with_env(binary: &Path, config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(binary, config, log, env, "info")
    }

    /// Does the same as [`start`](Self::start) with `RUST_LOG` set to
    /// `filter`.
    pub fn start_with_log_filter(binary: &Path, config: &Path, log: &Path, filter: &str) -> Self {
        Self::spawn(binary, config, log, &[], filter)
    }

    fn spawn(binary: &Path, config: &Path, log: &Path, env: &[(&str, &str)], filter: &str) -> Self {
        let stderr = File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut command = Command::new(binary);
        // Only the layers the test passes in `env`, none inherited from the
        // shell that runs the tests.
        for name in std::iter::once(eliot::layers::PROFILE_VARIABLE).chain(eliot::layers::variable_names()) {
            command.env_remove(name);
        }
        let child = command
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut host = Self { child, log: log.to_owned() };
        host.wait_for_log("connected to the broker", Duration::from_secs(60));
        host
    }

    /// The process id, for reading its memory in /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Counts the file descriptors the process has open now: files,
    /// sockets, pipes.
    ///
    /// # Panics
    ///
    /// Panics when `/proc/PID/fd` cannot be read.
    pub fn open_files(&self) -> usize {
        let folder = format!("/proc/{}/fd", self.child.id());
        std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("cannot read {folder}: {e}")).count()
    }

    /// Lowers the soft limit of open file descriptors (RLIMIT_NOFILE) of
    /// the running process to `limit`, as `prlimit --nofile` does.
    ///
    /// # Panics
    ///
    /// Panics when the kernel rejects the change.
    pub fn limit_open_files(&self, limit: u64) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: prlimit(2) on a child this harness owns, with valid
        // pointers to rlimit values that live across the call.
        let read = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut current) };
        assert_eq!(read, 0, "read the open-file limit of pid {pid}: {}", std::io::Error::last_os_error());
        let lowered = libc::rlimit { rlim_cur: limit, rlim_max: current.rlim_max };
        // SAFETY: as above.
        let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lowered, std::ptr::null_mut()) };
        assert_eq!(set, 0, "set the open-file limit of pid {pid} to {limit}: {}", std::io::Error::last_os_error());
    }

    /// Returns the log written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    ///
    /// # Panics
    ///
    /// Panics with the log when it does not appear in time, or when the
    /// process exits first.
    pub fn wait_for_log(&mut self, text: &str, timeout: Duration) {
        let mut exited = None;
        wait_until(&format!("the host logged \"{text}\""), timeout, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return true;
            }
            self.log().contains(text)
        });
        if let Some(status) = exited {
            if !self.log().contains(text) {
                panic!("the host exited with {status} before logging \"{text}\"; log:\n{}", self.log());
            }
        }
    }

    /// Waits until `text` appears at least `count` times in the log.
    ///
    /// # Panics
    ///
    /// Panics when it does not, or when the process exits first.
    pub fn wait_for_log_count(&mut self, text: &str, count: usize, timeout: Duration) {
        let mut exited = None;
        wait_until(&format!("the host logged \"{text}\" {count} times"), timeout, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return true;
            }
            self.log().matches(text).count() >= count
        });
        if let Some(status) = exited {
            panic!("the host exited with {status} before logging \"{text}\" {count} times; log:\n{}", self.log());
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL the host");
        self.child.wait().expect("reap the host");
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    ///
    /// # Panics
    ///
    /// Panics with the log when the host does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        // SAFETY: kill(2) with a pid this test owns and a valid signal.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    ///
    /// # Panics
    ///
    /// Panics with the log when it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until("the host exited", timeout, || {
            status = self.child.try_wait().expect("query the host process");
            status.is_some()
        });
        status.expect("checked above")
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
