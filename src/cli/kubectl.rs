use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use crate::config::DataDir;
use crate::node::rbac;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments for kubectl, e.g. `get nodes`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let kubectl = rbac::kubectl(&data)?;
    let kubeconfig = rbac::admin_kubeconfig(&data);
    if !kubeconfig.exists() {
        anyhow::bail!(
            "no admin kubeconfig at {}; run `kdist start` first",
            kubeconfig.display()
        );
    }
    // exec: kubectl gets the terminal and its exit status is ours
    let err = std::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(&args.args)
        .exec();
    anyhow::bail!("cannot run {}: {err}", kubectl.display())
}
