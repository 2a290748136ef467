//! `docket-broker` and `docket-scheduler` child processes on loopback ports with temporary
//! data folders.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Number of the process's last stderr lines kept for error messages.
const KEPT_LOG_LINES: usize = 50;

/// Time that the process has to log its address and report SERVING after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Time that a stop waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The Docket server that a [`SpawnedServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Broker,
    Scheduler,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Broker => "broker",
            ServerKind::Scheduler => "scheduler",
        }
    }

    /// Message of the log line that carries the bound address in its `addr` field.
    fn listening_message(self) -> &'static str {
        match self {
            ServerKind::Broker => "broker listening",
            ServerKind::Scheduler => "scheduler listening",
        }
    }

    /// Service name whose SERVING status means that the server is ready. The broker
    /// reports it for the overall service "", the scheduler for its own service name,
    /// once its store is open and the broker is reachable.
    fn health_service(self) -> &'static str {
        match self {
            ServerKind::Broker => "",
            ServerKind::Scheduler => "docket.v1.Scheduler",
        }
    }

    /// Name of the server's redb file inside its data folder.
    fn database_file(self) -> &'static str {
        match self {
            ServerKind::Broker => "broker.redb",
            ServerKind::Scheduler => "scheduler.redb",
        }
    }
}

/// A broker or scheduler process that this program started.
///
/// Dropping it kills the process if it still runs; dropping the data folder deletes it.
pub struct SpawnedServer {
    kind: ServerKind,
    binary: PathBuf,
    /// Arguments after `--listen` and `--data-dir`, such as the scheduler's `--broker`.
    extra_args: Vec<OsString>,
    data_dir: TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Time at which the current process was started.
    started_at: Instant,
}

/// How long a start took, measured from the spawn of the process.
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// Until the process logged its `listening` line.
    pub listening: Duration,
    /// Until the health service reported SERVING.
    pub serving: Duration,
}

impl SpawnedServer {
    /// Starts the broker `binary` on 127.0.0.1 port 0 with a new temporary data folder and
    /// waits until it reports SERVING.
    pub async fn start_broker(binary: &Path) -> Result<(Self, StartTimes)> {
        if !binary.is_file() {
            bail!(
                "broker binary {} not found; build it with `cargo build --release -p docket-broker` \
                 or pass --broker-bin PATH",
                binary.display()
            );
        }
        Self::start(ServerKind::Broker, binary, Vec::new()).await
    }

    /// Starts the scheduler `binary` on 127.0.0.1 port 0 with a new temporary data folder,
    /// releasing into the broker at `broker_url`, and waits until it reports SERVING.
    pub async fn start_scheduler(binary: &Path, broker_url: &str) -> Result<(Self, StartTimes)> {
        if !binary.is_file() {
            bail!(
                "scheduler binary {} not found; build it with `cargo build --release -p \
                 docket-scheduler` or pass --scheduler-bin PATH",
                binary.display()
            );
        }
        let extra_args = vec![OsString::from("--broker"), OsString::from(broker_url)];
        Self::start(ServerKind::Scheduler, binary, extra_args).await
    }

    async fn start(
        kind: ServerKind,
        binary: &Path,
        extra_args: Vec<OsString>,
    ) -> Result<(Self, StartTimes)> {
        let data_dir = tempfile::Builder::new()
            .prefix(&format!("docket-bench-{}-", kind.name()))
            .tempdir()
            .context("cannot create a temporary data folder")?;
        let mut server = SpawnedServer {
            kind,
            binary: binary.to_path_buf(),
            extra_args,
            data_dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: Arc::new(Mutex::new(VecDeque::new())),
            started_at: Instant::now(),
        };
        let times = server.launch().await?;
        Ok((server, times))
    }

    /// Returns the server's URL, such as `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the path of the temporary data folder.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Returns the path of the server's redb file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.path().join(self.kind.database_file())
    }

    /// Stops the server with SIGTERM and starts it again on the same data folder.
    pub async fn restart(&mut self) -> Result<(Duration, StartTimes)> {
        let stop = self.stop().await?;
        let times = self.launch().await?;
        Ok((stop, times))
    }

    /// Sends SIGTERM and waits for the process to exit, or kills it after
    /// [`STOP_TIMEOUT`]. Returns the time the stop took.
    pub async fn stop(&mut self) -> Result<Duration> {
        let name = self.kind.name();
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        send_sigterm(name, child.id())?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    eprintln!("{name} exited with {status} after SIGTERM");
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{name} (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed",
                    child.id()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Spawns the process, waits for its `listening` line and then for SERVING.
    async fn launch(&mut self) -> Result<StartTimes> {
        let name = self.kind.name();
        let message = self.kind.listening_message();
        let mut command = Command::new(&self.binary);
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the arguments configure the server, and it logs at its default level.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DOCKET_") {
                command.env_remove(name);
            }
        }
        self.started_at = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        let stderr = child
            .stderr
            .take()
            .with_context(|| format!("{name} stderr is not piped"))?;
        self.child = Some(child);

        // A thread reads stderr for the whole life of the process, so that the pipe never
        // fills and blocks the server.
        let (addr_sender, addr_receiver) = mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let reader = BufReader::new(stderr);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line, message) {
                    let _ = addr_sender.send(addr);
                }
                let mut log = log.lock().expect("log lock");
                if log.len() == KEPT_LOG_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });

        let addr = loop {
            match addr_receiver.try_recv() {
                Ok(addr) => break addr,
                Err(mpsc::TryRecvError::Disconnected) => {
                    bail!(
                        "{name} exited before logging `{message}`; its last log lines:\n{}",
                        self.log_tail()
                    )
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if self.started_at.elapsed() > START_TIMEOUT {
                bail!(
                    "{name} logged no `{message}` line within {START_TIMEOUT:?}; its last log \
                     lines:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        self.addr = addr;
        let listening = self.started_at.elapsed();
        let deadline = self.started_at + START_TIMEOUT;
        if let Err(err) =
            wait_until_serving(&self.url(), self.kind.health_service(), deadline).await
        {
            bail!("{err:#}; its last log lines:\n{}", self.log_tail());
        }
        Ok(StartTimes {
            listening,
            serving: self.started_at.elapsed(),
        })
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `grpc.health.v1.Health/Check` for `service` every 10 ms until it returns
/// SERVING, or fails at `deadline`.
pub async fn wait_until_serving(url: &str, service: &str, deadline: Instant) -> Result<()> {
    let endpoint = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1));
    loop {
        let check = async {
            let channel = endpoint.connect().await?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await?;
            anyhow::Ok(response.into_inner().status())
        };
        let last_error = match check.await {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(status) => format!("status {status:?}"),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "server at {url} did not report SERVING for service {service:?} in time: {last_error}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Returns the resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn resident_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Returns the peak resident memory of process `pid` in KiB (`VmHWM` of
/// `/proc/PID/status`).
pub fn peak_resident_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    crate::header::meminfo_kib(&text, field).with_context(|| format!("no {field} in {path}"))
}

fn send_sigterm(name: &str, pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of this process. `pid` is
    // the id of a child that has not been waited for, so it cannot name another process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    if result != 0 {
        bail!(
            "cannot send SIGTERM to {name} pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Extracts the address from a log line such as `broker listening addr=...`, whose
/// message is `message`. ANSI escape sequences and quotes around the value are tolerated.
pub fn listening_addr(line: &str, message: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains(message) {
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

    const BROKER: &str = "broker listening";
    const SCHEDULER: &str = "scheduler listening";

    #[test]
    fn listening_addr_of_plain_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_broker: broker listening \
                    addr=127.0.0.1:41234";
        assert_eq!(
            listening_addr(line, BROKER),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
    }

    #[test]
    fn listening_addr_with_ansi_codes() {
        let line = "\u{1b}[32m INFO\u{1b}[0m \u{1b}[2mdocket_broker\u{1b}[0m: broker listening \
                    \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:5000";
        assert_eq!(
            listening_addr(line, BROKER),
            Some(SocketAddr::from(([127, 0, 0, 1], 5000)))
        );
    }

    #[test]
    fn listening_addr_of_scheduler_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_scheduler: scheduler listening \
                    addr=127.0.0.1:41235 broker=http://127.0.0.1:41234";
        assert_eq!(
            listening_addr(line, SCHEDULER),
            Some(SocketAddr::from(([127, 0, 0, 1], 41235)))
        );
        assert_eq!(listening_addr(line, BROKER), None);
    }

    #[test]
    fn listening_addr_of_other_line() {
        assert_eq!(
            listening_addr("INFO store recovered deliverable=0", BROKER),
            None
        );
    }
}
