use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = kdist::cli::Cli::parse();
    if !cli.serves() {
        die_quietly_on_closed_stdout();
    }
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // a supervisor needs little parallelism; fewer threads keep its RSS small
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kdist: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kdist::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kdist: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Commands that print (`status`, `logs`, `kubectl` ...) end quietly when their reader goes
/// away, as `kdist status | head` expects, instead of panicking in `println!` on EPIPE.
/// Serving commands keep Rust's default of ignoring SIGPIPE: a client that hangs up must
/// never kill the daemon.
#[allow(unsafe_code)]
fn die_quietly_on_closed_stdout() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first thing in main, before the runtime or any other thread exists,
    // and SIG_DFL installs no Rust code as a handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
