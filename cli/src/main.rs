//! The `docket` command line: enqueues and inspects tasks, manages queues and recurring
//! schedules, and with `docket dev` runs a broker and a scheduler in one process.
//!
//! `main` maps each command's result to the exit codes that `--help` lists.

#![forbid(unsafe_code)]

mod args;
mod connect;
mod dev;
mod enqueue;
mod error;
mod output;
mod queue;
mod schedule;
mod task;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command, TaskCommand};
use crate::connect::Context;
use crate::error::CliError;

fn main() -> ExitCode {
    // A usage error exits here with clap's code 2.
    let cli = Cli::parse();
    let context = Context {
        broker_url: cli.broker,
        scheduler_url: cli.scheduler,
        json: cli.json,
    };
    if let Command::Dev(args) = cli.command {
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
    match runtime.block_on(run(&context, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("docket: {err}");
            err.exit_code()
        }
    }
}

/// Runs one client command.
async fn run(context: &Context, command: Command) -> Result<(), CliError> {
    match command {
        // `main` runs `docket dev` on a runtime of its own before it gets here.
        Command::Dev(_) => Err(CliError::Usage(
            "`docket dev` cannot run as a client command".to_owned(),
        )),
        Command::Enqueue(args) => enqueue::run(context, args).await,
        Command::Task(TaskCommand::Get { id }) => task::get(context, id).await,
        Command::Task(TaskCommand::Cancel { id }) => task::cancel(context, id).await,
        Command::Queue(command) => queue::run(context, command).await,
        Command::Schedule(command) => schedule::run(context, command).await,
    }
}
