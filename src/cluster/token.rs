//! Join tokens: 32 random bytes (64 hex characters) shown once by `kdist add-node`,
//! stored only as their SHA-256 under `<data>/cluster/tokens.json`, with a role, a use
//! count and an optional expiry. Every change happens under `tokens.lock` so the agent
//! and the CLI never lose each other's writes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ClusterError;
use crate::config::{DataDir, Role};
use crate::fsutil;

/// Length of a token in hex characters (32 bytes).
pub const TOKEN_HEX_LEN: usize = 64;

/// One stored token: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public name: the first 8 hex digits of the hash.
    pub id: String,
    /// SHA-256 of the token text, hex.
    pub sha256: String,
    /// The role a joiner with this token gets (a control-plane token also allows workers).
    pub role: Role,
    /// Joins left.
    pub uses_left: u32,
    /// Unix time after which the token is refused; none = no expiry.
    pub expires_at: Option<u64>,
    pub created_at: u64,
}

impl TokenRecord {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    tokens: Vec<TokenRecord>,
}

/// The token file of one data dir.
pub struct TokenStore {
    path: PathBuf,
    lock: PathBuf,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks the shape of a presented token (64 lowercase hex digits).
pub fn check_format(token: &str) -> Result<(), ClusterError> {
    if token.len() != TOKEN_HEX_LEN {
        return Err(ClusterError::MalformedToken {
            reason: format!(
                "it has {} characters, a token has {TOKEN_HEX_LEN} hex digits",
                token.len()
            ),
        });
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ClusterError::MalformedToken {
            reason: "a token has only the hex digits 0-9 and a-f".into(),
        });
    }
    Ok(())
}

impl TokenStore {
    pub fn new(data: &DataDir) -> Self {
        let dir = data.cluster_dir();
        Self {
            path: dir.join("tokens.json"),
            lock: dir.join("tokens.lock"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn locked(&self) -> Result<Flock<File>, ClusterError> {
        let io = |source| ClusterError::Io {
            path: self.lock.clone(),
            source,
        };
        if let Some(dir) = self.lock.parent() {
            fsutil::ensure_dir(dir, 0o700).map_err(io)?;
        }
        fsutil::lock_exclusive(&self.lock).map_err(io)
    }

    fn read(&self) -> Result<Stored, ClusterError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ClusterError::Store {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stored::default()),
            Err(source) => Err(ClusterError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn write(&self, stored: &Stored) -> Result<(), ClusterError> {
        let bytes = serde_json::to_vec_pretty(stored).map_err(|e| ClusterError::Internal {
            reason: e.to_string(),
        })?;
        fsutil::atomic_write(&self.path, &bytes, 0o600).map_err(|source| ClusterError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Creates a token; returns its text (shown once, never stored) and its record.
    /// Expired and used-up tokens are dropped from the file on the way.
    pub fn create(
        &self,
        role: Role,
        uses: u32,
        ttl: Option<Duration>,
    ) -> Result<(String, TokenRecord), ClusterError> {
        if uses == 0 {
            return Err(ClusterError::Invalid {
                what: "--uses 0".into(),
                reason: "a token must allow at least one join".into(),
            });
        }
        let bytes: [u8; 32] = rand::random();
        let token = hex::encode(bytes);
        let sha256 = hash_hex(&token);
        let now = now_unix();
        let record = TokenRecord {
            id: sha256[..8].to_string(),
            sha256,
            role,
            uses_left: uses,
            expires_at: ttl.map(|t| now + t.as_secs()),
            created_at: now,
        };
        let _lock = self.locked()?;
        let mut stored = self.read()?;
        stored.tokens.retain(|t| t.uses_left > 0 && !t.expired(now));
        stored.tokens.push(record.clone());
        self.write(&stored)?;
        Ok((token, record))
    }

    /// Tokens that can still be used.
    pub fn list(&self) -> Result<Vec<TokenRecord>, ClusterError> {
        let now = now_unix();
        let _lock = self.locked()?;
        Ok(self
            .read()?
            .tokens
            .into_iter()
            .filter(|t| t.uses_left > 0 && !t.expired(now))
            .collect())
    }

    /// Gives back one use of the token `id` (a join that failed on this side).
    pub fn refund(&self, id: &str) -> Result<(), ClusterError> {
        let _lock = self.locked()?;
        let mut stored = self.read()?;
        if let Some(record) = stored.tokens.iter_mut().find(|t| t.id == id) {
            record.uses_left = record.uses_left.saturating_add(1);
            self.write(&stored)?;
        }
        Ok(())
    }

    /// Removes the token with this id.
    pub fn revoke(&self, id: &str) -> Result<TokenRecord, ClusterError> {
        let _lock = self.locked()?;
        let mut stored = self.read()?;
        let index = stored
            .tokens
            .iter()
            .position(|t| t.id == id)
            .ok_or_else(|| ClusterError::NoSuchTokenId { id: id.to_string() })?;
        let record = stored.tokens.remove(index);
        self.write(&stored)?;
        Ok(record)
    }

    /// Checks `token` for a join as `role` and uses it up once. The hash is compared
    /// with every stored one in constant time. A token that is used up stays in the file
    /// (with no uses left) so a reuse is told apart from an unknown token.
    pub fn consume(&self, token: &str, role: Role) -> Result<TokenRecord, ClusterError> {
        self.check_and_spend(token, role, true)
    }

    /// Checks `token` for a join as `role` without using it.
    pub fn check_role(&self, token: &str, role: Role) -> Result<TokenRecord, ClusterError> {
        self.check_and_spend(token, role, false)
    }

    fn check_and_spend(
        &self,
        token: &str,
        role: Role,
        spend: bool,
    ) -> Result<TokenRecord, ClusterError> {
        check_format(token)?;
        let presented = Sha256::digest(token.as_bytes());
        let now = now_unix();
        let _lock = self.locked()?;
        let mut stored = self.read()?;
        let mut found = None;
        for (index, record) in stored.tokens.iter().enumerate() {
            let Ok(hash) = hex::decode(&record.sha256) else {
                continue;
            };
            if bool::from(hash.as_slice().ct_eq(presented.as_slice())) {
                found = Some(index);
            }
        }
        let index = found.ok_or(ClusterError::UnknownToken)?;
        let record = &mut stored.tokens[index];
        if record.expired(now) {
            return Err(ClusterError::ExpiredToken {
                id: record.id.clone(),
            });
        }
        if record.uses_left == 0 {
            return Err(ClusterError::UsedToken {
                id: record.id.clone(),
            });
        }
        if role == Role::ControlPlane && record.role == Role::Worker {
            return Err(ClusterError::WrongRole {
                id: record.id.clone(),
            });
        }
        if !spend {
            return Ok(record.clone());
        }
        record.uses_left -= 1;
        let used = record.clone();
        self.write(&stored)?;
        Ok(used)
    }
}

/// Parses a duration such as `30s`, `10m`, `1h`, `2d`, of at most ten years.
pub fn parse_ttl(text: &str) -> Result<Duration, ClusterError> {
    let invalid = |reason: String| ClusterError::Invalid {
        what: format!("--ttl {text}"),
        reason,
    };
    let ttl = text
        .parse::<crate::config::Lifetime>()
        .map_err(invalid)?
        .duration();
    if ttl.is_zero() {
        return Err(invalid("a token must live at least 1s".into()));
    }
    if ttl > Duration::from_secs(MAX_TTL_DAYS * 86_400) {
        return Err(invalid(format!(
            "longer than {MAX_TTL_DAYS}d; leave out --ttl for a token that never expires"
        )));
    }
    Ok(ttl)
}

/// The longest `--ttl` taken (ten years).
const MAX_TTL_DAYS: u64 = 3_650;

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tag: &str) -> (TokenStore, PathBuf) {
        let root = std::env::temp_dir().join(format!("kd-tok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (TokenStore::new(&DataDir::new(&root)), root)
    }

    #[test]
    fn single_use_token_works_once_and_is_stored_hashed() {
        let (store, root) = store("once");
        let (token, record) = store.create(Role::Worker, 1, None).unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&token), "token stored in clear");
        assert!(text.contains(&record.sha256));
        store.consume(&token, Role::Worker).unwrap();
        let err = store.consume(&token, Role::Worker).unwrap_err();
        assert!(matches!(err, ClusterError::UsedToken { .. }), "{err}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn worker_token_refuses_control_plane_and_revoke_works() {
        let (store, root) = store("role");
        let (token, record) = store.create(Role::Worker, 2, None).unwrap();
        let err = store.consume(&token, Role::ControlPlane).unwrap_err();
        assert_eq!(err.http_status(), 403);
        store.revoke(&record.id).unwrap();
        let err = store.consume(&token, Role::Worker).unwrap_err();
        assert!(matches!(err, ClusterError::UnknownToken), "{err}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn malformed_tokens_and_ttls_are_refused() {
        let (store, root) = store("bad");
        assert!(matches!(
            store.consume("abc", Role::Worker).unwrap_err(),
            ClusterError::MalformedToken { .. }
        ));
        assert!(matches!(
            store.consume(&"G".repeat(64), Role::Worker).unwrap_err(),
            ClusterError::MalformedToken { .. }
        ));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("1y").is_err() && parse_ttl("0s").is_err() && parse_ttl("").is_err());
        // a multibyte unit, an overflowing number and an absurd span are errors, not panics
        for bad in [
            "1µ",
            "999999999999999999d",
            "18446744073709551615s",
            "3651d",
        ] {
            let err = parse_ttl(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("--ttl {bad}")), "{err}");
        }
        assert_eq!(
            parse_ttl("3650d").unwrap(),
            Duration::from_secs(3_650 * 86_400)
        );
        let _ = std::fs::remove_dir_all(root);
    }
}
