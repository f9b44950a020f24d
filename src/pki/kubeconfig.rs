//! Kubeconfig files with the CA and the client certificate embedded as data.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Where components and `kubectl` reach the apiserver on this node.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:6443";
const CLUSTER: &str = "kdist";

/// The text of a kubeconfig for `user` (the certificate's CN).
pub fn render(server: &str, ca_pem: &str, user: &str, cert_pem: &str, key_pem: &str) -> String {
    let context = format!("{user}@{CLUSTER}");
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CLUSTER,
            "cluster": {
                "server": server,
                "certificate-authority-data": STANDARD.encode(ca_pem),
            },
        }],
        "contexts": [{
            "name": context,
            "context": { "cluster": CLUSTER, "user": user },
        }],
        "current-context": context,
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": STANDARD.encode(cert_pem),
                "client-key-data": STANDARD.encode(key_pem),
            },
        }],
        "preferences": {},
    });
    // serializing a json Value to YAML cannot fail: it has string keys only
    crate::yaml::to_string(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeds_everything_as_base64() {
        let text = render(DEFAULT_SERVER, "CA", "kubernetes-admin", "CERT", "KEY");
        let parsed: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(parsed["current-context"], "kubernetes-admin@kdist");
        assert_eq!(parsed["clusters"][0]["cluster"]["server"], DEFAULT_SERVER);
        let key = parsed["users"][0]["user"]["client-key-data"]
            .as_str()
            .unwrap();
        assert_eq!(STANDARD.decode(key).unwrap(), b"KEY");
    }
}
