use std::io::{Read, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::DataDir;
use crate::supervisor::log_tail;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service (`kdist` for the daemon's own log).
    pub service: String,
    /// Keep printing new lines as they are written.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: usize,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let path = data.log_file(&args.service);
    if !path.exists() {
        anyhow::bail!(
            "no log for `{}` at {}; names are those shown by `kdist status`, or `kdist`",
            args.service,
            path.display()
        );
    }
    let mut out = std::io::stdout().lock();
    for line in log_tail(&path, args.lines) {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut buf = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let len = std::fs::metadata(&path)?.len();
        if len < pos {
            // rotated (copy-truncate): start again from the top
            pos = 0;
        }
        file.seek(SeekFrom::Start(pos))?;
        buf.clear();
        file.read_to_end(&mut buf)?;
        pos += buf.len() as u64;
        out.write_all(&buf)?;
        out.flush()?;
    }
}
