//! The supervisor: runs each service as a child process in its own process group, in
//! dependency order behind readiness probes, restarts it with capped backoff, and stops
//! everything in reverse order. It also serves the control API the CLI talks to.
//!
//! It owns child processes, pidfiles under `run/` and logs under `logs/`. It must not
//! generate certificates, install components or touch the datastore's files: services
//! find those through their args files.

mod api;
mod backoff;
mod child;
mod daemon;
mod error;
mod logs;
mod probe;
mod runner;
mod service;
mod status;

pub use api::Client;
pub use backoff::RestartPolicy;
pub use child::find_marked;
pub use daemon::{Daemon, bind_control_socket};
pub use error::SupervisorError;
pub use runner::log_tail;
pub use service::{Origin, Probe, known_services, resolve_binary};
pub use status::{HostFact, ServiceState, ServiceStatus, StatusReport};
