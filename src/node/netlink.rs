//! Network links through rtnetlink, the kernel's own interface (no `ip` subprocess).
//! Blocking wrappers run the request on a current-thread runtime of their own: their
//! callers (reset) are sync and already run off the async workers.

use futures::TryStreamExt;

use super::error::NodeError;

/// errno of a link that does not exist.
const ENODEV: i32 = nix::libc::ENODEV;

fn failed(link: &str) -> impl Fn(rtnetlink::Error) -> NodeError + '_ {
    move |source| NodeError::Netlink {
        link: link.to_string(),
        source,
    }
}

/// Deletes link `name` in this thread's network namespace; false when there is none.
pub async fn delete_link(name: &str) -> Result<bool, NodeError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NodeError::NetlinkSocket { source })?;
    let task = tokio::spawn(connection);
    let result = async {
        let found = handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        let link = match found {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(false),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => {
                return Ok(false);
            }
            Err(e) => return Err(failed(name)(e)),
        };
        handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(failed(name))?;
        Ok(true)
    }
    .await;
    task.abort();
    result
}

/// [`delete_link`] for sync callers (not on an async worker).
pub fn delete_link_blocking(name: &str) -> Result<bool, NodeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NodeError::NetlinkSocket { source })?;
    runtime.block_on(delete_link(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own in a fresh network namespace, gone when the
    /// thread ends: nothing the test does reaches the host's links.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn ip(args: &[&str]) -> std::process::Output {
        // the child inherits the calling thread's network namespace
        std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap()
    }

    #[test]
    fn a_bridge_and_a_veth_pair_are_deleted_and_absent_is_fine() {
        in_new_netns(|| {
            // a bridge, as `kdist reset` deletes the CNI bridge
            assert!(
                ip(&["link", "add", "kdist-t0", "type", "bridge"])
                    .status
                    .success()
            );
            assert!(
                ip(&[
                    "link", "add", "kdist-va", "type", "veth", "peer", "name", "kdist-vb"
                ])
                .status
                .success()
            );
            assert!(ip(&["link", "show", "kdist-t0"]).status.success());
            assert!(delete_link_blocking("kdist-t0").unwrap());
            assert!(!ip(&["link", "show", "kdist-t0"]).status.success());
            assert!(!delete_link_blocking("kdist-t0").unwrap(), "already gone");
            // deleting one end of a veth pair removes both
            assert!(delete_link_blocking("kdist-va").unwrap());
            assert!(!ip(&["link", "show", "kdist-vb"]).status.success());
            assert!(!delete_link_blocking("no-such-link").unwrap());
        });
    }
}
