use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::DataDir;
use crate::node::images;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Import an OCI or `docker save` archive into containerd's k8s.io namespace.
    Import {
        /// The archive (tar). Copy archives to <data>/images/ to import them at start.
        file: PathBuf,
    },
    /// List the images the node's containerd holds (name and size).
    List,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let socket = data.containerd_socket();
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        anyhow::bail!(
            "containerd does not answer on {}; run `kdist start` first",
            socket.display()
        );
    }
    match args.command {
        Sub::List => {
            let listed = tokio::task::spawn_blocking(move || images::list(&data)).await??;
            println!("{:<80} SIZE", "IMAGE");
            for (name, size) in listed {
                println!("{name:<80} {size}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Sub::Import { file } => {
            let file = std::path::absolute(&file).context("resolving the archive path")?;
            let names = tokio::task::spawn_blocking(move || images::import(&data, &file)).await??;
            for name in &names {
                println!("imported {name}");
            }
            if names.is_empty() {
                println!("the archive held no named image");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
