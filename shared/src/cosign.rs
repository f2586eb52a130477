//! **Pure** signatures in cosign's formats (cosign 2.x), so that `cosign verify --key` and
//! `cosign verify-attestation --key` accept what farm signs:
//!
//! - an image signature is a "simple signing" payload ([`simple_signing_payload`]) signed with
//!   ECDSA P-256 / SHA-256 (an ASN.1 DER signature), stored as a layer of media type
//!   [`SIMPLE_SIGNING`] whose annotation [`SIGNATURE_ANNOTATION`] holds the base64 signature;
//! - an attestation is an in-toto statement in a DSSE envelope ([`dsse_envelope`], signed over
//!   [`pae`]), stored as a layer of media type [`DSSE_ENVELOPE`] with the statement's
//!   `predicateType` as an annotation;
//! - both live in an OCI image manifest ([`signature_image`]) tagged [`tag_for`]`(digest, suffix)`
//!   (`sha256-<hex>.sig`, `.att`) in the image's repository, one layer per signature.
//!
//! The private key is a [`SigningKey`]: it prints as `SigningKey(<redacted>)` and is written only
//! by [`crate::signing`], 0600 beside the CA key.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding,
};
use serde::{Deserialize, Serialize};

use crate::oci::OCI_MANIFEST;
use crate::Digest;

/// The layer media type of an image signature (its blob is the simple-signing payload).
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer media type of an attestation (its blob is the DSSE envelope).
pub const DSSE_ENVELOPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// The layer annotation holding the base64 signature (empty on attestations: theirs is inside).
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The layer annotation naming an attestation's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "predicateType";
/// The config media type of cosign's signature images.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Tag suffixes: image signatures, attestations.
pub const SIG_SUFFIX: &str = "sig";
pub const ATT_SUFFIX: &str = "att";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What was wrong with a key, a statement or a signature image read back.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CosignError {
    #[error("not a PKCS#8 PEM ECDSA P-256 private key ({0})")]
    BadKey(String),
    #[error("not a PEM P-256 public key ({0})")]
    BadPublicKey(String),
    #[error("the attestation is not an in-toto statement: {0}")]
    BadStatement(String),
    #[error("the existing signature manifest cannot be read: {0}")]
    BadManifest(String),
}

/// The farm's ECDSA P-256 signing key. Never printed: `Debug` shows `SigningKey(<redacted>)`.
#[derive(Clone)]
pub struct SigningKey(p256::ecdsa::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key from 32 secret bytes (a P-256 scalar); `None` for the rare value that is not one
    /// (zero or beyond the group order: draw again).
    pub fn from_secret(bytes: &[u8; 32]) -> Option<SigningKey> {
        p256::ecdsa::SigningKey::from_bytes(bytes.into()).ok().map(SigningKey)
    }

    /// Reads a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<SigningKey, CosignError> {
        p256::ecdsa::SigningKey::from_pkcs8_pem(pem).map(SigningKey).map_err(|e| CosignError::BadKey(e.to_string()))
    }

    /// The PKCS#8 PEM of the private key (what [`SigningKey::from_pem`] reads).
    pub fn to_pem(&self) -> String {
        self.0.to_pkcs8_pem(LineEnding::LF).expect("a P-256 key always encodes").to_string()
    }

    /// The public key as PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo): what
    /// `cosign verify --key FILE` reads.
    pub fn public_key_pem(&self) -> String {
        self.0.verifying_key().to_public_key_pem(LineEnding::LF).expect("a P-256 key always encodes")
    }

    /// ECDSA P-256 over SHA-256 of `message` (RFC 6979 nonces: the same message gives the same
    /// signature), ASN.1 DER encoded as cosign writes and reads it.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let sig: p256::ecdsa::Signature = self.0.sign(message);
        sig.to_der().as_bytes().to_vec()
    }
}

/// Whether `signature` (DER) is `public_key_pem`'s signature of `message`.
pub fn verify(public_key_pem: &str, message: &[u8], signature: &[u8]) -> Result<bool, CosignError> {
    let key = p256::ecdsa::VerifyingKey::from_public_key_pem(public_key_pem)
        .map_err(|e| CosignError::BadPublicKey(e.to_string()))?;
    let Ok(sig) = p256::ecdsa::Signature::from_der(signature) else { return Ok(false) };
    Ok(key.verify(message, &sig).is_ok())
}

/// The tag cosign looks under for `digest`'s signatures (`sig`) or attestations (`att`):
/// `sha256-<hex>.<suffix>`.
pub fn tag_for(digest: &Digest, suffix: &str) -> String {
    format!("sha256-{}.{suffix}", digest.hex())
}

/// cosign's simple-signing payload for the image `digest` in `docker_reference`
/// (`registry/repository`, no tag), byte for byte as cosign 2.x marshals it.
pub fn simple_signing_payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    #[derive(Serialize)]
    struct Payload<'a> {
        critical: Critical<'a>,
        optional: Option<()>,
    }
    #[derive(Serialize)]
    struct Critical<'a> {
        identity: Identity<'a>,
        image: Image<'a>,
        #[serde(rename = "type")]
        kind: &'a str,
    }
    #[derive(Serialize)]
    struct Identity<'a> {
        #[serde(rename = "docker-reference")]
        docker_reference: &'a str,
    }
    #[derive(Serialize)]
    struct Image<'a> {
        #[serde(rename = "docker-manifest-digest")]
        docker_manifest_digest: &'a str,
    }
    let payload = Payload {
        critical: Critical {
            identity: Identity { docker_reference },
            image: Image { docker_manifest_digest: digest.as_str() },
            kind: "cosign container image signature",
        },
        optional: None,
    };
    serde_json::to_vec(&payload).expect("plain strings serialise")
}

/// DSSE's pre-authentication encoding: `DSSEv1 <len(type)> <type> <len(body)> <body>`, lengths
/// in ASCII decimal. What is signed, never what is stored.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload_type: String,
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EnvelopeSignature {
    keyid: String,
    sig: String,
}

/// A DSSE envelope of `payload`, signed by `key` over [`pae`], with keyid "" as cosign writes it.
pub fn dsse_envelope(key: &SigningKey, payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let sig = key.sign(&pae(payload_type, payload));
    let envelope = Envelope {
        payload_type: payload_type.to_owned(),
        payload: B64.encode(payload),
        signatures: vec![EnvelopeSignature { keyid: String::new(), sig: B64.encode(sig) }],
    };
    serde_json::to_vec(&envelope).expect("plain strings serialise")
}

/// Checks a DSSE envelope against a public key: its payload type and payload if one signature
/// verifies, else `None`.
pub fn open_envelope(public_key_pem: &str, envelope: &[u8]) -> Result<Option<(String, Vec<u8>)>, CosignError> {
    let Ok(e) = serde_json::from_slice::<Envelope>(envelope) else { return Ok(None) };
    let Ok(payload) = B64.decode(&e.payload) else { return Ok(None) };
    let message = pae(&e.payload_type, &payload);
    for s in &e.signatures {
        if let Ok(sig) = B64.decode(&s.sig) {
            if verify(public_key_pem, &message, &sig)? {
                return Ok(Some((e.payload_type, payload)));
            }
        }
    }
    Ok(None)
}

/// The `predicateType` of an in-toto statement, which must have one and at least one subject
/// with a sha256 digest (what `cosign verify-attestation` matches the image against).
pub fn predicate_type(statement: &[u8]) -> Result<String, CosignError> {
    let v: serde_json::Value =
        serde_json::from_slice(statement).map_err(|e| CosignError::BadStatement(format!("not JSON: {e}")))?;
    let Some(kind) = v.get("predicateType").and_then(|t| t.as_str()).filter(|t| !t.is_empty()) else {
        return Err(CosignError::BadStatement("no predicateType".into()));
    };
    let subjects = v.get("subject").and_then(|s| s.as_array()).map(Vec::as_slice).unwrap_or_default();
    if !subjects.iter().any(|s| s.pointer("/digest/sha256").and_then(|d| d.as_str()).is_some()) {
        return Err(CosignError::BadStatement("no subject with a sha256 digest".into()));
    }
    Ok(kind.to_owned())
}

/// One layer of a signature image: a descriptor of the payload (or envelope) blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layer {
    pub media_type: String,
    pub size: u64,
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    fn of(media_type: &str, blob: &[u8], annotations: BTreeMap<String, String>) -> Layer {
        Layer { media_type: media_type.to_owned(), size: blob.len() as u64, digest: Digest::of(blob), annotations }
    }
}

/// The signature of image `digest` in `docker_reference`: the payload blob and its layer.
pub fn signature_layer(key: &SigningKey, docker_reference: &str, digest: &Digest) -> (Vec<u8>, Layer) {
    let payload = simple_signing_payload(docker_reference, digest);
    let sig = B64.encode(key.sign(&payload));
    let layer = Layer::of(SIMPLE_SIGNING, &payload, BTreeMap::from([(SIGNATURE_ANNOTATION.to_owned(), sig)]));
    (payload, layer)
}

/// The attestation of an in-toto `statement` (any predicate): the envelope blob and its layer.
pub fn attestation_layer(key: &SigningKey, statement: &[u8]) -> Result<(Vec<u8>, Layer), CosignError> {
    let predicate = predicate_type(statement)?;
    let envelope = dsse_envelope(key, IN_TOTO, statement);
    let annotations = BTreeMap::from([
        (SIGNATURE_ANNOTATION.to_owned(), String::new()),
        (PREDICATE_TYPE_ANNOTATION.to_owned(), predicate),
    ]);
    let layer = Layer::of(DSSE_ENVELOPE, &envelope, annotations);
    Ok((envelope, layer))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: String,
    config: Layer,
    layers: Vec<Layer>,
}

/// The image holding `layers`, as cosign writes it (go-containerregistry's empty image with the
/// layers appended): its config blob and manifest bytes.
pub fn signature_image(layers: &[Layer]) -> (Vec<u8>, Vec<u8>) {
    const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
    let config = serde_json::json!({
        "architecture": "",
        "created": ZERO_TIME,
        "history": layers.iter().map(|_| serde_json::json!({"created": ZERO_TIME})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.as_str()).collect::<Vec<_>>()},
        "config": {},
    });
    let config = serde_json::to_vec(&config).expect("plain values serialise");
    let manifest = Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.to_owned(),
        config: Layer::of(OCI_CONFIG, &config, BTreeMap::new()),
        layers: layers.to_vec(),
    };
    (config, serde_json::to_vec(&manifest).expect("plain values serialise"))
}

/// The layers of an existing signature image (to append to).
pub fn parse_layers(manifest: &[u8]) -> Result<Vec<Layer>, CosignError> {
    serde_json::from_slice::<Manifest>(manifest).map(|m| m.layers).map_err(|e| CosignError::BadManifest(e.to_string()))
}

/// `existing` with `layer` appended, unless an identical layer is already there (signing the
/// same payload again gives the same signature), in which case `None`: nothing to push.
pub fn append_layer(existing: Vec<Layer>, layer: Layer) -> Option<Vec<Layer>> {
    if existing.contains(&layer) {
        return None;
    }
    let mut layers = existing;
    layers.push(layer);
    Some(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_secret(&[7u8; 32]).unwrap()
    }

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap()
    }

    const STATEMENT: &str = r#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"r","digest":{"sha256":"aaaa"}}],"predicateType":"https://slsa.dev/provenance/v1","predicate":{}}"#;

    #[test]
    fn pae_is_dsse_v1_exactly() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae(IN_TOTO, b""), b"DSSEv1 28 application/vnd.in-toto+json 0 ".to_vec());
    }

    #[test]
    fn simple_signing_payload_is_cosigns_bytes() {
        let p = simple_signing_payload("127.0.0.1:5000/app", &digest('a'));
        assert_eq!(
            String::from_utf8(p).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:5000/app"}},"image":{{"docker-manifest-digest":"sha256:{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
                "a".repeat(64)
            )
        );
    }

    #[test]
    fn a_signature_verifies_with_the_public_key_and_not_another() {
        let k = key();
        let sig = k.sign(b"payload");
        assert!(verify(&k.public_key_pem(), b"payload", &sig).unwrap());
        assert!(!verify(&k.public_key_pem(), b"payloaD", &sig).unwrap());
        let other = SigningKey::from_secret(&[9u8; 32]).unwrap();
        assert!(!verify(&other.public_key_pem(), b"payload", &sig).unwrap());
        assert_eq!(k.sign(b"payload"), sig, "RFC 6979: deterministic");
    }

    #[test]
    fn keys_round_trip_through_pem_and_never_print() {
        let k = key();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert_eq!(SigningKey::from_pem(&pem).unwrap().public_key_pem(), k.public_key_pem());
        assert!(k.public_key_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(format!("{k:?}"), "SigningKey(<redacted>)");
        assert!(matches!(SigningKey::from_pem("nope"), Err(CosignError::BadKey(_))));
    }

    #[test]
    fn the_envelope_signs_the_pae_of_the_statement() {
        let k = key();
        let env = dsse_envelope(&k, IN_TOTO, STATEMENT.as_bytes());
        let v: serde_json::Value = serde_json::from_slice(&env).unwrap();
        assert_eq!(v["payloadType"], IN_TOTO);
        assert_eq!(v["signatures"][0]["keyid"], "");
        assert_eq!(B64.decode(v["payload"].as_str().unwrap()).unwrap(), STATEMENT.as_bytes());
        let sig = B64.decode(v["signatures"][0]["sig"].as_str().unwrap()).unwrap();
        assert!(verify(&k.public_key_pem(), &pae(IN_TOTO, STATEMENT.as_bytes()), &sig).unwrap());
        assert_eq!(
            open_envelope(&k.public_key_pem(), &env).unwrap(),
            Some((IN_TOTO.into(), STATEMENT.as_bytes().to_vec()))
        );
        let other = SigningKey::from_secret(&[9u8; 32]).unwrap();
        assert_eq!(open_envelope(&other.public_key_pem(), &env).unwrap(), None);
    }

    #[test]
    fn attestation_layers_carry_the_predicate_type_and_refuse_non_statements() {
        let (env, layer) = attestation_layer(&key(), STATEMENT.as_bytes()).unwrap();
        assert_eq!(layer.media_type, DSSE_ENVELOPE);
        assert_eq!(layer.digest, Digest::of(&env));
        assert_eq!(layer.size, env.len() as u64);
        assert_eq!(layer.annotations[PREDICATE_TYPE_ANNOTATION], "https://slsa.dev/provenance/v1");
        assert_eq!(layer.annotations[SIGNATURE_ANNOTATION], "");
        assert_eq!(
            attestation_layer(&key(), br#"{"subject":[]}"#).unwrap_err().to_string(),
            "the attestation is not an in-toto statement: no predicateType"
        );
        assert_eq!(
            attestation_layer(&key(), br#"{"predicateType":"x","subject":[{"digest":{}}]}"#).unwrap_err().to_string(),
            "the attestation is not an in-toto statement: no subject with a sha256 digest"
        );
    }

    #[test]
    fn signature_images_are_cosigns_layout_and_append_once() {
        let k = key();
        let (payload, layer) = signature_layer(&k, "reg/app", &digest('b'));
        let sig = B64.decode(&layer.annotations[SIGNATURE_ANNOTATION]).unwrap();
        assert!(verify(&k.public_key_pem(), &payload, &sig).unwrap());
        assert_eq!(layer.media_type, SIMPLE_SIGNING);
        let (config, manifest) = signature_image(std::slice::from_ref(&layer));
        assert_eq!(
            String::from_utf8(config.clone()).unwrap(),
            format!(
                r#"{{"architecture":"","config":{{}},"created":"0001-01-01T00:00:00Z","history":[{{"created":"0001-01-01T00:00:00Z"}}],"os":"","rootfs":{{"diff_ids":["{}"],"type":"layers"}}}}"#,
                layer.digest
            )
        );
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(m["config"]["digest"], Digest::of(&config).as_str());
        assert_eq!(m["layers"][0]["annotations"][SIGNATURE_ANNOTATION], layer.annotations[SIGNATURE_ANNOTATION]);
        assert_eq!(parse_layers(&manifest).unwrap(), vec![layer.clone()]);
        assert_eq!(append_layer(vec![layer.clone()], layer.clone()), None);
        let (_, other) = signature_layer(&k, "reg/app", &digest('c'));
        assert_eq!(append_layer(vec![layer.clone()], other.clone()), Some(vec![layer, other]));
        assert_eq!(tag_for(&digest('b'), SIG_SUFFIX), format!("sha256-{}.sig", "b".repeat(64)));
    }
}
