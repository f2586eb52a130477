//! The common ground of farm: everything the coordinator, the agents and the CLI must agree on.
//!
//! - [`annotation`]: `--annotation` and `--label` as buildx spells them, and the stitched index.
//! - [`cache`]: the layer cache shared through a registry (`--cache-to`/`--cache-from`, `cache_repo`).
//! - [`platform`]: OCI platforms (`linux/arm/v7`), parsed and normalised once, so that every side
//!   compares the same canonical values.
//! - [`host`]: what this machine runs natively and what it can emulate (pure parsers over uname,
//!   /proc/cpuinfo and binfmt_misc, plus a thin reader of the real files).
//! - [`proto`]: the only types that cross the wire, their framing and the version handshake.
//! - [`tls`]: the farm's certificate authority and the identities (name + role) it issues.
//! - [`quic`]: the only place that builds quinn endpoints; transport limits live here.
//! - [`dockerfile`]: the base images a Dockerfile names (for the result cache).
//! - [`client`]: the connecting side (handshake, one stream per request), for agents and the CLI.
//! - [`context`]: build contexts as content-addressed manifests: `.dockerignore`, scanning, validation
//!   on receipt, the blob store, and materialising a context into an agent's work directory.
//! - [`disk`]: free space (`statvfs`), "disk full" errors, and whether something fits (pure).
//! - [`imagetools`]: `farm imagetools inspect` (an image's index and platforms, and farm's part).
//! - [`inputs`]: `farm build`'s input flags (named contexts, secrets, network, extra hosts), parsed.
//! - [`oci`]: image references, descriptors, deterministic image indexes and buildah's OCI layouts.
//! - [`cosign`]: signatures and attestations in cosign's formats (pure); [`signing`]: the farm's
//!   signing key on disk and pushing those to a registry.
//! - [`registry`]: pushing layouts by digest and indexes by tag to OCI registries (oci-client).
//!
//! Architecture invariant: nothing in `platform`, `host` (parsers), `proto` (framing) or `oci` (apart
//! from reading a layout directory) performs I/O; they are plain functions tested without sockets or
//! processes.

pub mod annotation;
pub mod cache;
pub mod client;
pub mod context;
pub mod cosign;
pub mod digest;
pub mod disk;
pub mod dockerfile;
pub mod export;
pub mod host;
pub mod imagetools;
pub mod inputs;
pub mod oci;
pub mod platform;
pub mod proto;
pub mod provenance;
pub mod quic;
pub mod refusals;
pub mod registry;
pub mod scancache;
pub mod signing;
pub mod ssh;
pub mod tls;

pub use digest::Digest;
pub use platform::Platform;

/// farm's own version, reported in the handshake and by agents when they register.
pub const FARM_VERSION: &str = env!("CARGO_PKG_VERSION");
