//! The RBAC objects the components need beyond Kubernetes' bootstrap policy (and the
//! node-local volume provisioner on workers, which acts as its node), applied by the
//! `rbac` controller every time the apiserver becomes ready.

use std::path::{Path, PathBuf};

use super::cmd;
use super::error::NodeError;
use crate::components::resolve_binary;
use crate::config::{DataDir, NodeConfig, Role};

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
kind: ClusterRole
metadata:
  name: kdist:local-volumes
  labels:
    app.kubernetes.io/managed-by: kdist
rules:
- apiGroups: [\"\"]
  resources: [persistentvolumes]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [\"\"]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch]
- apiGroups: [\"\"]
  resources: [persistentvolumeclaims/status]
  verbs: [patch, update]
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get, list, watch]
- apiGroups: [\"\", events.k8s.io]
  resources: [events]
  verbs: [create, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kdist:local-volumes
  labels:
    app.kubernetes.io/managed-by: kdist
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: kdist:local-volumes
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: system:nodes
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
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: kdist:addons-reader
  namespace: kube-system
  labels:
    app.kubernetes.io/managed-by: kdist
rules:
- apiGroups: [\"\"]
  resources: [configmaps]
  resourceNames: [kdist-addons]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: kdist:addons-reader
  namespace: kube-system
  labels:
    app.kubernetes.io/managed-by: kdist
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: kdist:addons-reader
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
    fn manifest_has_the_bindings() {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(MANIFEST).unwrap();
        assert_eq!(docs.len(), 7);
        assert_eq!(
            docs[4]["roleRef"]["name"],
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"
        );
        assert_eq!(docs[0]["roleRef"]["name"], "system:kubelet-api-admin");
        assert_eq!(
            docs[0]["subjects"][0]["name"],
            "kube-apiserver-kubelet-client"
        );
        assert_eq!(docs[4]["subjects"][0]["name"], "system:nodes");
        assert_eq!(docs[3]["roleRef"]["name"], "kdist:local-volumes");
    }
}
