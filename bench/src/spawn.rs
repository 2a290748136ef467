//! A `docket-broker` child process on a loopback port with a temporary data folder.

use std::collections::VecDeque;
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

/// Number of the broker's last stderr lines kept for error messages.
const KEPT_LOG_LINES: usize = 50;

/// Time that the broker has to log its address after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Time that a stop waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A broker process that this program started.
///
/// Dropping it kills the process if it still runs; dropping the data folder deletes it.
pub struct SpawnedBroker {
    binary: PathBuf,
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
    /// Until the broker logged `broker listening`.
    pub listening: Duration,
    /// Until the health service reported SERVING for service "".
    pub serving: Duration,
}

impl SpawnedBroker {
    /// Starts `binary` on 127.0.0.1 port 0 with a new temporary data folder and waits until
    /// it reports SERVING.
    pub async fn start(binary: &Path) -> Result<(Self, StartTimes)> {
        if !binary.is_file() {
            bail!(
                "broker binary {} not found; build it with `cargo build --release -p docket-broker` \
                 or pass --broker-bin PATH",
                binary.display()
            );
        }
        let data_dir = tempfile::Builder::new()
            .prefix("docket-bench-")
            .tempdir()
            .context("cannot create a temporary data folder")?;
        let mut broker = SpawnedBroker {
            binary: binary.to_path_buf(),
            data_dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: Arc::new(Mutex::new(VecDeque::new())),
            started_at: Instant::now(),
        };
        let times = broker.launch().await?;
        Ok((broker, times))
    }

    /// Returns the broker's URL, such as `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id of the running broker.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the path of the temporary data folder.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Stops the broker with SIGTERM and starts it again on the same data folder.
    pub async fn restart(&mut self) -> Result<(Duration, StartTimes)> {
        let stop = self.stop().await?;
        let times = self.launch().await?;
        Ok((stop, times))
    }

    /// Sends SIGTERM and waits for the process to exit, or kills it after
    /// [`STOP_TIMEOUT`]. Returns the time the stop took.
    pub async fn stop(&mut self) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        send_sigterm(child.id())?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    eprintln!("broker exited with {status} after SIGTERM");
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "broker (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed",
                    child.id()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Spawns the process, waits for its `broker listening` line and then for SERVING.
    async fn launch(&mut self) -> Result<StartTimes> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the arguments configure the broker, and it logs at its default level.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DOCKET_") {
                command.env_remove(name);
            }
        }
        self.started_at = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        let stderr = child.stderr.take().context("broker stderr is not piped")?;
        self.child = Some(child);

        // A thread reads stderr for the whole life of the process, so that the pipe never
        // fills and blocks the broker.
        let (addr_sender, addr_receiver) = mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let reader = BufReader::new(stderr);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
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
                        "broker exited before logging `broker listening`; its last log lines:\n{}",
                        self.log_tail()
                    )
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if self.started_at.elapsed() > START_TIMEOUT {
                bail!(
                    "broker logged no `broker listening` line within {START_TIMEOUT:?}; its last \
                     log lines:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        self.addr = addr;
        let listening = self.started_at.elapsed();
        wait_until_serving(&self.url(), self.started_at + START_TIMEOUT).await?;
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

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `grpc.health.v1.Health/Check` for service "" every 10 ms until it returns
/// SERVING, or fails at `deadline`.
pub async fn wait_until_serving(url: &str, deadline: Instant) -> Result<()> {
    let endpoint = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1));
    loop {
        let check = async {
            let channel = endpoint.connect().await?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
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
            bail!("broker at {url} did not report SERVING in time: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Returns the resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn resident_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    crate::header::meminfo_kib(&text, "VmRSS").with_context(|| format!("no VmRSS in {path}"))
}

fn send_sigterm(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of this process. `pid` is
    // the id of a child that has not been waited for, so it cannot name another process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    if result != 0 {
        bail!(
            "cannot send SIGTERM to broker pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Extracts the address from the broker's `broker listening addr=...` log line. ANSI
/// escape sequences and quotes around the value are tolerated.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("broker listening") {
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
    fn listening_addr_of_plain_line() {
        let line = "2025-01-01T00:00:00.000000Z  INFO docket_broker: broker listening \
                    addr=127.0.0.1:41234";
        assert_eq!(
            listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
    }

    #[test]
    fn listening_addr_with_ansi_codes() {
        let line = "\u{1b}[32m INFO\u{1b}[0m \u{1b}[2mdocket_broker\u{1b}[0m: broker listening \
                    \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:5000";
        assert_eq!(
            listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 5000)))
        );
    }

    #[test]
    fn listening_addr_of_other_line() {
        assert_eq!(listening_addr("INFO store recovered deliverable=0"), None);
    }
}
