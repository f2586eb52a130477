//! Flags, as clap structs. Every value that a config file can also set is an `Option` here, so
//! that "given on the command line or in the environment" can win over the file.
//!
//! The doc comments here are clap's help text, written for a terminal (`[:TAG]`, `<os>`), not
//! for rustdoc, which would read them as links and HTML tags.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "farm",
    version,
    about = "A distributed build farm for multi-architecture container images",
    long_about = "farm builds one container image for many platforms by sending each platform's build to a \
machine that runs it natively (x86_64 boxes, Raspberry Pis, Jetsons, Graviton), falling back to QEMU \
emulation only where no native machine is connected, and stitches the results into one image index.\n\n\
Peers talk QUIC with mutual TLS; every certificate comes from the farm's own CA (`farm ca`)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage the farm's certificate authority and issue identities
    #[command(subcommand)]
    Ca(CaCommand),
    /// The farm's image signing key (cosign's formats): create one, print its public key
    #[command(subcommand)]
    Signing(SigningCommand),
    /// Run the coordinator: accepts agents and clients, schedules builds
    Coordinator(CoordinatorArgs),
    /// Run an agent on this machine: registers its platforms and builds what it is given
    ///
    /// `farm agent join --token T --coordinator ADDR` first enrolls this machine with a join token.
    Agent(Box<AgentArgs>),
    /// List the agents the coordinator knows, with their platforms and state; `revoke NAME` throws one out
    Agents(AgentsArgs),
    /// Create or revoke join tokens (admins)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Join the farm as a client with a token, and remember the coordinator and identity
    Login(JoinArgs),
    /// Build an image for several platforms on the farm and push one image index
    ///
    /// Without a configured coordinator, runs a coordinator and an agent inside this process
    /// (this machine's native platform plus whatever its QEMU handlers emulate).
    Build(Box<BuildArgs>),
    /// List recent builds with the state of each platform
    Builds(BuildsArgs),
    /// Print a build's log (stored on the coordinator), optionally following it live
    Logs(LogsArgs),
    /// Stop every task of a build on its agent and mark the build cancelled
    Cancel(CancelArgs),
    /// Print a one-time link (valid 60 s) that logs this identity into the coordinator's web dashboard
    Dashboard(DashboardArgs),
    /// Look at images in a registry (as `docker buildx imagetools`)
    #[command(subcommand)]
    Imagetools(ImagetoolsCommand),
}

#[derive(Subcommand, Debug)]
pub enum SigningCommand {
    /// Create the signing key (ECDSA P-256, signing.key, mode 0600) in an existing CA directory;
    /// refuses to replace one (`farm ca init` already makes it)
    Init {
        /// Directory holding the farm CA, on the coordinator's machine
        #[arg(long, env = "FARM_CA_DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the public key as PEM, for `cosign verify --key farm.pub`
    PublicKey {
        /// Directory holding the farm CA and its signing key
        #[arg(long, env = "FARM_CA_DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImagetoolsCommand {
    /// Show an image's index and each platform's manifest (digest, size, platform, annotations),
    /// and, when a coordinator answers, how farm built each platform (agent, native, emulated or
    /// cached, when)
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The image: REGISTRY/REPOSITORY[:TAG][@DIGEST]
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Output format: text for people, json for scripts
    #[arg(long, value_enum, default_value_t = InspectFormat::Text)]
    pub format: InspectFormat,
    /// A registry to reach over plain HTTP, HOST:PORT (repeatable); all others use HTTPS
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Check the image's cosign signature with this public key (`farm signing public-key`
    /// prints the farm's): verified, unsigned or NOT verified
    #[arg(long, value_name = "PUBLIC_KEY_FILE")]
    pub key: Option<std::path::PathBuf>,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum InspectFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct BuildsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How many builds, newest first
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Output format: a table for people, json for scripts
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The build's id, as `farm build` and `farm builds` print it
    pub build: String,
    /// Only this platform's lines
    #[arg(long)]
    pub platform: Option<String>,
    /// Keep printing new lines until the build ends
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The build's id
    pub build: String,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a new farm CA, the coordinator's certificate and an admin client identity
    Init {
        /// Directory to create the CA in (must not already hold one)
        #[arg(long, env = "FARM_CA_DIR")]
        dir: Option<PathBuf>,
        /// Extra name or IP address the coordinator is reached at (repeatable); localhost,
        /// 127.0.0.1, ::1 and this host's name are always included
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Issue a certificate for an agent or a client, signed by the farm CA
    Issue {
        /// Directory holding the farm CA (ca.crt, ca.key)
        #[arg(long, env = "FARM_CA_DIR")]
        dir: Option<PathBuf>,
        /// What the holder may do: agent (builds), client (submits builds), admin (client + administration)
        #[arg(long)]
        role: String,
        /// The holder's name: lowercase letters, digits, '.', '_', '-'
        #[arg(long)]
        name: String,
        /// Replace an existing certificate of that name
        #[arg(long)]
        force: bool,
    },
}

/// Where a config file is read from.
#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// TOML config file; flags and FARM_* environment variables override it
    #[arg(long, env = "FARM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// UDP address to listen on [default: 127.0.0.1:3276]
    #[arg(long, env = "FARM_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory holding ca.crt and coordinator.crt/.key (from `farm ca init`)
    #[arg(long, env = "FARM_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Directory for the coordinator's state
    #[arg(long, env = "FARM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds without a heartbeat before an agent is offline [default: 15]
    #[arg(long, env = "FARM_HEARTBEAT_TIMEOUT", value_name = "SECS")]
    pub heartbeat_timeout: Option<f64>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new join token for `farm agent join` or `farm login`
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// What the joiner becomes: agent, client or admin
        #[arg(long)]
        role: String,
        /// How long the token is valid, e.g. 30m, 24h, 7d [default: 24h]
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// How many times it can be used [default: unlimited until it expires]
        #[arg(long)]
        uses: Option<u32>,
    },
    /// Make a token unusable
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The token's id (the third part of the token, also printed by `farm token create`)
        id: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    /// The join token from `farm token create`
    #[arg(long, env = "FARM_TOKEN")]
    pub token: String,
    /// Coordinator address, HOST:PORT
    #[arg(long, env = "FARM_COORDINATOR", value_name = "ADDR")]
    pub coordinator: String,
    /// The name to join as [default: the host name for agents, $USER for clients]
    #[arg(long)]
    pub name: Option<String>,
    /// Where to store the certificate and key [default: ~/.config/farm]
    #[arg(long, env = "FARM_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Enroll this machine as an agent with a join token; then run `farm agent`
    Join(JoinArgs),
    /// Empty this agent's layer cache (its buildah storage, or the Docker Engine's build cache); run it while the agent is stopped
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's work directory
        #[arg(long, env = "FARM_WORK_DIR", value_name = "DIR")]
        work_dir: Option<PathBuf>,
        #[command(flatten)]
        builder: BuilderArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// Revoke an agent's (or client's) certificate: its connections are closed and it cannot return
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The identity's name
        #[arg(value_name = "NAME")]
        identity: String,
        /// Revoke the name even if it has never connected (e.g. a stolen certificate)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Coordinator address, HOST:PORT [default: 127.0.0.1:3276]
    #[arg(long, env = "FARM_COORDINATOR", value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory holding ca.crt and this agent's NAME.crt/.key
    #[arg(long, env = "FARM_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// This agent's name, as in its certificate [default: the host name]
    #[arg(long, env = "FARM_NAME")]
    pub name: Option<String>,
    /// Directory for contexts and builder storage
    #[arg(long, env = "FARM_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// A label KEY=VALUE that builds can require, e.g. gpu=nvidia or board=pi4 (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Concurrent builds this agent accepts [default: from the host: cores + 1, at most one per GiB of memory]
    #[arg(long)]
    pub capacity: Option<u32>,
    /// Native platform, replacing detection (repeatable or comma-separated); for hosts where detection is wrong
    #[arg(long, value_name = "PLATFORM")]
    pub native: Vec<String>,
    /// Emulated platform, replacing detection (repeatable or comma-separated; `none` for no emulation)
    #[arg(long, value_name = "PLATFORM")]
    pub emulated: Vec<String>,
    /// Where binfmt_misc is mounted [default: /proc/sys/fs/binfmt_misc]
    #[arg(long, value_name = "DIR")]
    pub binfmt_dir: Option<PathBuf>,
    /// On SIGTERM, seconds running tasks may take to finish before they are handed back [default: 120]
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<f64>,
    /// Disk the layer cache may use, in GiB; the oldest images go first when it is exceeded [default: 20]
    #[arg(long, value_name = "GIB")]
    pub cache_limit_gb: Option<f64>,
    /// Memory each build may use, e.g. 512MiB, 2GiB or 1.5G; a build that needs more fails [default: no limit; buildah only]
    #[arg(long, env = "FARM_MEMORY_LIMIT", value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Let builds ask for the host's network (`farm build --network host`) [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_host_network: Option<bool>,
    /// Let builds ask for every capability and no seccomp (`--allow security.insecure`) [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_insecure: Option<bool>,
    #[command(flatten)]
    pub builder: BuilderArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BuilderArgs {
    /// The builder: buildah or docker [default: buildah if installed, else a Docker Engine that answers]
    #[arg(long, env = "FARM_BUILDER", value_name = "buildah|docker")]
    pub builder: Option<String>,
    /// The Docker Engine to build with, unix:///PATH or tcp://HOST:PORT [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long, env = "FARM_DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Coordinator address, HOST:PORT [default: from ~/.config/farm/config.toml, else 127.0.0.1:3276]
    #[arg(long, env = "FARM_COORDINATOR", value_name = "ADDR")]
    pub coordinator: Option<String>,
    /// Directory holding ca.crt and your NAME.crt/.key
    #[arg(long, env = "FARM_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Your identity's name [default: admin]
    #[arg(long, env = "FARM_NAME")]
    pub name: Option<String>,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub command: Option<AgentsCommand>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format: a table for people, json for scripts
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Progress {
    /// A live view on a terminal, plain lines otherwise
    Auto,
    /// One line per event, prefixed with the platform
    Plain,
    /// One JSON object per event on stdout
    Json,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum EmulationArg {
    /// Use QEMU only for platforms no connected native agent runs
    Fallback,
    /// Never emulate: wait for a native agent
    Never,
    /// The agent expected to finish first, native or emulated, from the durations farm recorded
    /// for this context (native-first until it has some)
    Fastest,
}

/// Which local image store `--load` fills.
#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LoadInto {
    /// containers-storage, where podman and buildah find images (`skopeo copy ... containers-storage:`)
    Podman,
    /// The local Docker Engine (`skopeo copy ... docker-daemon:`)
    Docker,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Target platforms, comma-separated or repeated (e.g. linux/amd64,linux/arm64,linux/arm/v7)
    /// [default: this machine's platform]
    #[arg(long = "platform", value_name = "PLATFORMS")]
    pub platforms: Vec<String>,
    /// Image reference to push the result as, REGISTRY/REPOSITORY:TAG (repeatable, one repository)
    #[arg(short = 't', long = "tag", value_name = "REF")]
    pub tags: Vec<String>,
    /// The Dockerfile [default: CONTEXT/Dockerfile]
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Build-time variable KEY=VALUE, or KEY to take its value from the environment (repeatable)
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// The build stage to build
    #[arg(long)]
    pub target: Option<String>,
    /// Do not use cached layers
    #[arg(long)]
    pub no_cache: bool,
    /// Export each platform's layer cache to a registry: type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]
    /// (each platform under REPOSITORY/<os>-<arch>); default: the coordinator's cache_repo
    #[arg(long = "cache-to", value_name = "type=registry,ref=REF")]
    pub cache_to: Option<String>,
    /// Import layer cache from a registry: type=registry,ref=REF or REF (repeatable); default: the
    /// coordinator's cache_repo
    #[arg(long = "cache-from", value_name = "type=registry,ref=REF")]
    pub cache_from: Vec<String>,
    /// How to show progress
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
    /// Whether platforms without a native agent may be built under QEMU
    #[arg(long, value_enum, default_value_t = EmulationArg::Fallback)]
    pub emulation: EmulationArg,
    /// Only use agents with this label KEY=VALUE, e.g. gpu=nvidia (repeatable)
    #[arg(long = "require", value_name = "KEY=VALUE")]
    pub require: Vec<String>,
    /// A secret for `RUN --mount=type=secret,id=ID`: id=ID,src=FILE, id=ID,env=VAR or
    /// type=env,id=ID (the variable named like the id) (repeatable); it reaches the RUN that
    /// mounts it, never a layer, a log or the coordinator's disk
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,
    /// SSH agent socket or keys for `RUN --mount=type=ssh[,id=ID]`: default (your agent,
    /// $SSH_AUTH_SOCK), ID, ID=SOCKET or ID=KEYFILE[,KEYFILE] (repeatable); the keys stay on this
    /// machine: the build's agents relay the ssh-agent protocol to it while the build is followed
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET|KEYFILE]")]
    pub ssh: Vec<String>,
    /// A named context for `COPY --from=NAME`, `RUN --mount=...,from=NAME` and `FROM NAME`:
    /// NAME=DIR, a local directory (repeatable); uploaded like the main context, honouring
    /// DIR/.dockerignore
    #[arg(long = "build-context", value_name = "NAME=DIR")]
    pub build_contexts: Vec<String>,
    /// Pull every base image again, even if the agent already holds its tag
    #[arg(long)]
    pub pull: bool,
    /// The network of RUN steps: `default` (their own, with outbound access but not the agent's
    /// loopback), `none` (no network, only loopback) or `host` (the agent host's; needs an agent
    /// with allow_host_network = true)
    #[arg(long, value_name = "default|none|host", default_value = "default")]
    pub network: String,
    /// An /etc/hosts entry for RUN steps, HOST:IP (repeatable)
    #[arg(long = "add-host", value_name = "HOST:IP")]
    pub add_hosts: Vec<String>,
    /// Tell URL when the build ends: the coordinator POSTs a JSON notice (id, result, tags,
    /// index digest, each platform's agent, placement and duration), retried with backoff
    /// (repeatable)
    #[arg(long = "notify", value_name = "URL")]
    pub notify: Vec<String>,
    /// An entitlement beyond the sandbox: network.host, security.insecure (repeatable); only
    /// agents whose config allows it (allow_host_network, allow_insecure) take the build
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,
    /// A registry to reach over plain HTTP, HOST:PORT (repeatable); all others use HTTPS
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Print how long each phase of each platform took (context sync, materialise, build,
    /// export, push) and the index push
    #[arg(long)]
    pub timings: bool,
    /// Push the result to the registry -t names (buildx's shorthand for -o type=registry; the
    /// default when -t names a registry and no other output is given)
    #[arg(long)]
    pub push: bool,
    /// Sign the pushed image index with the farm's key, in cosign's format (`cosign verify --key
    /// farm.pub` checks it; `farm signing public-key` prints the key). Needs a registry output
    #[arg(long)]
    pub sign: bool,
    /// Where the image goes, as buildx spells it (repeatable): type=registry (push to the
    /// registry -t names), type=oci,dest=FILE (an OCI layout archive of every platform; dest=- for
    /// stdout; dest=DIR,tar=false for a directory), type=local,dest=DIR (each platform's root
    /// filesystem in DIR/linux_amd64/...; one platform: in DIR), type=tar,dest=FILE (the same as a
    /// tar). Without a registry output nothing is pushed anywhere: the results come back through
    /// the coordinator
    #[arg(short = 'o', long = "output", value_name = "type=TYPE,dest=PATH")]
    pub outputs: Vec<String>,
    /// Load the image for this machine's platform (or the one --platform names) into the local
    /// image store: podman/buildah's containers-storage (the default, `--load`), or the Docker
    /// Engine's (`--load=docker`); -t names it
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "podman", value_name = "podman|docker")]
    pub load: Option<LoadInto>,
    /// Write the build's result as JSON to FILE (buildx's keys: containerimage.digest,
    /// containerimage.descriptor, image.name, buildx.build.ref; farm.build.ref and per platform
    /// farm.platforms); with --wait=false: the build id and "status": "pending"
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// Write the image index digest to FILE
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,
    /// An annotation, as buildx spells it (repeatable): KEY=VALUE (on every platform's manifest),
    /// index:KEY=VALUE (the image index), manifest-descriptor:KEY=VALUE (the index's entries),
    /// index-descriptor:KEY=VALUE (-o type=oci's index.json); several types comma-separated
    /// (index,manifest:KEY=VALUE); a platform filter for the manifest types:
    /// 'manifest[linux/arm64,linux/amd64]:KEY=VALUE'
    #[arg(long = "annotation", value_name = "[TYPE[PLATFORMS]:]KEY=VALUE")]
    pub annotations: Vec<String>,
    /// An image config label KEY=VALUE, on every platform's image (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// SLSA provenance v1 for each platform (on by default, mode=min): `--provenance=false` turns
    /// it off, `--provenance mode=max` adds the Dockerfile's text; buildx's `true`, `mode=min`,
    /// `disabled=true` work too
    #[arg(long, value_name = "false|true|mode=min|mode=max")]
    pub provenance: Option<String>,
    /// buildx's `--attest type=provenance[,mode=max][,disabled=true]` (provenance only)
    #[arg(long = "attest", value_name = "type=provenance[,mode=min|max]")]
    pub attest: Vec<String>,
    /// Wait for the build to end (`--wait=false`: print the build id and return at once)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub wait: bool,
    /// Build on this machine alone (a coordinator and an agent inside this command), even if a
    /// coordinator is configured or answering at 127.0.0.1:3276
    #[arg(long)]
    pub embedded: bool,
    /// The build context: a directory, or - for a tar on stdin (as `docker build -`; -f then
    /// names the Dockerfile inside it). `-f -` reads the Dockerfile from stdin instead
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
}

/// buildx flags `farm build` does not have, and what to do instead.
const BUILDX_FLAGS: &[(&str, &str)] = &[
    ("--builder", "farm picks agents itself; use --require KEY=VALUE to choose by label"),
    ("--sbom", "farm does not attach SBOMs yet"),
    ("--quiet", "use --progress plain or json"),
    ("--shm-size", "not supported"),
    ("--ulimit", "not supported"),
    ("--cgroup-parent", "not supported"),
    ("--no-cache-filter", "use --no-cache"),
];

/// A clear refusal for a `docker buildx build` flag that `farm build` lacks (clap would suggest
/// passing it as a value).
pub fn unsupported_buildx_flag(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else { return None };
    let flag = arg.split('=').next().unwrap_or(arg);
    let flag = match flag {
        "-q" => "--quiet",
        f => f,
    };
    let (_, instead) = BUILDX_FLAGS.iter().find(|(f, _)| *f == flag)?;
    Some(format!(
        "farm build has no {flag} (a docker buildx build flag): {instead}; `farm build --help` lists its flags"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn buildx_flags_farm_lacks_are_named() {
        use clap::Parser;
        let e = super::Cli::try_parse_from(["farm", "build", "--shm-size", "1g", "."]).unwrap_err();
        assert_eq!(
            super::unsupported_buildx_flag(&e).unwrap(),
            "farm build has no --shm-size (a docker buildx build flag): not supported; \
             `farm build --help` lists its flags"
        );
        let e = super::Cli::try_parse_from(["farm", "build", "--sbom=true", "."]).unwrap_err();
        assert!(super::unsupported_buildx_flag(&e).unwrap().starts_with("farm build has no --sbom "));
        let e = super::Cli::try_parse_from(["farm", "build", "--nonsense", "."]).unwrap_err();
        assert_eq!(super::unsupported_buildx_flag(&e), None);
        assert!(super::Cli::try_parse_from(["farm", "build", "--push", "-t", "r:5000/a:1", "."]).is_ok());
        for ok in [
            &["farm", "build", "-o", "type=oci,dest=x.tar", "--load", "."][..],
            &["farm", "build", "--load=docker", "--metadata-file", "m.json", "--iidfile", "i", "."],
            &[
                "farm",
                "build",
                "--build-context",
                "extra=x",
                "--pull",
                "--network",
                "none",
                "--add-host",
                "db:10.1.2.3",
                "--secret",
                "type=env,id=TOK",
                "-",
            ],
        ] {
            assert!(super::Cli::try_parse_from(ok).is_ok(), "{ok:?}");
        }
    }
}
