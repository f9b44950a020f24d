//! Progress of an install on stderr: indicatif bars on a terminal, one plain line per
//! event otherwise (logs, CI, `kdist start` output captured by a service manager).

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bars: Option<MultiProgress>,
    quiet: bool,
}

/// The progress of one file.
pub struct Item {
    bar: Option<ProgressBar>,
    label: String,
    quiet: bool,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        Self {
            bars: std::io::stderr().is_terminal().then(MultiProgress::new),
            quiet: false,
        }
    }

    /// No output at all (embedded extraction, tests of the library).
    pub fn quiet() -> Self {
        Self {
            bars: None,
            quiet: true,
        }
    }

    pub fn line(&self, message: &str) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(message);
            }
            None => eprintln!("{message}"),
        }
    }

    pub fn item(&self, label: &str) -> Item {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new(0));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:28!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            bar
        });
        Item {
            bar,
            label: label.to_string(),
            quiet: self.quiet,
        }
    }
}

impl Item {
    /// The download (re)starts at `offset` of `total` bytes (`None` when unknown).
    pub fn start(&self, offset: u64, total: Option<u64>) {
        match &self.bar {
            Some(bar) => {
                if let Some(total) = total {
                    bar.set_length(total);
                }
                bar.set_position(offset);
            }
            None if !self.quiet => {
                let size = total.map(mib).unwrap_or_else(|| "unknown size".into());
                if offset > 0 {
                    eprintln!("{}: resuming at {} of {size}", self.label, mib(offset));
                } else {
                    eprintln!("{}: downloading {size}", self.label);
                }
            }
            None => {}
        }
    }

    /// A local file of `size` bytes, handled at once (no transfer to show).
    pub fn sized(&self, size: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(size);
            bar.set_position(size);
        }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    pub fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None if !self.quiet => eprintln!("{}: {message}", self.label),
            None => {}
        }
    }

    pub fn done(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None if !self.quiet => eprintln!("{}: {message}", self.label),
            None => {}
        }
    }

    pub fn fail(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.abandon_with_message(format!("FAILED: {message}")),
            None if !self.quiet => eprintln!("{}: FAILED: {message}", self.label),
            None => {}
        }
    }
}

fn mib(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} B"),
        b if b < 1024 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    }
}
