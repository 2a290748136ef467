//! `docket-bench`: load benchmarks of the Docket broker over its gRPC contract.
//!
//! Every scenario sends traffic to one broker, either a running one (`--broker`) or one
//! that this program starts on a loopback port with a temporary data folder (`--spawn`).
//! The `schedules` scenario also starts a scheduler on a loopback port, releasing into
//! that broker.

mod header;
mod load;
mod scenarios;
mod schedules;
mod spawn;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::load::Payload;
use crate::scenarios::Context;
use crate::spawn::SpawnedServer;
use crate::stats::Printer;

/// Load benchmarks of the Docket broker.
#[derive(Debug, Parser)]
#[command(name = "docket-bench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options of every scenario.
#[derive(Debug, Args)]
struct Common {
    /// URL of a running broker. Ignored with --spawn.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070")]
    broker: String,

    /// Start a broker on 127.0.0.1 port 0 with a temporary data folder, and stop it and
    /// delete the folder at the end.
    #[arg(long, global = true)]
    spawn: bool,

    /// Broker binary that --spawn starts.
    #[arg(long, global = true, default_value = "target/release/docket-broker")]
    broker_bin: PathBuf,

    /// Payload size of each task, in bytes.
    #[arg(long, global = true, default_value_t = 256)]
    payload: usize,

    /// Prefix of the queue names; each phase appends its own suffix. Default: unique per
    /// run, from the time and the process id.
    #[arg(long, global = true)]
    queue: Option<String>,

    /// Hard bound of each phase, in seconds.
    #[arg(long, global = true, default_value_t = 900)]
    timeout: u64,

    /// Print one JSON object per result line, instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Label copied into every JSON result line.
    #[arg(long, global = true, default_value = "docket")]
    label: String,

    /// Round number copied into every JSON result line, as the peers' harness passes it.
    #[arg(long, global = true, default_value_t = 1)]
    run: u32,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Enqueue N tasks per batch size with concurrent producers: tasks/s and per-call
    /// latency.
    Enqueue {
        /// Tasks to enqueue per batch size.
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
        /// Concurrent producers.
        #[arg(long, default_value_t = 4)]
        producers: usize,
        /// Tasks per Enqueue call, comma-separated; each size is one phase.
        #[arg(long, value_delimiter = ',', value_parser = parse_positive, default_value = "1,10,100,1000")]
        batch_sizes: Vec<usize>,
        /// Enqueue calls that each producer keeps outstanding.
        #[arg(long, value_parser = parse_positive, default_value_t = 1)]
        inflight: usize,
        /// Open one connection per producer instead of one shared connection.
        #[arg(long)]
        connections: bool,
    },
    /// Prepare a backlog of N tasks and drain it, acking each task alone and then in
    /// batches: tasks/s of both.
    Drain {
        /// Tasks in each backlog.
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// Producers and workers at once: sustained tasks/s, then enqueue-to-delivery latency
    /// at fixed offered rates.
    E2e {
        /// Length of each phase, in seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Concurrent producers of the sustained phase.
        #[arg(long, default_value_t = 4)]
        producers: usize,
        /// Tasks per Enqueue call in the sustained phase.
        #[arg(long, value_parser = parse_positive, default_value_t = 100)]
        batch: usize,
        /// Enqueue calls that each producer keeps outstanding in the sustained phase.
        #[arg(long, value_parser = parse_positive, default_value_t = 1)]
        inflight: usize,
        /// Offered rates in tasks/s, comma-separated; one task per Enqueue call.
        #[arg(long, value_delimiter = ',', value_parser = parse_positive_u64, default_value = "1000,5000,20000")]
        rates: Vec<u64>,
        /// Maximum Enqueue calls outstanding at a fixed rate.
        #[arg(long, value_parser = parse_positive, default_value_t = 256)]
        rate_outstanding: usize,
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// The e-mail campaign: N tasks whose handler sleeps, against the ideal time
    /// N × handler / (workers × concurrency).
    Campaign {
        /// Tasks of the campaign.
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
        /// Workers, each with its own connection and Subscribe stream.
        #[arg(long, default_value_t = 10)]
        workers: usize,
        /// Tasks that each worker runs at once; its Subscribe max_in_flight.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), default_value_t = 500)]
        concurrency: u32,
        /// Handler time of each task, in milliseconds (a timer, no CPU).
        #[arg(long, default_value_t = 200)]
        handler_ms: u64,
        /// Leases per Ack call.
        #[arg(long, value_parser = parse_positive, default_value_t = 64)]
        ack_batch: usize,
        /// Maximum wait before a partial Ack batch is sent, in milliseconds.
        #[arg(long, default_value_t = 1)]
        ack_flush_ms: u64,
    },
    /// Enqueue N tasks, restart the broker (with --spawn), report its memory and start
    /// time, and drain the backlog.
    Backlog {
        /// Tasks in the backlog.
        #[arg(long, default_value_t = 10_000_000)]
        n: u64,
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// One-shot schedules in a spawned scheduler: ScheduleTask calls/s and the scheduler's
    /// memory with --count schedules held and after a restart, then the rate at which it
    /// releases --release-count schedules due at one instant into the broker.
    Schedules {
        /// One-shot schedules created, all due in one day, so that none fires.
        #[arg(long, value_parser = parse_positive_u64, default_value_t = 1_000_000)]
        count: u64,
        /// ScheduleTask calls in flight.
        #[arg(long, value_parser = parse_positive, default_value_t = 64)]
        concurrency: usize,
        /// Connections that the calls in flight share.
        #[arg(long, value_parser = parse_positive, default_value_t = 4)]
        connections: usize,
        /// One-shot schedules due at one instant, whose release into the broker is timed.
        #[arg(long, value_parser = parse_positive_u64, default_value_t = 100_000)]
        release_count: u64,
        /// Scheduler binary to start. Default: `docket-scheduler` in the folder of
        /// --broker-bin.
        #[arg(long)]
        scheduler_bin: Option<PathBuf>,
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// The peers' workload with their phase names: single-task Enqueue calls with
    /// --inflight outstanding, one worker with max_in_flight = --prefetch, one Ack per task.
    Peers {
        /// Tasks of the enqueue, drain and e2e phases.
        #[arg(long, default_value_t = 100_000)]
        n: u64,
        /// Enqueue calls outstanding.
        #[arg(long, value_parser = parse_positive, default_value_t = 32)]
        inflight: usize,
        /// Subscribe max_in_flight of the worker.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), default_value_t = 256)]
        prefetch: u32,
        /// Offered rate of the latency phase, in tasks/s.
        #[arg(long, value_parser = parse_positive_u64, default_value_t = 5000)]
        rate: u64,
        /// Length of the latency phase, in seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
}

/// Worker options shared by the scenarios that consume.
#[derive(Debug, Args)]
struct WorkerArgs {
    /// Workers, each with its own connection and Subscribe stream.
    #[arg(long, value_parser = parse_positive, default_value_t = 4)]
    workers: usize,
    /// Subscribe max_in_flight of each worker.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), default_value_t = 256)]
    max_in_flight: u32,
    /// Leases per Ack call in the batched mode.
    #[arg(long, value_parser = parse_positive, default_value_t = 64)]
    ack_batch: usize,
    /// Maximum wait before a partial Ack batch is sent, in milliseconds.
    #[arg(long, default_value_t = 1)]
    ack_flush_ms: u64,
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(value) => Ok(value),
        Err(err) => Err(format!("invalid number {text:?}: {err}")),
    }
}

fn parse_positive_u64(text: &str) -> Result<u64, String> {
    parse_positive(text).map(|value| value as u64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(cli) => result,
            // Returning drops the run, and with it a spawned broker and its data folder.
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    });
    // Tasks still running, such as Ack calls of a stopped worker, are dropped here.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let common = cli.common;
    let (spawned, url, broker_description) = if common.spawn {
        let (broker, times) = SpawnedServer::start_broker(&common.broker_bin).await?;
        let description = format!(
            "spawned {} at {} (pid {}, data {}, SERVING after {:.2} s)",
            common.broker_bin.display(),
            broker.url(),
            broker.pid().unwrap_or(0),
            broker.data_dir().display(),
            times.serving.as_secs_f64()
        );
        let url = broker.url();
        (Some(broker), url, description)
    } else {
        (None, common.broker.clone(), common.broker.clone())
    };

    let printer = Printer::new(common.json, common.label.clone(), common.run);
    printer.print_header(&header::collect(&broker_description));
    let queue_prefix = common.queue.clone().unwrap_or_else(default_queue_prefix);
    let mut context = Context {
        url,
        payload: Payload::new(common.payload),
        queue_prefix,
        timeout: Duration::from_secs(common.timeout),
        printer,
        spawned,
        broker_bin: common.broker_bin.clone(),
    };

    let outcome = run_scenario(&mut context, cli.scenario).await;
    if let Some(mut broker) = context.spawned.take()
        && let Err(err) = broker.stop().await
    {
        eprintln!("warning: {err:#}");
    }
    outcome
}

async fn run_scenario(context: &mut Context, scenario: Scenario) -> Result<()> {
    match scenario {
        Scenario::Enqueue {
            n,
            producers,
            batch_sizes,
            inflight,
            connections,
        } => {
            let options = scenarios::EnqueueOptions {
                n,
                producers,
                batch_sizes,
                inflight,
                connection_per_producer: connections,
            };
            scenarios::enqueue(context, &options).await
        }
        Scenario::Drain { n, workers } => {
            let options = scenarios::DrainOptions {
                n,
                workers: workers.workers,
                max_in_flight: workers.max_in_flight,
                ack_batch: workers.ack_batch,
                ack_flush: Duration::from_millis(workers.ack_flush_ms),
            };
            scenarios::drain(context, &options).await
        }
        Scenario::E2e {
            duration,
            producers,
            batch,
            inflight,
            rates,
            rate_outstanding,
            workers,
        } => {
            let options = scenarios::E2eOptions {
                duration: Duration::from_secs(duration),
                producers,
                batch,
                inflight,
                workers: workers.workers,
                max_in_flight: workers.max_in_flight,
                ack_batch: workers.ack_batch,
                ack_flush: Duration::from_millis(workers.ack_flush_ms),
                rates,
                rate_outstanding,
            };
            scenarios::e2e(context, &options).await
        }
        Scenario::Campaign {
            n,
            workers,
            concurrency,
            handler_ms,
            ack_batch,
            ack_flush_ms,
        } => {
            let options = scenarios::CampaignOptions {
                n,
                workers,
                concurrency,
                handler: Duration::from_millis(handler_ms),
                ack_batch,
                ack_flush: Duration::from_millis(ack_flush_ms),
            };
            scenarios::campaign(context, &options).await
        }
        Scenario::Backlog { n, workers } => {
            let options = scenarios::BacklogOptions {
                n,
                workers: workers.workers,
                max_in_flight: workers.max_in_flight,
                ack_batch: workers.ack_batch,
                ack_flush: Duration::from_millis(workers.ack_flush_ms),
            };
            scenarios::backlog(context, &options).await
        }
        Scenario::Schedules {
            count,
            concurrency,
            connections,
            release_count,
            scheduler_bin,
            workers,
        } => {
            let scheduler_bin = scheduler_bin
                .unwrap_or_else(|| context.broker_bin.with_file_name("docket-scheduler"));
            let options = schedules::SchedulesOptions {
                count,
                concurrency,
                connections,
                release_count,
                scheduler_bin,
                workers: workers.workers,
                max_in_flight: workers.max_in_flight,
                ack_batch: workers.ack_batch,
                ack_flush: Duration::from_millis(workers.ack_flush_ms),
            };
            schedules::schedules(context, &options).await
        }
        Scenario::Peers {
            n,
            inflight,
            prefetch,
            rate,
            duration,
        } => {
            let options = scenarios::PeersOptions {
                n,
                inflight,
                prefetch,
                rate,
                duration: Duration::from_secs(duration),
            };
            scenarios::peers(context, &options).await
        }
    }
}

/// Returns a queue name prefix that no other run uses: `bench-<unix seconds>-<pid>`.
fn default_queue_prefix() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    format!("bench-{seconds}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("docket-bench").chain(args.iter().copied()))
    }

    #[test]
    fn batch_sizes_default() {
        let cli = parse(&["enqueue"]).expect("valid arguments");
        let Scenario::Enqueue { batch_sizes, .. } = cli.scenario else {
            panic!("expected enqueue, got {:?}", cli.scenario);
        };
        assert_eq!(batch_sizes, vec![1, 10, 100, 1000]);
    }

    #[test]
    fn batch_sizes_comma_separated() {
        let cli = parse(&["enqueue", "--batch-sizes", "5, 50,500"]).expect("valid arguments");
        let Scenario::Enqueue { batch_sizes, .. } = cli.scenario else {
            panic!("expected enqueue, got {:?}", cli.scenario);
        };
        assert_eq!(batch_sizes, vec![5, 50, 500]);
    }

    #[test]
    fn batch_size_zero_rejected() {
        let error = parse(&["enqueue", "--batch-sizes", "1,0"]).expect_err("0 is invalid");
        assert!(error.to_string().contains("at least 1"), "error: {error}");
    }

    #[test]
    fn batch_size_not_a_number_rejected() {
        let error = parse(&["enqueue", "--batch-sizes", "1,ten"]).expect_err("ten is invalid");
        assert!(
            error.to_string().contains("invalid number"),
            "error: {error}"
        );
    }

    #[test]
    fn global_flags_after_subcommand() {
        let cli = parse(&["drain", "--n", "200000", "--spawn", "--json", "--run", "3"])
            .expect("valid arguments");
        assert!(cli.common.spawn);
        assert!(cli.common.json);
        assert_eq!(cli.common.run, 3);
        let Scenario::Drain { n, workers } = cli.scenario else {
            panic!("expected drain, got {:?}", cli.scenario);
        };
        assert_eq!(n, 200_000);
        assert_eq!(workers.max_in_flight, 256);
    }

    #[test]
    fn schedules_defaults() {
        let cli = parse(&["--spawn", "schedules"]).expect("valid arguments");
        let Scenario::Schedules {
            count,
            concurrency,
            connections,
            release_count,
            scheduler_bin,
            workers,
        } = cli.scenario
        else {
            panic!("expected schedules, got {:?}", cli.scenario);
        };
        assert_eq!(count, 1_000_000);
        assert_eq!(concurrency, 64);
        assert_eq!(connections, 4);
        assert_eq!(release_count, 100_000);
        assert_eq!(scheduler_bin, None);
        assert_eq!(workers.ack_batch, 64);
    }

    #[test]
    fn schedules_zero_count_rejected() {
        let error = parse(&["schedules", "--count", "0"]).expect_err("count 0 is invalid");
        assert!(
            error.to_string().contains("must be at least 1"),
            "error: {error}"
        );
    }

    #[test]
    fn rates_parse() {
        let cli = parse(&["e2e", "--rates", "1000,5000"]).expect("valid arguments");
        let Scenario::E2e { rates, .. } = cli.scenario else {
            panic!("expected e2e, got {:?}", cli.scenario);
        };
        assert_eq!(rates, vec![1000, 5000]);
    }
}
