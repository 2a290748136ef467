//! Child processes of the Docket services: `docket-broker` and `docket-scheduler`, each
//! started on a loopback port with its store in a test's temporary directory.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_client::SchedulerClient;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{WAIT, broker_binary, scheduler_binary};

/// Health-checked service name that the broker reports as SERVING once it is ready.
pub const BROKER_SERVICE: &str = "docket.v1.Broker";

/// Health-checked service name that the scheduler reports as SERVING once its store is
/// open and it reaches its broker.
pub const SCHEDULER_SERVICE: &str = "docket.v1.Scheduler";

/// Number of stderr lines a failing test prints from each process it started.
const STDERR_TAIL_LINES: usize = 200;

/// Interval between two polls of a health service or of the captured stderr.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Message part of the error that `bind` reports for a port that is still in use.
const ADDRESS_IN_USE: &str = "Address already in use";

/// The process-handling core shared by [`BrokerProcess`] and [`SchedulerProcess`]: a
/// child that logs `<service> listening addr=...` on stderr once it is bound.
///
/// Dropping it kills the process. If the current thread is panicking, which is how a test
/// fails, dropping it also prints the end of the process's stderr so that the failure
/// message shows what the service logged.
struct ServiceProcess {
    /// Service name used in messages: "broker" or "scheduler".
    service: &'static str,
    child: Child,
    addr: SocketAddr,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

impl ServiceProcess {
    /// Starts `binary` with `args` and waits until it logs its listening address.
    ///
    /// Inherited `DOCKET_*` variables are removed so that only the arguments configure
    /// the service, and it logs at its default level.
    async fn spawn(service: &'static str, binary: &Path, args: &[OsString]) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DOCKET_") {
                command.env_remove(name);
            }
        }

        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");

        // A thread drains stderr for the whole life of the process, so that the pipe never
        // fills and blocks the service, and keeps every line for failure messages and
        // `wait_for_log`.
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let (line_sender, mut line_receiver) = mpsc::unbounded_channel();
        let thread_lines = Arc::clone(&stderr_lines);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match reader.read_until(b'\n', &mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buffer).trim_end().to_string();
                        thread_lines.lock().unwrap().push(line.clone());
                        // The receiver is dropped once the address is known.
                        let _ = line_sender.send(line);
                    }
                }
            }
        });

        let mut process = ServiceProcess {
            service,
            child,
            // Replaced as soon as the service logs its address.
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_lines,
            exited: None,
        };

        let found = timeout(WAIT, async {
            while let Some(line) = line_receiver.recv().await {
                if let Some(addr) = listening_addr(&line) {
                    return Some(addr);
                }
            }
            None
        })
        .await;
        process.addr = match found {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                let status = process.child.wait().ok();
                process.exited = status;
                bail!(
                    "{service} exited ({status:?}) before logging `{service} listening` with \
                     addr=; stderr:\n{}",
                    process.stderr_output()
                );
            }
            Err(_) => bail!(
                "{service} logged no `{service} listening` line with addr= within {WAIT:?}; \
                 stderr:\n{}",
                process.stderr_output()
            ),
        };
        Ok(process)
    }

    /// Starts the service on a fixed `addr`, retrying for up to [`WAIT`] while the port is
    /// still in use, for example by connections of the process that used it before.
    async fn spawn_on(
        service: &'static str,
        binary: &Path,
        addr: SocketAddr,
        args: &[OsString],
    ) -> Result<Self> {
        let deadline = Instant::now() + WAIT;
        loop {
            match Self::spawn(service, binary, args).await {
                Ok(process) if process.addr == addr => return Ok(process),
                Ok(process) => bail!(
                    "{service} listens on {} instead of {addr}; stderr:\n{}",
                    process.addr,
                    process.stderr_output()
                ),
                Err(error)
                    if format!("{error:#}").contains(ADDRESS_IN_USE)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Result<Channel> {
        Endpoint::from_shared(self.endpoint())?
            .connect_timeout(WAIT)
            .connect()
            .await
            .with_context(|| format!("failed to connect to the {} at {}", self.service, self.addr))
    }

    /// Checks the status of `health_service` once. A service name the server does not
    /// know yet gives `ServiceUnknown`.
    async fn health(&self, health_service: &str) -> Result<ServingStatus> {
        let check = async {
            let channel = Endpoint::from_shared(self.endpoint())?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: health_service.to_string(),
                })
                .await;
            match response {
                Ok(response) => anyhow::Ok(response.into_inner().status()),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    Ok(ServingStatus::ServiceUnknown)
                }
                Err(status) => Err(status.into()),
            }
        };
        match timeout(Duration::from_secs(2), check).await {
            Ok(result) => result.with_context(|| {
                format!(
                    "health check of {health_service:?} at the {} {} failed",
                    self.service, self.addr
                )
            }),
            Err(_) => bail!(
                "health check of {health_service:?} at the {} {} timed out",
                self.service,
                self.addr
            ),
        }
    }

    /// Polls the health service until it reports `expected` for `health_service`.
    async fn wait_for_health(&self, health_service: &str, expected: ServingStatus) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let mut last_observation = String::from("no health check answered");
        loop {
            if Instant::now() >= deadline {
                bail!(
                    "health of {health_service:?} at the {} {} not {expected:?} within \
                     {WAIT:?}: {last_observation}",
                    self.service,
                    self.addr
                );
            }
            match self.health(health_service).await {
                Ok(status) if status == expected => return Ok(()),
                Ok(status) => last_observation = format!("status {status:?}"),
                Err(error) => last_observation = format!("{error:#}"),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn stderr_output(&self) -> String {
        self.stderr_lines.lock().unwrap().join("\n")
    }

    /// Waits up to [`WAIT`] for a stderr line that contains `text`, including lines logged
    /// before the call, and returns the first such line.
    async fn wait_for_log(&self, text: &str) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .stderr_lines
                .lock()
                .unwrap()
                .iter()
                .find(|line| strip_ansi(line).contains(text))
                .cloned();
            if let Some(line) = found {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} logged no line containing {text:?} within {WAIT:?}; stderr:\n{}",
                    self.service,
                    self.stderr_output()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits up to [`WAIT`] for the `metrics listening` line of a service started with
    /// `--metrics-listen` and returns the address it logged.
    async fn metrics_addr(&self) -> Result<SocketAddr> {
        let line = self.wait_for_log("metrics listening").await?;
        metrics_listening_addr(&line).with_context(|| {
            format!(
                "the {} metrics listening line has no valid addr=: {line}",
                self.service
            )
        })
    }

    fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        // `Child::kill` sends SIGKILL on Unix.
        self.child
            .kill()
            .with_context(|| format!("failed to send SIGKILL to the {}", self.service))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("failed to wait for the {}", self.service))?;
        self.exited = Some(status);
        Ok(status)
    }

    async fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .with_context(|| format!("{} pid out of range", self.service))?;
        // SAFETY: `kill` only sends a signal. `pid` is the id of our own child, which
        // cannot be reused by another process before we reap it with `wait`.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        if sent != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("failed to send SIGTERM to the {}", self.service));
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {WAIT:?} of SIGTERM; stderr:\n{}",
                    self.service,
                    self.stderr_output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let lines = self.stderr_lines.lock().unwrap();
            let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
            eprintln!(
                "--- stderr of the {} at {} (pid {}), last {} lines ---",
                self.service,
                self.addr,
                self.child.id(),
                lines.len() - start
            );
            for line in &lines[start..] {
                eprintln!("{line}");
            }
            eprintln!("--- end of {} stderr ---", self.service);
        }
    }
}

/// A `docket-broker` child process listening on a loopback port.
///
/// Dropping it kills the process. If the current thread is panicking, which is how a test
/// fails, dropping it also prints the end of the broker's stderr so that the failure
/// message shows what the broker logged.
pub struct BrokerProcess {
    process: ServiceProcess,
    data_dir: PathBuf,
}

impl BrokerProcess {
    /// Starts the broker on `127.0.0.1:0` with its store in `data_dir`, waits until it
    /// logs its address and reports SERVING on the health service, and returns it.
    ///
    /// `extra_args` are appended to the command line, for example
    /// `["--heartbeat-interval", "200ms"]`. Inherited `DOCKET_*` variables are removed so
    /// that only the arguments configure the broker, and it logs at its default level.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let args = broker_args(SocketAddr::from(([127, 0, 0, 1], 0)), data_dir, extra_args);
        let process = ServiceProcess::spawn("broker", &broker_binary(), &args).await?;
        Self::wait_until_ready(process, data_dir).await
    }

    /// Starts the broker like [`BrokerProcess::start`] but waits only for its listening
    /// line, not for SERVING, for tests of the time before its store is ready.
    pub async fn start_unready(data_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let args = broker_args(SocketAddr::from(([127, 0, 0, 1], 0)), data_dir, extra_args);
        let process = ServiceProcess::spawn("broker", &broker_binary(), &args).await?;
        Ok(BrokerProcess {
            process,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Checks the health of `service` once: [`BROKER_SERVICE`] or "" for the whole server.
    pub async fn health(&self, service: &str) -> Result<ServingStatus> {
        self.process.health(service).await
    }

    /// Polls the health service until it reports `expected` for [`BROKER_SERVICE`],
    /// failing after [`WAIT`].
    pub async fn wait_for_health(&self, expected: ServingStatus) -> Result<()> {
        self.process.wait_for_health(BROKER_SERVICE, expected).await
    }

    /// Starts the broker on `addr`, such as the address of a broker that a test stopped,
    /// and waits until it reports SERVING. It retries for up to [`WAIT`] while the port is
    /// still in use.
    pub async fn start_on(addr: SocketAddr, data_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let args = broker_args(addr, data_dir, extra_args);
        let process = ServiceProcess::spawn_on("broker", &broker_binary(), addr, &args).await?;
        Self::wait_until_ready(process, data_dir).await
    }

    async fn wait_until_ready(process: ServiceProcess, data_dir: &Path) -> Result<Self> {
        if let Err(error) = process
            .wait_for_health(BROKER_SERVICE, ServingStatus::Serving)
            .await
        {
            bail!(
                "broker at {} did not become ready: {error:#}; stderr:\n{}",
                process.addr,
                process.stderr_output()
            );
        }
        Ok(BrokerProcess {
            process,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Returns the address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// Returns the broker's URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    /// Returns the address of the broker's metrics server, from the `metrics listening`
    /// line that a broker started with `--metrics-listen` logs. Waits up to [`WAIT`].
    pub async fn metrics_addr(&self) -> Result<SocketAddr> {
        self.process.metrics_addr().await
    }

    /// Returns the data directory the broker was started with.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Returns the process id of the broker.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Connects a new client on its own HTTP/2 connection.
    pub async fn client(&self) -> Result<BrokerClient<Channel>> {
        Ok(BrokerClient::new(self.client_channel().await?))
    }

    /// Connects a new channel on its own HTTP/2 connection, for any of the broker's
    /// services.
    pub async fn client_channel(&self) -> Result<Channel> {
        self.process.channel().await
    }

    /// Returns everything the broker wrote to stderr so far.
    pub fn stderr_output(&self) -> String {
        self.process.stderr_output()
    }

    /// Kills the broker with SIGKILL, so it gets no chance to clean up, and waits for it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.process.kill9()
    }

    /// Sends SIGTERM and waits up to [`WAIT`] for the broker to exit.
    ///
    /// Returns an error if the broker is still running after that, and leaves it for
    /// `Drop` to kill.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        self.process.stop().await
    }
}

fn broker_args(listen: SocketAddr, data_dir: &Path, extra_args: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--listen".into(),
        listen.to_string().into(),
        "--data-dir".into(),
        data_dir.into(),
    ];
    args.extend(extra_args.iter().map(OsString::from));
    args.extend(
        default_retry_args(extra_args)
            .into_iter()
            .map(OsString::from),
    );
    args
}

/// Returns flags that make a failed task ready again at once, unless `extra_args` sets
/// a retry backoff itself. Tests that do not test backoff then need not wait for it.
fn default_retry_args(extra_args: &[&str]) -> Vec<&'static str> {
    let sets_backoff = extra_args.iter().any(|arg| arg.starts_with("--retry-"));
    if sets_backoff {
        return Vec::new();
    }
    vec!["--retry-initial-backoff", "0s", "--retry-max-backoff", "0s"]
}

/// A `docket-scheduler` child process listening on a loopback port and releasing tasks
/// into one broker.
///
/// Dropping it kills the process. If the current thread is panicking, dropping it also
/// prints the end of the scheduler's stderr.
pub struct SchedulerProcess {
    process: ServiceProcess,
    data_dir: PathBuf,
    broker_endpoint: String,
}

impl SchedulerProcess {
    /// Starts the scheduler on `127.0.0.1:0` with its store in `data_dir` and the broker
    /// at `broker_endpoint` (`http://127.0.0.1:PORT`), and waits until it logs its address
    /// and reports SERVING, which needs a reachable broker.
    ///
    /// `extra_args` are appended to the command line, for example
    /// `["--misfire-threshold", "5s"]`. Inherited `DOCKET_*` variables are removed so that
    /// only the arguments configure the scheduler.
    pub async fn start(
        data_dir: &Path,
        broker_endpoint: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let scheduler = Self::start_unready(data_dir, broker_endpoint, extra_args).await?;
        scheduler.wait_until_ready().await?;
        Ok(scheduler)
    }

    /// Starts the scheduler like [`SchedulerProcess::start`] but waits only for its
    /// listening line, not for SERVING, for tests whose broker is down.
    pub async fn start_unready(
        data_dir: &Path,
        broker_endpoint: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let args = scheduler_args(listen, data_dir, broker_endpoint, extra_args);
        let process = ServiceProcess::spawn("scheduler", &scheduler_binary(), &args).await?;
        Ok(SchedulerProcess {
            process,
            data_dir: data_dir.to_path_buf(),
            broker_endpoint: broker_endpoint.to_string(),
        })
    }

    /// Starts the scheduler on `addr`, such as the address of a scheduler that a test
    /// stopped, and waits until it reports SERVING. It retries for up to [`WAIT`] while
    /// the port is still in use.
    pub async fn start_on(
        addr: SocketAddr,
        data_dir: &Path,
        broker_endpoint: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let scheduler = Self::start_unready_on(addr, data_dir, broker_endpoint, extra_args).await?;
        scheduler.wait_until_ready().await?;
        Ok(scheduler)
    }

    /// Starts the scheduler on `addr` like [`SchedulerProcess::start_on`] but waits only
    /// for its listening line.
    pub async fn start_unready_on(
        addr: SocketAddr,
        data_dir: &Path,
        broker_endpoint: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let args = scheduler_args(addr, data_dir, broker_endpoint, extra_args);
        let process =
            ServiceProcess::spawn_on("scheduler", &scheduler_binary(), addr, &args).await?;
        Ok(SchedulerProcess {
            process,
            data_dir: data_dir.to_path_buf(),
            broker_endpoint: broker_endpoint.to_string(),
        })
    }

    async fn wait_until_ready(&self) -> Result<()> {
        if let Err(error) = self.wait_for_health(ServingStatus::Serving).await {
            bail!(
                "scheduler at {} did not become ready: {error:#}; stderr:\n{}",
                self.addr(),
                self.stderr_output()
            );
        }
        Ok(())
    }

    /// Returns the address the scheduler listens on.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// Returns the scheduler's URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    /// Returns the address of the scheduler's metrics server, from the `metrics listening`
    /// line that a scheduler started with `--metrics-listen` logs. Waits up to [`WAIT`].
    pub async fn metrics_addr(&self) -> Result<SocketAddr> {
        self.process.metrics_addr().await
    }

    /// Returns the data directory the scheduler was started with.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Returns the broker URL the scheduler was started with.
    pub fn broker_endpoint(&self) -> &str {
        &self.broker_endpoint
    }

    /// Returns the process id of the scheduler.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Connects a new client on its own HTTP/2 connection.
    pub async fn client(&self) -> Result<SchedulerClient<Channel>> {
        Ok(SchedulerClient::new(self.process.channel().await?))
    }

    /// Checks the status of `service`, such as [`SCHEDULER_SERVICE`] or `""`, once on the
    /// scheduler's health service. A service name it does not know gives
    /// `ServiceUnknown`, and a failed connection or call is an error.
    pub async fn health(&self, service: &str) -> Result<ServingStatus> {
        self.process.health(service).await
    }

    /// Polls the health service until it reports `expected` for [`SCHEDULER_SERVICE`],
    /// failing after [`WAIT`].
    pub async fn wait_for_health(&self, expected: ServingStatus) -> Result<()> {
        self.process
            .wait_for_health(SCHEDULER_SERVICE, expected)
            .await
    }

    /// Waits up to [`WAIT`] for a stderr line that contains `text` and returns it. Lines
    /// logged before the call count, so the first matching line of the process's life is
    /// returned.
    pub async fn wait_for_log(&self, text: &str) -> Result<String> {
        self.process.wait_for_log(text).await
    }

    /// Returns everything the scheduler wrote to stderr so far.
    pub fn stderr_output(&self) -> String {
        self.process.stderr_output()
    }

    /// Kills the scheduler with SIGKILL, so it gets no chance to clean up, and waits for
    /// it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.process.kill9()
    }

    /// Sends SIGTERM and waits up to [`WAIT`] for the scheduler to exit.
    ///
    /// Returns an error if the scheduler is still running after that, and leaves it for
    /// `Drop` to kill.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        self.process.stop().await
    }
}

fn scheduler_args(
    listen: SocketAddr,
    data_dir: &Path,
    broker_endpoint: &str,
    extra_args: &[&str],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--listen".into(),
        listen.to_string().into(),
        "--data-dir".into(),
        data_dir.into(),
        "--broker".into(),
        broker_endpoint.into(),
    ];
    args.extend(extra_args.iter().map(OsString::from));
    args
}

/// Extracts the address from a `broker listening` or `scheduler listening` log line.
///
/// The line is formatted by `tracing`, for example
/// `2025-01-01T00:00:00Z  INFO docket_broker: broker listening addr=127.0.0.1:41234`.
/// ANSI escape sequences and quotes around the value are tolerated.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("broker listening") && !line.contains("scheduler listening") {
        return None;
    }
    let value = line.split("addr=").nth(1)?;
    let value = value.split_whitespace().next()?;
    value.trim_matches('"').parse().ok()
}

/// Extracts the address from a `metrics listening addr=...` log line.
fn metrics_listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("metrics listening") {
        return None;
    }
    let value = line.split("addr=").nth(1)?;
    let value = value.split_whitespace().next()?;
    value.trim_matches('"').parse().ok()
}

/// Removes ANSI escape sequences of the form `ESC [ ... letter`.
fn strip_ansi(text: &str) -> String {
    let mut output = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            output.push(c);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_addr_parses_tracing_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_broker: broker listening \
                    addr=127.0.0.1:41234 data_dir=/tmp/x";
        assert_eq!(
            listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
    }

    #[test]
    fn listening_addr_parses_scheduler_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_scheduler: scheduler listening \
                    addr=127.0.0.1:40001";
        assert_eq!(
            listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 40001)))
        );
    }

    #[test]
    fn listening_addr_tolerates_ansi_and_quotes() {
        let line = "\u{1b}[32m INFO\u{1b}[0m broker listening \u{1b}[3maddr\u{1b}[0m\
                    \u{1b}[2m=\u{1b}[0m\"[::1]:7070\"";
        assert_eq!(listening_addr(line), Some("[::1]:7070".parse().unwrap()));
    }

    #[test]
    fn metrics_listening_addr_parses_tracing_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_broker::metrics: metrics listening \
                    addr=127.0.0.1:40002";
        assert_eq!(
            metrics_listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 40002)))
        );
        assert_eq!(listening_addr(line), None);
    }

    #[test]
    fn listening_addr_ignores_other_lines() {
        assert_eq!(
            listening_addr("INFO recovering store addr=127.0.0.1:1"),
            None
        );
        assert_eq!(
            listening_addr("INFO scheduler connecting to broker addr=127.0.0.1:1"),
            None
        );
    }
}
