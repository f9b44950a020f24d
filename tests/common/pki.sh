#!/bin/bash
# Test-only stand-in for kdist's PKI: kubeadm-named certificates and kubeconfigs made
# with openssl, for running the node tests before `kdist certs` exists in this tree.
# usage: pki.sh <data-dir> <node-name> <node-ip>
set -euo pipefail
DATA=$1 NODE=$2 IP=$3
C=$DATA/certs K=$DATA/kubeconfig
mkdir -p "$C/etcd" "$K"; chmod 700 "$C" "$K"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
ca() { key "$C/$1.key"; openssl req -x509 -new -key "$C/$1.key" -subj "/CN=$2" -days 2 -out "$C/$1.crt" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature 2>/dev/null; }
# leaf <ca> <name> <subject> <extendedKeyUsage> [subjectAltName]
leaf() {
  key "$C/$2.key"
  local ext; ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$4" > "$ext"
  [ -n "${5:-}" ] && echo "subjectAltName=$5" >> "$ext"
  openssl req -new -key "$C/$2.key" -subj "$3" -out "$C/$2.csr" 2>/dev/null
  openssl x509 -req -in "$C/$2.csr" -CA "$C/$1.crt" -CAkey "$C/$1.key" -CAcreateserial -days 2 \
    -extfile "$ext" -out "$C/$2.crt" 2>/dev/null
  rm -f "$C/$2.csr" "$ext"
}
ca ca kubernetes; ca front-proxy-ca front-proxy-ca; ca etcd/ca etcd-ca
key "$C/sa.key"; openssl pkey -in "$C/sa.key" -pubout -out "$C/sa.pub" 2>/dev/null
leaf ca apiserver /CN=kube-apiserver serverAuth \
  "IP:127.0.0.1,IP:$IP,IP:10.152.183.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:$NODE"
leaf ca apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
leaf etcd/ca apiserver-etcd-client /CN=kube-apiserver-etcd-client clientAuth
leaf front-proxy-ca front-proxy-client /CN=front-proxy-client clientAuth
leaf etcd/ca etcd/server "/CN=$NODE" serverAuth,clientAuth "IP:127.0.0.1,DNS:localhost,DNS:$NODE"
leaf etcd/ca etcd/peer "/CN=$NODE" serverAuth,clientAuth "IP:127.0.0.1,DNS:localhost,DNS:$NODE"
leaf etcd/ca etcd/healthcheck-client /CN=kube-etcd-healthcheck-client clientAuth
leaf ca kubelet "/CN=$NODE" serverAuth "IP:$IP,IP:127.0.0.1,DNS:$NODE"
leaf ca kubelet-client "/O=system:nodes/CN=system:node:$NODE" clientAuth
leaf ca controller-manager /CN=system:kube-controller-manager clientAuth
leaf ca scheduler /CN=system:kube-scheduler clientAuth
leaf ca kube-proxy /CN=system:kube-proxy clientAuth
leaf ca admin "/O=system:masters/CN=kubernetes-admin" clientAuth
rm -f "$C"/*.srl "$C"/etcd/*.srl
kc() {
  local f=$K/$1.conf
  printf 'apiVersion: v1\nkind: Config\nclusters:\n- name: kdist\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: %s\ncontexts:\n- name: %s@kdist\n  context:\n    cluster: kdist\n    user: %s\ncurrent-context: %s@kdist\nusers:\n- name: %s\n  user:\n    client-certificate-data: %s\n    client-key-data: %s\n' \
    "$(base64 -w0 "$C/ca.crt")" "$1" "$1" "$1" "$1" "$(base64 -w0 "$C/$2.crt")" "$(base64 -w0 "$C/$2.key")" > "$f"
  chmod 600 "$f"
}
kc admin admin; kc controller-manager controller-manager; kc scheduler scheduler
kc kubelet kubelet-client; kc kube-proxy kube-proxy
