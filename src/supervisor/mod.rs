//! The supervisor: runs each service as a child process in its own process group, in
//! dependency order behind readiness probes, restarts it with capped backoff, and stops
//! everything in reverse order. It also serves the control API the CLI talks to.
//!
//! It owns child processes, pidfiles under `run/` and logs under `logs/`. It must not
//! generate certificates itself (it asks `pki` at start and every
//! `certs.check_interval`, then restarts what reads the renewed files), install
//! components or touch the datastore's files: services find those through their args
//! files.

mod api;
mod backoff;
mod builtin;
mod child;
mod daemon;
mod error;
mod fleet;
mod logs;
pub mod migrate;
mod pageout;
mod probe;
mod runner;
mod service;
mod status;

pub use api::Client;
pub use backoff::{Backoff, RestartPolicy};
pub use builtin::{Builtin, BuiltinError, BuiltinFuture, Builtins};
pub use child::{SERVICE_ENV, find_marked};
pub use daemon::{Daemon, bind_control_socket, stop_leftovers};
pub use error::SupervisorError;
pub use runner::log_tail;
pub use service::{HostInputs, Probe, ServiceSpec, plan, read_args, write_default_args};

pub use status::{Board, HostFact, ReportSections, ServiceState, ServiceStatus, StatusReport};
