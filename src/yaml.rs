//! How kdist reads and writes YAML: one set of options for every file it writes
//! (kubeconfigs, component configs, config.yaml), every `-o yaml` output and every
//! file it reads (config.yaml, EKS-D manifests, kubeconfigs).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses one YAML document. The error names line and column in one line of text,
/// without a source snippet: callers put the file's name in front of it. It is boxed
/// because it is large, and the error enums that carry it travel in every `Result`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Box<serde_saphyr::Error>> {
    let options = serde_saphyr::options! {
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options).map_err(Box::new)
}

/// `value` as a YAML document. A long single-line string (a base64 certificate in a
/// kubeconfig) stays on one line rather than becoming a folded block, so line-based
/// tools still find `key: value`; multi-line strings are literal blocks.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    let options = serde_saphyr::ser_options! {
        folded_wrap_chars: usize::MAX,
    };
    serde_saphyr::to_string_with_options(value, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_stay_on_their_line_and_multiline_values_are_blocks() {
        let long = "QUFB".repeat(100);
        let text = to_string(&serde_json::json!({"data": long, "note": "a\nb\n"})).unwrap();
        assert!(text.contains(&format!("data: {long}\n")), "{text}");
        assert!(text.contains("note: |\n  a\n  b\n"), "{text}");
    }

    #[test]
    fn parse_errors_are_one_line_with_the_position() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            a: u32,
        }
        let err = from_str::<S>("a: 1\nb: 2\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains('b'), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
