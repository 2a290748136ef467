//! The `docket` command line: enqueues and inspects tasks, manages queues, dead tasks and
//! recurring schedules, and with `docket dev` runs a broker and a scheduler in one
//! process.
//!
//! `main` maps each command's result to the exit codes that `--help` lists.

#![forbid(unsafe_code)]

mod args;
mod connect;
mod dead;
mod dev;
mod enqueue;
mod error;
mod output;
mod progress;
mod queue;
mod schedule;
mod task;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use crate::args::{Cli, Command, DEFAULT_BROKER, DEFAULT_SCHEDULER, TaskCommand};
use crate::connect::Context;
use crate::error::{CliError, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let json = cli.json;
    let (context, command) = match resolve(cli) {
        Ok(resolved) => resolved,
        Err(err) => return report(json, &err),
    };
    if let Command::Dev(args) = command {
        return dev::run(args);
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("docket: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&context, command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(json, &err),
    }
}

/// Prints a clap error and returns its exit code: as JSON on stderr with `--json`, and as
/// clap renders it otherwise. Help and version go to stdout as usual.
fn usage_error(err: &clap::Error) -> ExitCode {
    let wants_json = std::env::args_os().skip(1).any(|arg| arg == "--json");
    if !wants_json
        || matches!(
            err.kind(),
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
        )
    {
        err.exit();
    }
    let rendered = err.render().to_string();
    // clap's text is the error, then a blank line and the usage; the error may span
    // several lines, such as a list of missing arguments.
    let message = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned();
    let document = serde_json::json!({
        "error": {
            "code": "USAGE",
            "message": message,
            "hint": "run the command with --help for its usage",
        }
    });
    eprintln!("{document}");
    ExitCode::from(EXIT_USAGE)
}

/// Prints `err` on stderr, as one JSON object with `--json`, and returns its exit code.
fn report(json: bool, err: &CliError) -> ExitCode {
    match err {
        // The watched task's last line already shows how it ended.
        CliError::TaskEnded => {}
        _ if json => eprintln!("{}", err.to_json()),
        _ => eprintln!("docket: {err}"),
    }
    err.exit_code()
}

/// Takes the broker and scheduler URLs from the subcommand's flags, or from the same
/// flags given before the subcommand.
fn resolve(cli: Cli) -> Result<(Context, Command), CliError> {
    let (broker, scheduler) = match &cli.command {
        Command::Dev(_) => {
            if cli.broker.is_some() || cli.scheduler.is_some() {
                return Err(CliError::Usage(
                    "`docket dev` does not use --broker or --scheduler: it serves on \
                     --broker-listen and --scheduler-listen"
                        .to_owned(),
                ));
            }
            (DEFAULT_BROKER, DEFAULT_SCHEDULER)
        }
        Command::Enqueue(args) => (
            args.broker.broker.as_str(),
            args.scheduler.scheduler.as_str(),
        ),
        Command::Task(group) => (group.broker.broker.as_str(), DEFAULT_SCHEDULER),
        Command::Queue(group) => (group.broker.broker.as_str(), DEFAULT_SCHEDULER),
        Command::Dead(group) => (group.broker.broker.as_str(), DEFAULT_SCHEDULER),
        Command::Schedule(group) => (DEFAULT_BROKER, group.scheduler.scheduler.as_str()),
    };
    let context = Context {
        broker_url: cli.broker.clone().unwrap_or_else(|| broker.to_owned()),
        scheduler_url: cli
            .scheduler
            .clone()
            .unwrap_or_else(|| scheduler.to_owned()),
        json: cli.json,
        connection: cli.connection.clone(),
    };
    Ok((context, cli.command))
}

/// Runs one client command.
async fn run(context: &Context, command: Command) -> Result<(), CliError> {
    match command {
        // `main` runs `docket dev` on a runtime of its own before it gets here.
        Command::Dev(_) => Err(CliError::Usage(
            "`docket dev` cannot run as a client command".to_owned(),
        )),
        Command::Enqueue(args) => enqueue::run(context, args).await,
        Command::Task(group) => match group.command {
            TaskCommand::Get { id } => task::get(context, id).await,
            TaskCommand::Cancel { id } => task::cancel(context, id).await,
            TaskCommand::Watch { id } => task::watch(context, id).await,
        },
        Command::Queue(group) => queue::run(context, group.command).await,
        Command::Dead(group) => dead::run(context, group.command).await,
        Command::Schedule(group) => schedule::run(context, group.command).await,
    }
}
