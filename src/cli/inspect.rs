use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::DataDir;
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the tarball (default: ./kdist-inspect-<time>.tar.gz).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let status = match Client::new(&data).status().await {
        Ok(report) => serde_json::to_string_pretty(&report)?,
        Err(e) => serde_json::to_string_pretty(&serde_json::json!({ "error": e.to_string() }))?,
    };
    // the PKI's own check, from this same binary
    let certs_check = match std::env::current_exe() {
        Ok(exe) => match std::process::Command::new(exe)
            .arg("--data-dir")
            .arg(data.root())
            .args(["certs", "check"])
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run `kdist certs check`: {e}"),
        },
        Err(e) => format!("cannot run `kdist certs check`: {e}"),
    };
    let out = args.output.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("kdist-inspect-{stamp}.tar.gz"))
    });
    let written = tokio::task::spawn_blocking(move || {
        crate::node::inspect::write(&data, &out, &status, &certs_check)
    })
    .await??;
    println!("wrote {}", written.display());
    Ok(ExitCode::SUCCESS)
}
