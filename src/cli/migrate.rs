//! `kdist datastore migrate --to etcd|embedded`: asks the running daemon to move the
//! node's datastore (see `supervisor::migrate`) and prints what was copied and checked.

use std::process::ExitCode;

use super::Output;
use crate::config::{DataDir, DatastoreKind};
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The datastore to move to.
    #[arg(long, value_enum)]
    pub to: DatastoreKind,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: MigrateArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let report = Client::new(&data).migrate(args.to).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&report)?),
        Output::Table => {
            println!(
                "datastore migrated from {} to {} in {:.1} s",
                report.from, report.to, report.seconds
            );
            println!(
                "  keys        {} (SHA-256 {}, same on both sides)",
                report.keys, report.sha256
            );
            println!(
                "  revision    {} on the source, {} on the target; {} of {} keys kept their mod revision",
                report.source_revision,
                report.target_revision,
                report.mod_revisions_kept,
                report.keys
            );
            println!(
                "  leases      {} re-granted with their remaining TTL{}",
                report.leases,
                if report.expired_keys > 0 {
                    format!(
                        "; {} keys of expired leases not copied",
                        report.expired_keys
                    )
                } else {
                    String::new()
                }
            );
            println!(
                "  restarted   {}{}",
                if report.restarted.is_empty() {
                    "nothing".to_string()
                } else {
                    report.restarted.join(", ")
                },
                if report.ready {
                    " (ready)"
                } else {
                    " (not ready yet: see `kdist status`)"
                }
            );
            println!("  old data    {} (kept)", report.old_data);
        }
    }
    Ok(if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
