//! A real Mosquitto broker for tests, on a free port of 127.0.0.1.
//!
//! Each broker has its own temporary folder with its config file, log file,
//! stderr output and, when persistence is on, its database. Tests never use
//! port 1883, so a system-wide Mosquitto service does not interfere.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Command that installs the broker on Debian and Ubuntu.
pub const INSTALL_COMMAND: &str = "apt-get install -y mosquitto";

/// Number of ports tried before giving up when each one is taken by another
/// process between picking it and Mosquitto binding it.
const BIND_ATTEMPTS: usize = 5;

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Folders searched for the `mosquitto` binary after `PATH`. Debian installs
/// it in /usr/sbin, which is not on the `PATH` of most non-root users.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/usr/local/sbin"];

/// Returns a port of 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and closing the listener, so another
/// process can take it before the caller binds it. Callers that start a
/// server on it should retry with a new port when the bind fails.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|err| panic!("failed to bind 127.0.0.1:0 to find a free port: {err}"));
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
}

/// Options of a [`Mosquitto`] broker. Create one with [`Mosquitto::builder`].
#[derive(Debug, Clone)]
pub struct MosquittoBuilder {
    binary: Option<PathBuf>,
    persistence: bool,
    max_inflight_messages: Option<u32>,
    max_queued_messages: Option<u32>,
    verbose_log: bool,
    config_lines: Vec<String>,
    startup_timeout: Duration,
    allow_anonymous: bool,
    tls: Option<TlsListener>,
}

/// PEM files of a TLS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// CA that signs the client certificates Mosquitto accepts.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Mutual TLS: reject clients without a certificate signed by `ca_file`.
    pub require_certificate: bool,
}

impl MosquittoBuilder {
    /// Sets `allow_anonymous`; true by default. Turn it off together with a
    /// `password_file` line for tests of authentication.
    pub fn allow_anonymous(mut self, allowed: bool) -> Self {
        self.allow_anonymous = allowed;
        self
    }

    /// Makes the main listener ([`Mosquitto::port`]) a TLS listener, and
    /// adds a plain listener ([`Mosquitto::plain_port`]) for the test's own
    /// publishers and subscribers.
    pub fn tls(mut self, listener: TlsListener) -> Self {
        self.tls = Some(listener);
        self
    }

    /// Sets the broker binary. By default `mosquitto` is searched in `PATH`,
    /// /usr/sbin and /usr/local/sbin.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Stores sessions, subscriptions and queued messages in a database in
    /// the broker's temporary folder, so that they survive [`Mosquitto::stop`]
    /// and [`Mosquitto::restart`]. Mosquitto writes the database when it
    /// exits on SIGTERM, but not after [`Mosquitto::kill`].
    pub fn persistence(mut self, enabled: bool) -> Self {
        self.persistence = enabled;
        self
    }

    /// Sets `max_inflight_messages`: the maximum number of outgoing QoS 1 and
    /// 2 messages per client that are sent but not yet acknowledged.
    /// Mosquitto's default is 20, and 0 means no maximum.
    pub fn max_inflight_messages(mut self, count: u32) -> Self {
        self.max_inflight_messages = Some(count);
        self
    }

    /// Sets `max_queued_messages`: the maximum number of QoS 1 and 2 messages
    /// queued per client beyond those in flight, including for a disconnected
    /// client with a persistent session. Mosquitto drops messages beyond it.
    /// Mosquitto's default is 1000, and 0 means no maximum. A subscriber
    /// that falls behind a bulk publish, such as the host during a replay of
    /// all sensor data, loses the messages beyond the limit, so such tests
    /// should set 0.
    pub fn max_queued_messages(mut self, count: u32) -> Self {
        self.max_queued_messages = Some(count);
        self
    }

    /// Logs every message type (`log_type all`), including one line per
    /// packet, instead of errors, warnings, notices and information.
    pub fn verbose_log(mut self, enabled: bool) -> Self {
        self.verbose_log = enabled;
        self
    }

    /// Appends a line to the generated `mosquitto.conf`, for options that
    /// have no builder method.
    ///
    /// The harness detects startup from the information-level line
    /// "mosquitto version ... running", so the log must keep that level.
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.config_lines.push(line.into());
        self
    }

    /// Sets how long a start or restart may take before the harness kills
    /// the broker and panics. Defaults to 10 seconds.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the broker and waits until it accepts TCP connections.
    ///
    /// # Panics
    ///
    /// Panics when the binary is missing, when the broker exits or times out
    /// during startup, or when every port tried was taken. The message
    /// contains the broker's log.
    pub fn start(self) -> Mosquitto {
        self.start_with_first_port(free_port())
    }

    fn start_with_first_port(self, first_port: u16) -> Mosquitto {
        let binary = match &self.binary {
            Some(path) => path.clone(),
            None => find_binary(),
        };
        let dir = tempfile::Builder::new()
            .prefix("eliot-mosquitto-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("failed to create a temporary folder for mosquitto: {err}")
            });

        let plain_port = self.tls.as_ref().map(|_| free_port());
        let mut broker = Mosquitto {
            options: self,
            binary,
            plain_port,
            port: first_port,
            child: None,
            dir,
        };
        let mut last_log = String::new();
        for _ in 0..BIND_ATTEMPTS {
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(StartError::PortTaken(log)) => {
                    last_log = log;
                    broker.port = free_port();
                }
            }
        }
        panic!(
            "mosquitto failed to bind a free port of 127.0.0.1 in {BIND_ATTEMPTS} attempts \
             because another process took each one first; last log:\n{last_log}"
        );
    }
}

/// A running `mosquitto` process that listens on 127.0.0.1 and allows
/// anonymous clients. Dropping it kills the process.
#[derive(Debug)]
pub struct Mosquitto {
    options: MosquittoBuilder,
    binary: PathBuf,
    port: u16,
    /// Plain listener beside a TLS one.
    plain_port: Option<u16>,
    child: Option<Child>,
    dir: TempDir,
}

enum StartError {
    /// Another process has bound the port. Contains the broker's log.
    PortTaken(String),
}

impl Mosquitto {
    /// Returns the default options: no persistence, Mosquitto's own limits.
    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder {
            binary: None,
            persistence: false,
            max_inflight_messages: None,
            max_queued_messages: None,
            verbose_log: false,
            config_lines: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            allow_anonymous: true,
            tls: None,
        }
    }

    /// Starts a broker with the default options. See [`MosquittoBuilder::start`].
    pub fn start() -> Mosquitto {
        Mosquitto::builder().start()
    }

    /// Returns the TCP port the broker listens on. It stays the same across
    /// restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the port of the plain listener that a TLS broker has beside
    /// its TLS one, or [`port`](Self::port) when it has no TLS.
    pub fn plain_port(&self) -> u16 {
        self.plain_port.unwrap_or(self.port)
    }

    /// Returns the listening address as `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Returns the broker's temporary folder, which contains `mosquitto.conf`,
    /// `mosquitto.log`, `stderr.log` and the persistence database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the path of the generated config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("mosquitto.conf")
    }

    /// Returns the path of the broker's log file. Restarts append to it.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("mosquitto.log")
    }

    /// Returns the log file's contents, or an empty string before the broker
    /// has written it.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Returns the broker's standard error output. Mosquitto writes only a
    /// few lines there, such as the warning about running as root.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Returns the process id, or `None` after [`stop`](Self::stop) or
    /// [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the broker with SIGTERM and waits until it exits. With
    /// persistence on, Mosquitto writes its database before it exits.
    /// Does nothing when the broker is not running.
    ///
    /// # Panics
    ///
    /// Panics when the broker has not exited 10 seconds after SIGTERM. The
    /// harness then kills it with SIGKILL before it panics.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }

        send_signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    kill_and_reap(&mut child);
                    panic!(
                        "mosquitto (pid {}) did not exit within {STOP_TIMEOUT:?} after SIGTERM \
                         and was killed; log:\n{}",
                        child.id(),
                        self.log()
                    );
                }
                Err(err) => panic!("failed to wait for mosquitto (pid {}): {err}", child.id()),
            }
        }
    }

    /// Kills the broker with SIGKILL, as in a crash or power loss, and waits
    /// until it exits. Mosquitto saves no persistence database on this path.
    /// Does nothing when the broker is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Restarts the broker on the same port with the same config file and
    /// waits until it accepts connections. A running broker is first stopped
    /// with [`stop`](Self::stop), so with persistence on its sessions and
    /// queued messages survive.
    ///
    /// # Panics
    ///
    /// Panics when the broker fails to start, including when another process
    /// took the port while the broker was down.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(StartError::PortTaken(log)) = self.spawn_and_wait() {
            panic!(
                "mosquitto failed to restart because port {} is in use by another process; log:\n{log}",
                self.port
            );
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir().join("stderr.log")
    }

    fn persistence_dir(&self) -> PathBuf {
        self.dir().join("persistence")
    }

    fn write_config(&self) {
        let mut config = String::new();
        let _ = writeln!(config, "listener {} 127.0.0.1", self.port);
        if let Some(tls) = &self.options.tls {
            // Options of the listener above, so they must follow it.
            let _ = writeln!(config, "cafile {}", tls.ca_file.display());
            let _ = writeln!(config, "certfile {}", tls.cert_file.display());
            let _ = writeln!(config, "keyfile {}", tls.key_file.display());
            let _ = writeln!(config, "require_certificate {}", tls.require_certificate);
        }
        if let Some(port) = self.plain_port {
            let _ = writeln!(config, "listener {port} 127.0.0.1");
        }
        let _ = writeln!(config, "allow_anonymous {}", self.options.allow_anonymous);
        let _ = writeln!(config, "log_dest file {}", self.log_path().display());
        // Mosquitto 2.0.11 reads one type per `log_type` line, and a line
        // with several types turns off logging.
        let log_types: &[&str] = if self.options.verbose_log {
            &["all"]
        } else {
            &["error", "warning", "notice", "information"]
        };
        for log_type in log_types {
            let _ = writeln!(config, "log_type {log_type}");
        }
        let _ = writeln!(config, "log_timestamp_format %Y-%m-%dT%H:%M:%S");
        if self.options.persistence {
            // Mosquitto joins the location and the file name without adding
            // a separator, so the location must end with a slash.
            let _ = writeln!(config, "persistence true");
            let _ = writeln!(
                config,
                "persistence_location {}/",
                self.persistence_dir().display()
            );
        }
        if let Some(count) = self.options.max_inflight_messages {
            let _ = writeln!(config, "max_inflight_messages {count}");
        }
        if let Some(count) = self.options.max_queued_messages {
            let _ = writeln!(config, "max_queued_messages {count}");
        }
        if is_root() {
            // As root, Mosquitto switches to the `mosquitto` user, which may
            // not write the temporary folder. The option is ignored for
            // other users.
            let _ = writeln!(config, "user root");
        }
        for line in &self.options.config_lines {
            let _ = writeln!(config, "{line}");
        }

        fs::write(self.config_path(), config).unwrap_or_else(|err| {
            panic!("failed to write {}: {err}", self.config_path().display())
        });
    }

    /// Writes the config, starts the process and waits until it is ready.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        self.write_config();
        if self.options.persistence {
            let dir = self.persistence_dir();
            fs::create_dir_all(&dir)
                .unwrap_or_else(|err| panic!("failed to create {}: {err}", dir.display()));
        }

        // The log file is shared by all starts, so readiness is read only
        // from the bytes this start appends.
        let log_offset = fs::metadata(self.log_path()).map_or(0, |meta| meta.len() as usize);
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .unwrap_or_else(|err| panic!("failed to open {}: {err}", self.stderr_path().display()));

        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                panic!(
                    "{}",
                    missing_binary_message(&self.binary.display().to_string())
                )
            }
            Err(err) => panic!("failed to start {}: {err}", self.binary.display()),
        };
        self.child = Some(child);

        self.wait_until_ready(log_offset)
    }

    fn wait_until_ready(&mut self, log_offset: usize) -> Result<(), StartError> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + self.options.startup_timeout;
        loop {
            let log = self.log();
            let new_log = log.get(log_offset..).unwrap_or("");
            let child = self.child.as_mut().expect("the broker was just spawned");

            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    if new_log.contains("Address already in use") {
                        return Err(StartError::PortTaken(new_log.to_owned()));
                    }
                    self.panic_exited(status, new_log);
                }
                Ok(None) => {}
                Err(err) => panic!("failed to check the mosquitto process: {err}"),
            }

            // The log line proves that this process, and not another one
            // that took the port, opened the listener.
            let running = new_log.contains(" running");
            if running && TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).is_ok() {
                return Ok(());
            }

            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "mosquitto did not accept connections on {address} within {:?}; log:\n{}\nstderr:\n{}",
                    self.options.startup_timeout,
                    self.log(),
                    self.stderr()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn panic_exited(&self, status: ExitStatus, new_log: &str) -> ! {
        let config = fs::read_to_string(self.config_path()).unwrap_or_default();
        panic!(
            "mosquitto exited during startup with {status}; log:\n{new_log}\nstderr:\n{}\nconfig:\n{config}",
            self.stderr()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_binary() -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let sbin_dirs = SBIN_DIRS.iter().map(PathBuf::from);
    path_dirs
        .into_iter()
        .chain(sbin_dirs)
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{}", missing_binary_message("mosquitto")))
}

fn missing_binary_message(binary: &str) -> String {
    format!(
        "the MQTT broker binary `{binary}` was not found (searched PATH, /usr/sbin and \
         /usr/local/sbin). Install it with `{INSTALL_COMMAND}` (as root), or run the whole \
         suite with `bash tests/run.sh`, which installs it."
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("process ids fit in pid_t");
    // SAFETY: kill has no memory preconditions. The pid belongs to a child
    // that has not been reaped yet, so it cannot name another process.
    unsafe {
        libc::kill(pid, signal);
    }
}

fn kill_and_reap(child: &mut Child) {
    // Errors mean the process already exited; wait() then reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_port_is_replaced() {
        let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = holder.local_addr().unwrap().port();

        let mut broker = Mosquitto::builder().start_with_first_port(taken);

        assert_ne!(broker.port(), taken);
        assert!(broker.is_running());
        assert!(
            broker.log().contains("Address already in use"),
            "log:\n{}",
            broker.log()
        );
    }
}
