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
    components: Vec<ComponentVersion>,
}

pub fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let versions = Versions {
        kdist: env!("CARGO_PKG_VERSION"),
        components: component_versions(&data),
    };
    match args.output {
        Output::Table => {
            println!("kdist {}", versions.kdist);
            super::components::print_versions(&versions.components);
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&versions)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&versions)?),
    }
    Ok(ExitCode::SUCCESS)
}
