use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{DataDir, Endpoint, NodeConfig, Scheme};
use crate::node::{images, registries};

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
    /// Copy the active release's images (and the pause image) from this node into a
    /// registry, under EKS-D's repository names, so other nodes can use it as
    /// `registries.eks_mirror`.
    PushRelease {
        /// `[http://]HOST[:PORT][/PREFIX]`: `public.ecr.aws/eks-distro/x:t` goes to
        /// `HOST:PORT/PREFIX/eks-distro/x:t`. Credentials and TLS come from
        /// `registries.configs."HOST:PORT"` in config.yaml.
        #[arg(long, value_name = "REGISTRY")]
        to: String,
        /// Take the image list from this release manifest instead of the active one.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
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
            check_containerd(&data)?;
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
        Sub::PushRelease { to, manifest } => push_release(data, &to, manifest).await,
    }
}

fn check_containerd(data: &DataDir) -> anyhow::Result<()> {
    let socket = data.containerd_socket();
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        anyhow::bail!(
            "containerd does not answer on {}; run `kdist start` first",
            socket.display()
        );
    }
    Ok(())
}

async fn push_release(
    data: DataDir,
    to: &str,
    manifest: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let to = Endpoint::parse(to, Some(Scheme::Https)).map_err(|reason| {
        anyhow::anyhow!(
            "--to {reason}; write [http://]HOST[:PORT][/PREFIX], e.g. registry.example:5000/eks"
        )
    })?;
    let config = NodeConfig::load(&data)?;
    let manifest = match manifest {
        Some(path) => path,
        None => {
            let store = crate::components::Store::new(&data);
            let id = store.active().context(
                "no active release on this node: install one (`kdist components install`) or \
                 give its manifest with --manifest",
            )?;
            store.release_dir(&id).join("manifest.yaml")
        }
    };
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "reading the release manifest {}; install a release (`kdist components install`) \
             or give one with --manifest",
            manifest.display()
        )
    })?;
    let mut images = vec![config.runtime.sandbox_image.clone()];
    for image in registries::release_images(&text, &manifest)? {
        if !images.contains(&image) {
            images.push(image);
        }
    }
    check_containerd(&data)?;
    let host = config
        .registries
        .configs
        .get(&to.host)
        .cloned()
        .unwrap_or_default();
    let results =
        tokio::task::spawn_blocking(move || registries::push_release(&data, &images, &to, &host))
            .await??;
    let mut missing = 0;
    for (image, pushed) in &results {
        match pushed {
            registries::Pushed::To(target) => println!("pushed {image} as {target}"),
            registries::Pushed::Missing => {
                missing += 1;
                println!(
                    "skipped {image}: not on this node (pull it, or `kdist images import` it)"
                );
            }
        }
    }
    if missing == results.len() {
        anyhow::bail!("none of the release's images is on this node: nothing was pushed");
    }
    Ok(ExitCode::SUCCESS)
}
