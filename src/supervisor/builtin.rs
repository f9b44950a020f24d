//! Services that run inside the daemon (the embedded datastore) instead of as children.
//! They are supervised like children: started after their dependencies, probed, restarted
//! with backoff when they return, stopped by cancelling their token.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// What a builtin service's run returns: `Err` carries why it stopped.
pub type BuiltinFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A service the daemon runs as a task. `run` must return when `shutdown` is cancelled;
/// returning on its own counts as an exit and is restarted with backoff.
pub trait Builtin: Send + Sync + 'static {
    fn run(&self, shutdown: CancellationToken) -> BuiltinFuture;
}

/// The builtins available to this daemon, by service name.
pub type Builtins = BTreeMap<String, Arc<dyn Builtin>>;
