//! Start at boot: the systemd unit or OpenRC script that runs `kdist daemon` for one
//! data dir, which init system the host runs, and `enable --now` / `disable --now`
//! through that init system's own tools.
//!
//! It owns `/etc/systemd/system/kdist.service` and `/etc/init.d/kdist` (below a root
//! directory, `/` except in tests) and nothing else: the snap keeps its own daemon
//! definition (snap/snapcraft.yaml), and the daemon itself is unaware of how it was started.

mod error;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

pub use error::ServiceError;

use crate::fsutil;

/// The unit's name in both init systems.
pub const NAME: &str = "kdist";

/// Stop time left to the daemon beyond its children's grace periods (its own shutdown,
/// a child that needed SIGKILL).
const STOP_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitSystem {
    Systemd,
    Openrc,
}

impl fmt::Display for InitSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Systemd => "systemd",
            Self::Openrc => "OpenRC",
        })
    }
}

impl InitSystem {
    /// Which init system runs on the host under `root`: systemd when
    /// `/run/systemd/system` exists (what sd_booted() checks), OpenRC when `/run/openrc`
    /// exists or the `openrc` program is installed.
    pub fn detect(root: &Path) -> Option<Self> {
        if root.join("run/systemd/system").is_dir() {
            return Some(Self::Systemd);
        }
        let openrc_bin = ["sbin", "usr/sbin", "bin", "usr/bin"]
            .iter()
            .any(|dir| root.join(dir).join("openrc").is_file());
        if root.join("run/openrc").is_dir() || openrc_bin {
            return Some(Self::Openrc);
        }
        None
    }

    /// Where the unit file lives below `root`.
    pub fn unit_path(self, root: &Path) -> PathBuf {
        match self {
            Self::Systemd => root
                .join("etc/systemd/system")
                .join(format!("{NAME}.service")),
            Self::Openrc => root.join("etc/init.d").join(NAME),
        }
    }

    /// Links that mean "started at boot".
    fn enabled_links(self, root: &Path) -> Vec<PathBuf> {
        match self {
            Self::Systemd => vec![
                root.join("etc/systemd/system/multi-user.target.wants")
                    .join(format!("{NAME}.service")),
            ],
            Self::Openrc => ["default", "boot", "sysinit"]
                .iter()
                .map(|level| root.join("etc/runlevels").join(level).join(NAME))
                .collect(),
        }
    }

    fn mode(self) -> u32 {
        match self {
            Self::Systemd => 0o644,
            Self::Openrc => 0o755,
        }
    }

    pub fn render(self, spec: &UnitSpec) -> String {
        match self {
            Self::Systemd => systemd_unit(spec),
            Self::Openrc => openrc_script(spec),
        }
    }

    /// The commands that enable the unit, and start it when `now` (`enable --now`).
    pub fn enable_commands(self, now: bool) -> Vec<Vec<&'static str>> {
        match self {
            Self::Systemd => vec![
                vec!["systemctl", "daemon-reload"],
                if now {
                    vec!["systemctl", "enable", "--now", NAME]
                } else {
                    vec!["systemctl", "enable", NAME]
                },
            ],
            Self::Openrc => {
                let mut commands = vec![vec!["rc-update", "add", NAME, "default"]];
                if now {
                    commands.push(vec!["rc-service", NAME, "start"]);
                }
                commands
            }
        }
    }

    /// The commands that stop the unit and take it out of the boot sequence.
    pub fn disable_commands(self) -> Vec<Vec<&'static str>> {
        match self {
            Self::Systemd => vec![vec!["systemctl", "disable", "--now", NAME]],
            Self::Openrc => vec![
                vec!["rc-service", NAME, "stop"],
                vec!["rc-update", "del", NAME, "default"],
            ],
        }
    }

    /// Commands to run after the unit file is gone.
    fn after_remove_commands(self) -> Vec<Vec<&'static str>> {
        match self {
            Self::Systemd => vec![vec!["systemctl", "daemon-reload"]],
            Self::Openrc => Vec::new(),
        }
    }
}

/// What the unit runs.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    /// The kdist executable.
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    /// `kdist daemon --config FILE`: installed as config.yaml at every start.
    pub config: Option<PathBuf>,
    /// The sum of the services' stop grace periods: the daemon stops them one by one.
    pub children_grace: Duration,
}

impl UnitSpec {
    /// Refuses paths whose characters would need quoting rules that differ between
    /// systemd and sh (or could change the command).
    pub fn check(&self) -> Result<(), ServiceError> {
        let mut paths = vec![
            ("the kdist executable", &self.exe),
            ("--data-dir", &self.data_dir),
        ];
        if let Some(config) = &self.config {
            paths.push(("--config", config));
        }
        for (what, path) in paths {
            let text = path.to_string_lossy();
            if text
                .chars()
                .any(|c| c.is_control() || "'\"\\$%`".contains(c))
            {
                return Err(ServiceError::UnsafePath {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Seconds the init system waits for the daemon to stop before it kills what is left.
    pub fn stop_timeout_secs(&self) -> u64 {
        (self.children_grace + STOP_MARGIN).as_secs()
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "daemon".to_string(),
        ];
        if let Some(config) = &self.config {
            args.push("--config".to_string());
            args.push(config.display().to_string());
        }
        args
    }
}

fn systemd_word(word: &str) -> String {
    if word.contains(char::is_whitespace) {
        format!("\"{word}\"")
    } else {
        word.to_string()
    }
}

fn systemd_unit(spec: &UnitSpec) -> String {
    let exec = std::iter::once(spec.exe.display().to_string())
        .chain(spec.args())
        .map(|w| systemd_word(&w))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Written by `kdist service install`; `kdist service uninstall` removes it.
[Unit]
Description=kdist: local Kubernetes from Amazon EKS Distro
After=network-online.target
Wants=network-online.target

[Service]
# the daemon says READY=1 once every service is ready
Type=notify
NotifyAccess=main
ExecStart={exec}
# a first start may wait for images and certificates; a service that never becomes
# ready shows in `kdist status` rather than as a unit killed at start
TimeoutStartSec=infinity
# stop: SIGTERM to the daemon alone, which stops its children in reverse start order,
# each with its grace period; whatever is left after TimeoutStopSec is killed
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop}
Restart=always
RestartSec=5s
# kubelet and containerd manage cgroups below the unit's
Delegate=yes
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity

[Install]
WantedBy=multi-user.target
",
        stop = spec.stop_timeout_secs()
    )
}

fn openrc_script(spec: &UnitSpec) -> String {
    let args: Vec<String> = spec.args().iter().map(|a| format!("'{a}'")).collect();
    format!(
        "#!/sbin/openrc-run
# Written by `kdist service install`; `kdist service uninstall` removes it.

description=\"kdist: local Kubernetes from Amazon EKS Distro\"
supervisor=supervise-daemon
command='{exe}'
command_args=\"{args}\"
respawn_delay=5
respawn_max=0
output_log=\"/var/log/{NAME}.log\"
error_log=\"/var/log/{NAME}.log\"
rc_ulimit=\"-n 1048576 -u unlimited -c unlimited\"
# stop: SIGTERM to the daemon, which stops its children in reverse start order, each
# with its grace period; SIGKILL when it is not done after {stop} seconds
retry=\"TERM/{stop}/KILL/5\"

depend() {{
\tneed net
\tafter firewall
}}
",
        exe = spec.exe.display(),
        args = args.join(" "),
        stop = spec.stop_timeout_secs()
    )
}

/// Writes the unit file for `init` below `root`; returns its path.
pub fn write_unit(root: &Path, init: InitSystem, spec: &UnitSpec) -> Result<PathBuf, ServiceError> {
    spec.check()?;
    let path = init.unit_path(root);
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, 0o755).map_err(ServiceError::io(dir))?;
    }
    fsutil::atomic_write(&path, init.render(spec).as_bytes(), init.mode())
        .map_err(ServiceError::io(&path))?;
    Ok(path)
}

/// Removes the unit file; false when there was none.
pub fn remove_unit(root: &Path, init: InitSystem) -> Result<bool, ServiceError> {
    let path = init.unit_path(root);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ServiceError::Io { path, source }),
    }
}

/// Runs each command in turn (the init system's own tools), stopping at the first failure.
pub fn run_commands(commands: &[Vec<&str>]) -> Result<(), ServiceError> {
    for argv in commands {
        let command = argv.join(" ");
        let (program, args) = argv.split_first().ok_or_else(|| ServiceError::Command {
            command: command.clone(),
            status: "empty command".into(),
        })?;
        let status = Command::new(program)
            .args(args)
            .status()
            .map_err(|source| ServiceError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !status.success() {
            return Err(ServiceError::Command {
                command,
                status: status.to_string(),
            });
        }
    }
    Ok(())
}

pub fn after_remove_commands(init: InitSystem) -> Vec<Vec<&'static str>> {
    init.after_remove_commands()
}

/// What `kdist service status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The init system the unit was found for (or would be written for).
    pub init: Option<InitSystem>,
    /// Whether that init system runs on this host.
    pub init_running: bool,
    pub unit: Option<PathBuf>,
    pub installed: bool,
    pub enabled: bool,
    /// From the init system when it runs; `None` when it cannot be asked.
    pub active: Option<bool>,
}

/// Looks at the files below `root`; asks the init system whether the unit is active
/// only when `ask` (the real root with its init system running).
pub fn status(root: &Path, forced: Option<InitSystem>, ask: bool) -> Status {
    let detected = InitSystem::detect(root);
    let init = forced.or(detected).or_else(|| {
        [InitSystem::Systemd, InitSystem::Openrc]
            .into_iter()
            .find(|i| i.unit_path(root).is_file())
    });
    let Some(init) = init else {
        return Status {
            init: None,
            init_running: false,
            unit: None,
            installed: false,
            enabled: false,
            active: None,
        };
    };
    let unit = init.unit_path(root);
    let installed = unit.is_file();
    let enabled = installed && init.enabled_links(root).iter().any(|l| l.exists());
    let init_running = detected == Some(init);
    let active = (ask && init_running).then(|| {
        let (program, args): (&str, &[&str]) = match init {
            InitSystem::Systemd => ("systemctl", &["is-active", "--quiet", NAME]),
            InitSystem::Openrc => ("rc-service", &[NAME, "status"]),
        };
        Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    Status {
        init: Some(init),
        init_running,
        unit: Some(unit),
        installed,
        enabled,
        active,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UnitSpec {
        UnitSpec {
            exe: PathBuf::from("/usr/local/bin/kdist"),
            data_dir: PathBuf::from("/var/lib/my kdist"),
            config: Some(PathBuf::from("/etc/kdist/config.yaml")),
            children_grace: Duration::from_secs(95),
        }
    }

    #[test]
    fn systemd_unit_runs_the_daemon_and_stops_it_gracefully() {
        let unit = systemd_unit(&spec());
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/kdist --data-dir \"/var/lib/my kdist\" daemon --config /etc/kdist/config.yaml\n"
        ), "{unit}");
        for line in [
            "Type=notify",
            "KillMode=mixed",
            "TimeoutStopSec=125",
            "Delegate=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in {unit}");
        }
    }

    #[test]
    fn openrc_script_quotes_every_argument() {
        let script = openrc_script(&spec());
        assert!(script.contains(
            "command_args=\"'--data-dir' '/var/lib/my kdist' 'daemon' '--config' '/etc/kdist/config.yaml'\""
        ), "{script}");
        assert!(script.contains("retry=\"TERM/125/KILL/5\""), "{script}");
    }

    #[test]
    fn paths_that_need_escaping_are_refused() {
        let mut s = spec();
        s.data_dir = PathBuf::from("/var/lib/$HOME");
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("--data-dir `/var/lib/$HOME`"), "{err}");
    }

    #[test]
    fn detection_follows_the_run_directories() {
        let root = std::env::temp_dir().join(format!("kdist-init-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(InitSystem::detect(&root), None);
        std::fs::create_dir_all(root.join("run/openrc")).unwrap();
        assert_eq!(InitSystem::detect(&root), Some(InitSystem::Openrc));
        std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
        assert_eq!(InitSystem::detect(&root), Some(InitSystem::Systemd));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
