//! Build notifications: a JSON POST to each configured webhook (`[[webhooks]]`) and to the
//! build's own `--notify` URLs when a build ends, signed with HMAC-SHA256 where a secret is set,
//! retried with backoff, on tasks of their own so the core never waits for a receiver.

use std::time::Duration;

use serde::Serialize;
use shared::proto::{BuildEvent, PlatformResult};

/// A receiver: where, and the secret its `X-Farm-Signature-256` header is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Platform {
    pub platform: String,
    pub agent: String,
    /// native, emulated or cached
    pub placement: String,
    pub digest: String,
    pub duration_ms: u64,
}

/// What a receiver gets.
#[derive(Debug, Serialize, PartialEq)]
pub struct Notice {
    pub event: &'static str,
    pub id: String,
    /// succeeded, failed or cancelled
    pub result: &'static str,
    pub tags: Vec<String>,
    /// The image index digest, when the build succeeded.
    pub index: Option<String>,
    pub error: Option<String>,
    pub platforms: Vec<Platform>,
}

impl Notice {
    /// The notice for a build's terminal event; `None` for any other event.
    pub fn of(id: &str, tags: &[String], event: &BuildEvent) -> Option<Notice> {
        let (result, index, error, platforms): (_, _, _, &[PlatformResult]) = match event {
            BuildEvent::Succeeded { index, platforms, .. } => ("succeeded", Some(index.to_string()), None, platforms),
            BuildEvent::Failed { error } => ("failed", None, Some(error.clone()), &[]),
            BuildEvent::Cancelled => ("cancelled", None, None, &[]),
            _ => return None,
        };
        Some(Notice {
            event: "build.finished",
            id: id.into(),
            result,
            tags: tags.to_vec(),
            index,
            error,
            platforms: platforms
                .iter()
                .map(|r| Platform {
                    platform: r.platform.to_string(),
                    agent: r.agent.clone(),
                    placement: r.mode().into(),
                    digest: r.manifest.digest.to_string(),
                    duration_ms: r.duration_ms,
                })
                .collect(),
        })
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of the body with `secret`, as the `X-Farm-Signature-256` header
/// carries it (GitHub's `X-Hub-Signature-256` scheme).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

/// How many times a notice is sent before it is given up on, and the first wait between tries
/// (doubled each time).
pub const ATTEMPTS: u32 = 5;
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Sends `notice` to `hook` on a task of its own: up to [`ATTEMPTS`] tries until a 2xx answer.
pub fn send(client: reqwest::Client, hook: Webhook, notice: &Notice) {
    let body = serde_json::to_vec(notice).expect("a notice always encodes");
    let id = notice.id.clone();
    tokio::spawn(async move {
        let mut wait = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let mut req = client
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("x-farm-event", "build.finished")
                .body(body.clone());
            if let Some(secret) = &hook.secret {
                req = req.header("x-farm-signature-256", signature(secret, &body));
            }
            let outcome = match req.send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if attempt == ATTEMPTS {
                tracing::warn!(build = %id, url = %hook.url, "webhook gave up after {ATTEMPTS} tries: {outcome}");
                return;
            }
            tracing::info!(build = %id, url = %hook.url, "webhook try {attempt} failed ({outcome}); again in {wait:?}");
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::proto::{ManifestRef, Phase};
    use shared::Digest;

    #[test]
    fn a_signature_is_the_hmac_sha256_of_the_body_as_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_terminal_events_make_a_notice_with_each_platform() {
        let r = PlatformResult {
            platform: "linux/arm64".parse().unwrap(),
            manifest: ManifestRef { media_type: "m".into(), digest: Digest::of(b"m"), size: 1 },
            agent: "pi".into(),
            emulated: false,
            duration_ms: 1234,
            cached: false,
            timings: vec![Phase { name: "build".into(), ms: 1000 }],
        };
        let tags = vec!["registry.lan:5000/app:1".to_string()];
        let ok =
            BuildEvent::Succeeded { index: Digest::of(b"i"), tags: tags.clone(), platforms: vec![r], stitch_ms: 3 };
        let n = Notice::of("b1", &tags, &ok).unwrap();
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["result"], "succeeded");
        assert_eq!(json["index"], Digest::of(b"i").to_string());
        assert_eq!(json["platforms"][0]["placement"], "native");
        assert_eq!(json["platforms"][0]["agent"], "pi");
        assert_eq!(json["platforms"][0]["duration_ms"], 1234);
        let failed = Notice::of("b1", &tags, &BuildEvent::Failed { error: "x".into() }).unwrap();
        assert_eq!((failed.result, failed.error.as_deref()), ("failed", Some("x")));
        assert!(Notice::of("b1", &tags, &BuildEvent::Cancelled).is_some());
        assert!(Notice::of(
            "b1",
            &tags,
            &BuildEvent::Log { platform: "linux/amd64".parse().unwrap(), line: "l".into() }
        )
        .is_none());
    }
}
