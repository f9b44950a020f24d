//! Getting asset bytes into staging: HTTP downloads that resume with Range requests and
//! retry with backoff, copies from a local directory, and the sha256 + sha512 check that
//! every file passes before it is used.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256, Sha512};
use tokio::io::AsyncWriteExt;

use super::error::ComponentsError;
use super::progress::Item;

/// Both digests of a file, lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub sha256: String,
    pub sha512: String,
    pub size: u64,
}

/// Hashes a file with both algorithms in one read. Blocking: call from a blocking thread.
pub fn digest_file(path: &Path) -> Result<Digests, ComponentsError> {
    let mut file = std::fs::File::open(path).map_err(ComponentsError::io(path))?;
    let mut s256 = Sha256::new();
    let mut s512 = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(ComponentsError::io(path))?;
        if n == 0 {
            break;
        }
        s256.update(&buf[..n]);
        s512.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digests {
        sha256: hex::encode(s256.finalize()),
        sha512: hex::encode(s512.finalize()),
        size,
    })
}

pub async fn digest_file_async(path: &Path) -> Result<Digests, ComponentsError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || digest_file(&owned))
        .await
        .map_err(|source| ComponentsError::Task {
            path: path.to_path_buf(),
            source,
        })?
}

/// Checks `actual` against the manifest's digests; the error names the algorithm that
/// failed (both are checked, so a forged file must match both).
pub fn check(
    what: &str,
    actual: &Digests,
    sha256: &str,
    sha512: &str,
) -> Result<(), ComponentsError> {
    if !actual.sha256.eq_ignore_ascii_case(sha256) {
        return Err(ComponentsError::Digest {
            what: what.to_string(),
            algorithm: "sha256",
            expected: sha256.to_string(),
            actual: actual.sha256.clone(),
        });
    }
    if !actual.sha512.eq_ignore_ascii_case(sha512) {
        return Err(ComponentsError::Digest {
            what: what.to_string(),
            algorithm: "sha512",
            expected: sha512.to_string(),
            actual: actual.sha512.clone(),
        });
    }
    Ok(())
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .first_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max_backoff);
        // up to 20% jitter so parallel downloads do not retry in lockstep
        let jitter = capped.mul_f64(rand::random::<f64>() * 0.2);
        capped + jitter
    }
}

pub fn client() -> Result<reqwest::Client, ComponentsError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        // a stalled transfer is retried (and resumed) rather than waited on forever
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("kdist/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| ComponentsError::Http {
            url: "(client setup)".into(),
            source,
        })
}

/// Fetches a small text document (manifest, channel), with retries.
pub async fn get_text(
    client: &reqwest::Client,
    url: &str,
    policy: RetryPolicy,
) -> Result<String, ComponentsError> {
    let mut last = None;
    for attempt in 1..=policy.attempts {
        let result = async {
            let resp = client
                .get(url)
                .send()
                .await
                .map_err(|source| ComponentsError::Http {
                    url: url.to_string(),
                    source,
                })?;
            let status = resp.status();
            if !status.is_success() {
                return Err(status_error(url, status));
            }
            resp.text().await.map_err(|source| ComponentsError::Http {
                url: url.to_string(),
                source,
            })
        }
        .await;
        match result {
            Ok(text) => return Ok(text),
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(url, attempt, error = %e, "retrying");
                last = Some(e);
                if attempt < policy.attempts {
                    tokio::time::sleep(policy.delay(attempt)).await;
                }
            }
        }
    }
    Err(ComponentsError::DownloadFailed {
        url: url.to_string(),
        attempts: policy.attempts,
        source: Box::new(last.unwrap_or(ComponentsError::HttpStatus {
            url: url.to_string(),
            status: 0,
            hint: "",
        })),
    })
}

fn status_error(url: &str, status: StatusCode) -> ComponentsError {
    let hint = match status.as_u16() {
        404 => {
            "; check the channel and release number (`kdist components install --channel 1-XX --release N`)"
        }
        403 => "; the server refused access",
        _ => "",
    };
    ComponentsError::HttpStatus {
        url: url.to_string(),
        status: status.as_u16(),
        hint,
    }
}

fn retryable(e: &ComponentsError) -> bool {
    match e {
        ComponentsError::HttpStatus { status, .. } => {
            *status == 408 || *status == 429 || *status >= 500
        }
        ComponentsError::Http { .. }
        | ComponentsError::Transfer { .. }
        | ComponentsError::ResumeRefused { .. }
        | ComponentsError::Truncated { .. } => true,
        _ => false,
    }
}

/// One file to download into `dest`, with the digests it must have.
pub struct Download<'a> {
    pub url: &'a str,
    pub dest: &'a Path,
    pub sha256: &'a str,
    pub sha512: &'a str,
    pub what: &'a str,
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Downloads to `<dest>.part`, resuming what an earlier (interrupted) run left, verifies
/// both digests and only then renames to `dest`. A `dest` already there and valid is
/// kept as is.
pub async fn download(
    client: &reqwest::Client,
    job: Download<'_>,
    policy: RetryPolicy,
    item: &Item,
) -> Result<Digests, ComponentsError> {
    if tokio::fs::try_exists(job.dest).await.unwrap_or(false) {
        let digests = digest_file_async(job.dest).await?;
        if check(job.what, &digests, job.sha256, job.sha512).is_ok() {
            item.done("already downloaded, verified");
            return Ok(digests);
        }
        remove_if_exists(job.dest).await?;
    }
    let part = part_path(job.dest);
    let mut last = None;
    for attempt in 1..=policy.attempts {
        match fetch_once(client, &job, &part, item).await {
            Ok(resumed) => {
                let digests = digest_file_async(&part).await?;
                match check(job.what, &digests, job.sha256, job.sha512) {
                    Ok(()) => {
                        tokio::fs::rename(&part, job.dest)
                            .await
                            .map_err(ComponentsError::io(job.dest))?;
                        item.done("verified sha256+sha512");
                        return Ok(digests);
                    }
                    Err(e) => {
                        remove_if_exists(&part).await?;
                        // a resumed file may join two different versions of the asset:
                        // start over once from zero before calling it tampered
                        if !resumed {
                            item.fail(&e.to_string());
                            return Err(e);
                        }
                        item.note("digest mismatch after resume, restarting");
                        last = Some(e);
                    }
                }
            }
            Err(e) if retryable(&e) => {
                tracing::debug!(url = job.url, attempt, error = %e, "download attempt failed");
                item.note(&format!("attempt {attempt} failed: {e}"));
                last = Some(e);
                if attempt < policy.attempts {
                    tokio::time::sleep(policy.delay(attempt)).await;
                }
            }
            Err(e) => {
                item.fail(&e.to_string());
                return Err(e);
            }
        }
    }
    let source = last.unwrap_or(ComponentsError::HttpStatus {
        url: job.url.to_string(),
        status: 0,
        hint: "",
    });
    item.fail(&source.to_string());
    Err(ComponentsError::DownloadFailed {
        url: job.url.to_string(),
        attempts: policy.attempts,
        source: Box::new(source),
    })
}

/// One HTTP exchange; returns whether it continued an earlier partial file.
async fn fetch_once(
    client: &reqwest::Client,
    job: &Download<'_>,
    part: &Path,
    item: &Item,
) -> Result<bool, ComponentsError> {
    let have = tokio::fs::metadata(part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let mut request = client.get(job.url);
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let http = |source| ComponentsError::Http {
        url: job.url.to_string(),
        source,
    };
    let mut resp = request.send().await.map_err(http)?;
    let status = resp.status();
    let (offset, total) = match status {
        StatusCode::PARTIAL_CONTENT if have > 0 => {
            let total = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|v| v.parse::<u64>().ok());
            (have, total)
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // the partial file is as long as (or longer than) the asset: start over
            remove_if_exists(part).await?;
            return Err(ComponentsError::ResumeRefused {
                url: job.url.to_string(),
                have,
            });
        }
        s if s.is_success() => (0, resp.content_length()),
        s => return Err(status_error(job.url, s)),
    };
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(offset > 0)
        .truncate(offset == 0)
        .open(part)
        .await
        .map_err(ComponentsError::io(part))?;
    // network chunks are small; each write to a tokio File is a trip to a blocking thread
    let mut file = tokio::io::BufWriter::with_capacity(256 << 10, file);
    item.start(offset, total);
    let mut got = offset;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(source) => {
                // keep what arrived: the next attempt resumes from there
                let _ = file.flush().await;
                return Err(ComponentsError::Transfer {
                    url: job.url.to_string(),
                    source,
                });
            }
        };
        file.write_all(&chunk)
            .await
            .map_err(ComponentsError::io(part))?;
        got += chunk.len() as u64;
        item.advance(chunk.len() as u64);
    }
    file.flush().await.map_err(ComponentsError::io(part))?;
    file.get_ref()
        .sync_all()
        .await
        .map_err(ComponentsError::io(part))?;
    if let Some(total) = total
        && got < total
    {
        return Err(ComponentsError::Truncated {
            url: job.url.to_string(),
            got,
            expected: total,
        });
    }
    Ok(offset > 0)
}

/// Copies a local file into staging (air gap) and verifies it like a download: the
/// staged copy is what is hashed, so a source changed during the copy is caught.
pub async fn copy_local(
    from: &Path,
    dest: &Path,
    sha256: &str,
    sha512: &str,
    what: &str,
    item: &Item,
) -> Result<Digests, ComponentsError> {
    let tmp = part_path(dest);
    tokio::fs::copy(from, &tmp)
        .await
        .map_err(ComponentsError::io(from))?;
    let digests = digest_file_async(&tmp).await?;
    item.sized(digests.size);
    if let Err(e) = check(what, &digests, sha256, sha512) {
        let _ = tokio::fs::remove_file(&tmp).await;
        item.fail(&e.to_string());
        return Err(e);
    }
    tokio::fs::rename(&tmp, dest)
        .await
        .map_err(ComponentsError::io(dest))?;
    item.done("copied, verified sha256+sha512");
    Ok(digests)
}

async fn remove_if_exists(path: &Path) -> Result<(), ComponentsError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ComponentsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_known_input() {
        let dir = std::env::temp_dir().join(format!("kdist-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc");
        std::fs::write(&f, b"abc").unwrap();
        let d = digest_file(&f).unwrap();
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(d.sha512.starts_with("ddaf35a193617aba"));
        assert_eq!(d.size, 3);
        let err = check("abc", &d, &d.sha256, "00").unwrap_err().to_string();
        assert!(err.contains("sha512"), "{err}");
        let err = check("abc", &d, "00", &d.sha512).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        };
        assert!(p.delay(1) >= Duration::from_millis(100));
        assert!(p.delay(2) >= Duration::from_millis(200));
        assert!(p.delay(9) <= Duration::from_millis(360));
    }
}
