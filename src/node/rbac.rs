//! The RBAC objects the components need beyond Kubernetes' bootstrap policy, applied
//! idempotently (`kubectl apply`) once the apiserver is ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cmd;
use super::error::NodeError;
use crate::config::{DataDir, NodeConfig, Role};
use crate::supervisor::resolve_binary;

/// apiserver -> kubelet API (logs, exec, port-forward, metrics) for the identity of
/// `apiserver-kubelet-client.crt` (CN kube-apiserver-kubelet-client, kubeadm's name),
/// cluster-admin for kubeadm's admin group, should the admin cert use it rather
/// than system:masters, and kubeadm's `node-autoapprove-certificate-rotation`: the
/// controller-manager approves a node's CSR for its own client certificate (how a
/// worker's kubelet renews it).
pub const MANIFEST: &str = "\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kdist:apiserver-kubelet-client
  labels:
    app.kubernetes.io/managed-by: kdist
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:kubelet-api-admin
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: kube-apiserver-kubelet-client
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kdist:cluster-admins
  labels:
    app.kubernetes.io/managed-by: kdist
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: cluster-admin
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: kubeadm:cluster-admins
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kdist:node-autoapprove-certificate-rotation
  labels:
    app.kubernetes.io/managed-by: kdist
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:certificates.k8s.io:certificatesigningrequests:selfnodeclient
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: system:nodes
";

/// kubectl: the components' first, then PATH.
pub fn kubectl(data: &DataDir) -> Result<PathBuf, NodeError> {
    resolve_binary(data, "kubectl")
        .map(|(path, _)| path)
        .map_err(|_| NodeError::NotFound {
            program: "kubectl".into(),
            searched: data.components_dir().join("current").join("bin"),
            hint: "run `kdist components install`".into(),
        })
}

pub fn admin_kubeconfig(data: &DataDir) -> PathBuf {
    data.kubeconfig_dir().join("admin.conf")
}

/// Applies [`MANIFEST`], retrying for a short while (the bootstrap roles may lag the
/// apiserver's readiness by a moment). Blocking.
pub fn apply(data: &DataDir) -> Result<(), NodeError> {
    let kubectl = kubectl(data)?;
    let kubeconfig = admin_kubeconfig(data).display().to_string();
    let args = ["--kubeconfig", &kubeconfig, "apply", "-f", "-"];
    let mut last = None;
    for _ in 0..10 {
        match cmd::run_with_input(&kubectl, &args, Some(MANIFEST.as_bytes())) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Err(last.unwrap_or_else(|| NodeError::Api("kubectl apply did not run".into())))
}

/// The kubeconfig that can read this node's own Node object: the admin's on a control
/// plane; on a worker, which holds no admin credentials, its kubelet's (the Node
/// authorizer lets a node read itself).
pub fn node_kubeconfig(data: &DataDir, config: &NodeConfig) -> PathBuf {
    if config.role == Role::Worker {
        data.kubeconfig_dir().join("kubelet.conf")
    } else {
        admin_kubeconfig(data)
    }
}

/// Whether node `name` reports Ready (false while the API or the node object is not
/// there yet), asked with `kubeconfig`. Blocking.
pub fn node_ready(data: &DataDir, kubeconfig: &Path, name: &str) -> Result<bool, NodeError> {
    let kubectl = kubectl(data)?;
    let kubeconfig = kubeconfig.display().to_string();
    let out = cmd::run(
        &kubectl,
        &[
            "--kubeconfig",
            &kubeconfig,
            "get",
            "node",
            name,
            "--request-timeout=5s",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    );
    Ok(out.is_ok_and(|status| status.trim() == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_three_bindings() {
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(MANIFEST)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["roleRef"]["name"], "system:kubelet-api-admin");
        assert_eq!(
            docs[0]["subjects"][0]["name"],
            "kube-apiserver-kubelet-client"
        );
        assert_eq!(
            docs[2]["roleRef"]["name"],
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"
        );
        assert_eq!(docs[2]["subjects"][0]["name"], "system:nodes");
    }
}
