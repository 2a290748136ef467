//! The `docket-scheduler` binary: parses configuration, sets up logging, and runs the
//! scheduler until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use docket_scheduler::Config;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // Parse first, so that a usage error exits with clap's code 2 before anything starts.
    let config = Config::parse();
    docket_broker::process::init_tracing();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(docket_broker::process::cancel_on_signal(shutdown.clone()));
        match docket_scheduler::serve(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "scheduler failed");
                ExitCode::FAILURE
            }
        }
    })
}
