//! Services that run inside the daemon (the embedded datastore) instead of as children.
//! The composition root (`crate::daemon`) adapts a subsystem to [`Builtin`]; the
//! subsystem itself knows nothing of the supervisor.
//! They are supervised like children: started after their dependencies, probed, restarted
//! with backoff when they return, stopped by cancelling their token.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Why a builtin service stopped: the subsystem's own error, shown with its causes.
pub type BuiltinError = Box<dyn std::error::Error + Send + Sync>;

/// What a builtin service's run returns.
pub type BuiltinFuture = Pin<Box<dyn Future<Output = Result<(), BuiltinError>> + Send>>;

/// A service the daemon runs as a task. `run` must return when `shutdown` is cancelled;
/// returning on its own counts as an exit and is restarted with backoff.
pub trait Builtin: Send + Sync + 'static {
    fn run(&self, shutdown: CancellationToken) -> BuiltinFuture;
}

/// The builtins available to this daemon, by service name.
pub type Builtins = BTreeMap<String, Arc<dyn Builtin>>;
