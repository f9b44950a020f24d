//! Signing a joiner's requests with the cluster CA. Only the CSR's public key is used:
//! names, usages and lifetime are set here, from the node name and the token's role.

use std::net::IpAddr;

use rcgen::{CertificateSigningRequestParams, SanType};

use super::error::ClusterError;
use super::protocol::{JoinRequest, JoinResponse, RenewRequest, RenewResponse};
use super::tls;
use crate::config::{DataDir, NodeConfig};

fn sign_csr(
    csr_pem: &str,
    what: &str,
    params: rcgen::CertificateParams,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> Result<String, ClusterError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        ClusterError::BadRequest {
            reason: format!("{what} CSR is not a valid signed request: {e}"),
        }
    })?;
    let request = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    };
    request
        .signed_by(issuer)
        .map(|c| c.pem())
        .map_err(|source| ClusterError::Certificate {
            what: format!("{what} certificate"),
            source,
        })
}

fn kube_proxy(
    csr: &str,
    validity: std::time::Duration,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> Result<String, ClusterError> {
    sign_csr(
        csr,
        "kube-proxy",
        tls::leaf_params("system:kube-proxy", None, false, true, &[], validity),
        issuer,
    )
}

/// The kubelet's serving certificate names the node and the address it comes from.
fn kubelet_serving(
    csr: &str,
    name: &str,
    peer: IpAddr,
    validity: std::time::Duration,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> Result<String, ClusterError> {
    let mut sans = vec![SanType::IpAddress(peer)];
    if let Ok(dns) = name.to_string().try_into() {
        sans.push(SanType::DnsName(dns));
    }
    sign_csr(
        csr,
        "kubelet serving",
        tls::leaf_params(name, None, true, false, &sans, validity),
        issuer,
    )
}

/// Signs the CSRs of a node's renewal: `name` is the node its client certificate
/// proved, `peer` the address it connects from.
pub fn renewal(
    data: &DataDir,
    config: &NodeConfig,
    name: &str,
    request: &RenewRequest,
    peer: IpAddr,
) -> Result<RenewResponse, ClusterError> {
    let issuer = tls::ca_issuer(data)?;
    let validity = config.certs.leaf_validity.duration();
    Ok(RenewResponse {
        kube_proxy_crt: request
            .kube_proxy_csr
            .as_deref()
            .map(|csr| kube_proxy(csr, validity, &issuer))
            .transpose()?,
        kubelet_serving_crt: request
            .kubelet_serving_csr
            .as_deref()
            .map(|csr| kubelet_serving(csr, name, peer, validity, &issuer))
            .transpose()?,
    })
}

/// Signs a worker's kubelet client, kubelet serving and kube-proxy certificates.
pub fn worker(
    data: &DataDir,
    config: &NodeConfig,
    request: &JoinRequest,
    peer: IpAddr,
) -> Result<JoinResponse, ClusterError> {
    let issuer = tls::ca_issuer(data)?;
    let (ca_crt, _) = tls::cluster_ca(data)?;
    let validity = config.certs.leaf_validity.duration();
    let name = &request.node_name;
    let kubelet_client = sign_csr(
        &request.kubelet_client_csr,
        "kubelet client",
        tls::leaf_params(
            &format!("system:node:{name}"),
            Some("system:nodes"),
            false,
            true,
            &[],
            validity,
        ),
        &issuer,
    )?;
    let kube_proxy = kube_proxy(&request.kube_proxy_csr, validity, &issuer)?;
    let kubelet_serving =
        kubelet_serving(&request.kubelet_serving_csr, name, peer, validity, &issuer)?;
    let node_ip = config
        .network
        .node_ip
        .unwrap_or_else(crate::node::host::detect_node_ip);
    Ok(JoinResponse {
        role: request.role,
        ca_crt,
        kubelet_client_crt: kubelet_client,
        kube_proxy_crt: kube_proxy,
        kubelet_serving_crt: kubelet_serving,
        apiserver_endpoints: vec![format!(
            "https://{}",
            std::net::SocketAddr::new(node_ip, 6443)
        )],
        cluster_domain: config.network.cluster_domain.clone(),
        cluster_dns: config.network.cluster_dns.to_string(),
        pod_cidr: config.network.pod_cidr.clone(),
        service_cidr: config.network.service_cidr.clone(),
        control_plane: None,
    })
}
