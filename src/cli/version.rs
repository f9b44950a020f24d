use std::process::ExitCode;

use serde::Serialize;

use crate::components::{ComponentVersion, component_versions};
use crate::config::DataDir;

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Serialize)]
struct Versions {
    kdist: &'static str,
    /// The active EKS-D release (`components/current`).
    release: Option<String>,
    components: Vec<ComponentVersion>,
}

pub fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let versions = Versions {
        kdist: env!("CARGO_PKG_VERSION"),
        release: crate::components::Store::new(&data)
            .active()
            .map(|id| id.to_string()),
        components: component_versions(&data),
    };
    match args.output {
        Output::Table => {
            println!("kdist {}", versions.kdist);
            match &versions.release {
                Some(release) => println!("EKS-D release {release}"),
                None => println!("EKS-D release: none active (binaries from PATH)"),
            }
            super::components::print_versions(&versions.components);
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&versions)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&versions)?),
    }
    Ok(ExitCode::SUCCESS)
}
