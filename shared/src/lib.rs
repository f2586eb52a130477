//! The common ground of farm: everything the coordinator, the agents and the CLI must agree on.
//!
//! - [`platform`]: OCI platforms (`linux/arm/v7`), parsed and normalised once, so that every side
//!   compares the same canonical values.
//! - [`host`]: what this machine runs natively and what it can emulate (pure parsers over uname,
//!   /proc/cpuinfo and binfmt_misc, plus a thin reader of the real files).
//! - [`proto`]: the only types that cross the wire, their framing and the version handshake.
//! - [`tls`]: the farm's certificate authority and the identities (name + role) it issues.
//! - [`quic`]: the only place that builds quinn endpoints; transport limits live here.
//! - [`client`]: the connecting side (handshake, one stream per request), for agents and the CLI.
//!
//! Architecture invariant: nothing in `platform`, `host` (parsers) or `proto` (framing) performs I/O;
//! they are plain functions tested without sockets or processes.

pub mod client;
pub mod digest;
pub mod host;
pub mod platform;
pub mod proto;
pub mod quic;
pub mod tls;

pub use digest::Digest;
pub use platform::Platform;

/// farm's own version, reported in the handshake and by agents when they register.
pub const FARM_VERSION: &str = env!("CARGO_PKG_VERSION");
