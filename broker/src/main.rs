//! The `docket-broker` binary: parses configuration, sets up logging, and runs the broker
//! until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use docket_broker::Config;
use tokio_util::sync::CancellationToken;

// The broker allocates for every request, record and message it handles, and mimalloc
// serves those small, short-lived allocations faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Parse first, so that a usage error exits with clap's code 2 before anything starts.
    let config = Config::parse();
    docket_broker::process::init_tracing();
    #[cfg(target_os = "linux")]
    disable_transparent_huge_pages();

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
        match docket_broker::serve(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "broker failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Turns off transparent huge pages for this process, as Redis does. The storage writer
/// allocates and frees page buffers on every commit. With huge pages, the allocator's fresh
/// memory came in 2 MiB pages that the kernel zeroed on first touch, which took about 6%
/// of the writer's time under `docket-bench e2e`.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes one flag of the
    // calling process.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot turn off transparent huge pages"
        );
    }
}
