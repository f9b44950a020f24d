//! kdist: a single-binary, snap-like distribution of Amazon EKS Distro.
//!
//! Process tree of one node: `kdist daemon` (tokio) owns every service as a child process
//! in its own process group, started in dependency order behind readiness probes:
//! the datastore (embedded etcd-v3-over-SQLite on `run/datastore.sock` and optional mTLS
//! TCP addresses, or an etcd child), containerd,
//! kube-apiserver (:6443), kube-controller-manager (:10257), kube-scheduler (:10259),
//! kubelet (:10250) and kube-proxy; the cluster agent serves joins on :25000.
//!
//! Everything lives under one data directory (default `/var/lib/kdist`): `config.yaml`,
//! `args/<service>` (editable flags), `certs/`, `kubeconfig/`, `datastore/`,
//! `components/<release>/`, `logs/`, `run/` (control socket `kdist.sock`, pidfiles) and
//! `cluster/`. See [`config::DataDir`].
//!
//! Trust: kdist's own CAs (cluster, front-proxy, etcd) sign every serving and client
//! certificate (`pki`, kubeadm's file names under `certs/`, kubeconfigs under
//! `kubeconfig/`); the daemon renews leaves before they expire and restarts their
//! readers one at a time; etcd runs with client and peer mTLS; joiners pin the cluster
//! CA by its SHA-256 fingerprint.
//!
//! The CLI (`cli`) talks to the daemon over the control socket. `daemon` is the
//! composition root: it builds the supervisor (the only owner of child processes, with
//! the embedded datastore as an in-process builtin) and the controllers layer
//! (`controllers`: in-process kube-rs controllers on one client, run once kube-apiserver
//! is ready, restarted with backoff, shown in `kdist status`: RBAC, the cluster agent, the
//! node-local volume provisioner). `node` generates what the node's services read
//! (containerd, CNI, kubelet and kube-proxy configs) and prepares the host (sysctls, mount
//! propagation, egress guard), recording every change so `kdist reset` can undo it.
//! `cluster` hands out hashed join tokens (`kdist add-node`), runs the cluster agent in
//! the daemon (HTTPS :25000, once the node has tokens or is clustered) that signs
//! workers' CSRs and adds control planes to etcd as learners, and joins (`kdist join`),
//! removes (`kdist remove-node`) and leaves.

pub mod cli;
pub mod cluster;
pub mod components;
pub mod config;
pub mod controllers;
pub mod daemon;
pub mod datastore;
pub mod fsutil;
pub mod node;
pub mod pki;
pub mod report;
pub mod supervisor;
pub mod yaml;
