use std::process::ExitCode;

use crate::config::{DataDir, NodeConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds to wait for a running node to stop first.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Also remove the node-local volumes (`storage.dir`) and the data in them.
    #[arg(long)]
    pub volumes: bool,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let code = super::stop::run(
        super::stop::Args {
            timeout: args.timeout,
        },
        data.clone(),
    )
    .await?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let config = NodeConfig::load(&data)?;
    let storage_dir = config.storage.dir(&data);
    let done =
        tokio::task::spawn_blocking(move || crate::node::reset::reset(&data, &config)).await??;
    for line in &done {
        println!("{line}");
    }
    let volumes =
        tokio::task::spawn_blocking(move || reset_volumes(&storage_dir, args.volumes)).await??;
    println!("{volumes}");
    println!("node reset: workloads, container state, CNI and host changes are gone");
    Ok(ExitCode::SUCCESS)
}

/// Removes the volume directories under `storage_dir` when `remove`; says what became
/// of them either way.
fn reset_volumes(storage_dir: &std::path::Path, remove: bool) -> anyhow::Result<String> {
    use crate::controllers::storage::volumes;
    if !storage_dir.exists() {
        return Ok("no node-local volumes".into());
    }
    let storage_dir = volumes::ensure_storage_dir(storage_dir)?;
    let found = volumes::list(&storage_dir)?;
    if !remove {
        return Ok(format!(
            "kept {} node-local volume(s) and their data in {}: `kdist reset --volumes` removes them",
            found.len(),
            storage_dir.display()
        ));
    }
    for (_, path) in &found {
        volumes::remove(&storage_dir, path)?;
    }
    Ok(format!(
        "removed {} node-local volume(s) from {}",
        found.len(),
        storage_dir.display()
    ))
}
