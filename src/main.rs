use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Headroom glibc's malloc keeps at the top of a heap when it grows or trims one.
const MALLOC_TOP_PAD: i32 = 8 << 20;

fn main() -> ExitCode {
    // glibc gives a heap's free top back to the kernel as soon as it passes 128 KiB and
    // takes it again at the next burst: under the datastore's write load that was a
    // syscall and page faults per batch (mprotect, sysmalloc in profiles). With 8 MiB of
    // headroom the embedded datastore does about a tenth more puts/s, and an idle
    // daemon's RSS is unchanged (headroom is only reserved, not touched). mimalloc did a
    // little better on puts but kept twice the memory after load.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets a parameter; called first thing in main, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, MALLOC_TOP_PAD);
    }
    let cli = kdist::cli::Cli::parse();
    quiet_on_closed_stdout();
    let filter = log_filter(&cli.log_level);
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

/// `kdist status | head`: once the reader of stdout is gone, printing on the main thread
/// (`println!`, clap's completion writer) panics on EPIPE; end quietly with the shell's
/// broken-pipe status instead. SIGPIPE itself stays ignored (Rust's default), so a peer
/// that closes a socket is an error to report, never a silent death, and the daemon's
/// own threads are never ended this way.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload_as_str().unwrap_or_default();
        let main = std::thread::current().name() == Some("main");
        if main && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// The log filter of `--log-level`. kube-rs logs every failed request at ERROR without
/// saying what it was for; the controllers report the same error with its context (and
/// retry), so while the apiserver restarts (certificate renewal, upgrade) the log would
/// fill with alarms: those are off unless the level names kube_client itself.
fn log_filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if !level.contains("kube_client")
        && let Ok(directive) = "kube_client::client::builder=off".parse()
    {
        filter = filter.add_directive(directive);
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn kube_rs_request_errors_are_off_unless_asked_for() {
        assert!(
            log_filter("info")
                .to_string()
                .contains("kube_client::client::builder=off")
        );
        let asked = log_filter("info,kube_client=debug").to_string();
        assert!(!asked.contains("=off"), "{asked}");
        assert!(asked.contains("kube_client=debug"), "{asked}");
    }
}
