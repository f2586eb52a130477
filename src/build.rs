//! `farm build`: flags into a build spec, the context scanned and uploaded, the build followed
//! to its end. Everything that decides lives in the libraries; this is glue and output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shared::proto::{BuildEvent, BuildSpec, Emulation};
use shared::Platform;

use crate::cli::{BuildArgs, EmulationArg, Progress};
use crate::progress::{self, View};
use crate::{config, embedded, output};

pub async fn run(args: BuildArgs) -> Result<()> {
    let file = config::load(args.client.config.config.as_deref(), true)?;
    let insecure_from_file = file.insecure_registries.clone();
    let platforms = match config::platforms(&args.platforms)? {
        Some(p) if !p.is_empty() => p,
        _ => vec![host_platform()?],
    };
    // Every flag is checked before anything is sent.
    let plan = crate::results::plan(&args, &platforms)?;
    if plan.registry {
        if args.tags.is_empty() {
            bail!(
                "no tag given: pass -t REGISTRY/REPOSITORY:TAG to push to a registry, or choose an output that needs \
                 none: -o type=oci,dest=FILE, -o type=local,dest=DIR or --load"
            );
        }
        for t in &args.tags {
            let r = t.parse::<shared::oci::ImageRef>()?;
            if !shared::oci::names_registry(t) {
                let name = r.repository.strip_prefix("library/").unwrap_or(&r.repository);
                let tag = r.tag.as_deref().map(|t| format!(":{t}")).unwrap_or_default();
                bail!(
                    "-t {t}: names no registry, so it would be pushed to Docker Hub; name yours (e.g. -t \
                     registry.lan:5000/{name}{tag}), write docker.io/... to mean Docker Hub, or choose an output that \
                     needs no registry: -o type=oci,dest=FILE, -o type=local,dest=DIR or --load"
                );
            }
        }
    }
    if args.sign && !plan.registry {
        bail!(
            "--sign signs the image in the registry it is pushed to, and this build pushes to none (-o type=oci, \
             local, tar or --load): push it with -t REGISTRY/REPOSITORY:TAG, or drop --sign (cosign sign --key can sign \
             an image you push later)"
        );
    }
    // Every flag is checked before anything is sent.
    let build_args = build_args(&args.build_args)?;
    let secrets = secrets(&args.secrets)?;
    let require = config::labels_flag(&BTreeMap::new(), &args.require, "--require")?;
    let network = shared::inputs::parse_network(&args.network)?;
    let entitlements = entitlements(network, &args.allow)?;
    let add_hosts = args.add_hosts.iter().map(|h| shared::inputs::parse_add_host(h)).collect::<Result<Vec<_>, _>>()?;
    let named = named_contexts(&args.build_contexts)?;
    if let Some(url) = args.notify.iter().find(|u| !u.starts_with("http://") && !u.starts_with("https://")) {
        bail!("--notify {url}: not an http:// or https:// URL; give the URL the coordinator should POST to when the build ends");
    }
    // `-`: the context is a tar on stdin (as `docker build -`); `-f -`: the Dockerfile is.
    let context_on_stdin = args.context.as_os_str() == "-";
    let dockerfile_on_stdin = args.file.as_deref().is_some_and(|f| f.as_os_str() == "-");
    if context_on_stdin && dockerfile_on_stdin {
        bail!("the context (-) and the Dockerfile (-f -) cannot both come from stdin: give one of them as a path");
    }
    if !args.ssh.is_empty() && !args.wait {
        bail!(
            "--ssh needs the command to follow the build (its ssh-agent answers through this command): drop \
             --wait=false, or use --secret for a key the build may hold"
        );
    }
    // Each id's socket, checked now; a key file gets a private ssh-agent for this build, stopped
    // when the command ends. Only the ids are sent.
    let ssh =
        shared::ssh::resolve(shared::ssh::parse(&args.ssh)?, std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from))?;
    let stdin_dir = match context_on_stdin || dockerfile_on_stdin {
        true => {
            Some(tempfile::Builder::new().prefix("farm-stdin-").tempdir().context("creating a temporary directory")?)
        }
        false => None,
    };
    let context = match &stdin_dir {
        Some(tmp) if context_on_stdin => {
            let dir = tmp.path().join("context");
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let into = dir.clone();
            tokio::task::spawn_blocking(move || shared::context::unpack_context_tar(std::io::stdin().lock(), &into))
                .await?
                .context("reading the build context (a tar) from stdin")?;
            dir
        }
        _ => args.context.clone(),
    };
    if !context.is_dir() {
        bail!("build context {} is not a directory (give a directory, or - for a tar on stdin)", context.display());
    }
    let (dockerfile, shown, stdin_text) = if dockerfile_on_stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading the Dockerfile (-f -) from stdin")?;
        (STDIN_DOCKERFILE.to_string(), "the Dockerfile from stdin".to_string(), Some(text))
    } else if context_on_stdin {
        let inside = args.file.as_deref().map(|f| f.to_string_lossy().into_owned()).unwrap_or("Dockerfile".into());
        (inside.clone(), format!("{inside} (in the context from stdin)"), None)
    } else {
        let shown = match &args.file {
            Some(f) => f.display().to_string(),
            None => context.join("Dockerfile").display().to_string(),
        };
        (dockerfile_in_context(&context, args.file.as_deref())?, shown, None)
    };
    let cache_to = match &args.cache_to {
        Some(v) => Some(shared::cache::CacheRef::parse_flag(v, "--cache-to")?.to_string()),
        None => None,
    };
    let cache_from = args
        .cache_from
        .iter()
        .map(|v| shared::cache::CacheRef::parse_flag(v, "--cache-from").map(|c| c.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut insecure = insecure_from_file;
    insecure.extend(args.insecure_registries.iter().cloned());
    let credentials = match args.tags.first().filter(|_| plan.registry) {
        Some(t) => {
            let registry = t.parse::<shared::oci::ImageRef>()?.registry;
            shared::registry::load_docker_credentials(&registry)
                .with_context(|| format!("reading registry credentials for {registry}"))?
        }
        None => None,
    };
    // To read back the pushed index's size for --metadata-file (provenance adds entries the
    // CLI cannot make itself).
    let pushed_registry = plan.registry.then(|| shared::registry::Registry::new(&insecure, credentials.clone()));

    let scan_root = context.clone();
    let df = dockerfile.clone();
    let from_stdin = stdin_text.clone().zip(stdin_dir.as_ref().map(|d| d.path().join(STDIN_DOCKERFILE)));
    let scanned = tokio::task::spawn_blocking(move || match from_stdin {
        // The Dockerfile read from stdin joins the context as a file of its own.
        Some((text, path)) => {
            std::fs::write(&path, &text)
                .map_err(|source| shared::context::ContextError::Io { path: path.clone(), source })?;
            let mut scanned = shared::context::scan_dir(&scan_root)?;
            scanned.add_file(&df, text.as_bytes(), path)?;
            Ok(scanned)
        }
        None => shared::context::scan_cached(&scan_root, &df, shared::scancache::default_dir().as_deref()),
    })
    .await?
    .with_context(|| format!("reading the build context {}", context.display()))?;
    let mut named_scans = Vec::new();
    for (name, dir) in &named {
        let root = dir.clone();
        let scanned = tokio::task::spawn_blocking(move || shared::context::scan_dir(&root))
            .await?
            .with_context(|| format!("--build-context {name}={}: reading the directory", dir.display()))?;
        named_scans.push((name.clone(), scanned));
    }
    // The Dockerfile is read here, before anything is sent: its mistakes are found in a
    // moment, with file and line, not on every agent after the upload.
    let text = match &stdin_text {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(context.join(&dockerfile)).with_context(|| format!("reading {shown}"))?,
    };
    shared::dockerfile::parse(&text, &shown)?.check_target(args.target.as_deref(), &shown)?;

    // A coordinator configured, or one answering at the default address, means the farm; none
    // means a farm inside this process.
    let target = crate::target(&args.client, file);
    if args.embedded && target.configured && args.client.coordinator.is_some() {
        bail!("--embedded and --coordinator contradict each other: --embedded builds on this machine alone");
    }
    let remote = !args.embedded && (target.configured || crate::answers(&target.addr).await);
    if !remote && !args.wait {
        bail!(
            "--wait=false needs a coordinator (--coordinator or config): with none, the farm runs inside this command"
        );
    }
    let (local, client) = if remote {
        (None, crate::connect_to(&target).await?)
    } else {
        if !args.embedded {
            eprintln!("no coordinator configured or reachable: building on this machine (embedded farm)");
        }
        let farm = embedded::Embedded::start().await?;
        let creds = shared::tls::load_credentials(&farm.ca_dir, embedded::CLIENT)?;
        let client =
            shared::client::Client::connect(&farm.addr, &creds, &Default::default(), shared::proto::DEFAULT_MAX_FRAME)
                .await?;
        farm.wait_ready(&client).await?;
        (Some(farm), client)
    };

    // Checked once connected, before the upload: an agent can build the platform --load wants.
    if let Some(load) = &plan.load {
        crate::results::check_load_platform(&client, load, args.emulation == EmulationArg::Never).await?;
    }
    let mut view = View::new(args.progress, &platforms)?;
    let upload = client.upload_context(&scanned).await?;
    view.note(&format!(
        "context: {} ({}), uploaded {} ({})",
        plural(upload.files as u64, "file"),
        output::bytes(upload.total_bytes),
        plural(upload.blobs_sent, "file"),
        output::bytes(upload.bytes_sent)
    ));
    let mut contexts = Vec::new();
    for (name, scanned) in &named_scans {
        let upload = client.upload_context(scanned).await?;
        view.note(&format!(
            "context {name}: {} ({}), uploaded {} ({})",
            plural(upload.files as u64, "file"),
            output::bytes(upload.total_bytes),
            plural(upload.blobs_sent, "file"),
            output::bytes(upload.bytes_sent)
        ));
        contexts.push(shared::proto::NamedContext { name: name.clone(), context: scanned.manifest.digest() });
    }
    // Everything read from stdin is uploaded: its temporary copy goes.
    drop(stdin_dir);
    let provenance =
        shared::provenance::from_flags(args.provenance.as_deref(), &args.attest).map_err(anyhow::Error::msg)?;
    let spec = BuildSpec {
        platforms: platforms.clone(),
        // No tags: nothing is pushed; the results come back through the coordinator.
        tags: if plan.registry { args.tags.clone() } else { vec![] },
        dockerfile,
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        emulation: match args.emulation {
            EmulationArg::Fallback => Emulation::Fallback,
            EmulationArg::Never => Emulation::Never,
            EmulationArg::Fastest => Emulation::Fastest,
        },
        require,
        context: scanned.manifest.digest(),
        insecure_registries: insecure,
        credentials,
        secrets,
        entitlements,
        annotations: plan.annotations.clone(),
        labels: plan.labels.clone(),
        ssh: ssh.iter().map(|s| s.id.clone()).collect(),
        inputs: shared::proto::Inputs {
            contexts,
            pull: args.pull,
            no_network: network == shared::inputs::Network::None,
            add_hosts,
        },
        notify: args.notify.clone(),
        sign: args.sign,
        provenance,
        cache_to,
        cache_from,
    };
    // Answers the agents' connections to the --ssh sockets while the build is followed.
    let ssh_server =
        (!ssh.is_empty()).then(|| client.serve_ssh(ssh.iter().map(|s| (s.id.clone(), s.socket.clone())).collect()));
    let mut follow = client.build(spec).await?;
    let id = follow.build.clone();
    if !args.wait {
        if let Some(path) = &args.metadata_file {
            crate::results::write_atomically(path, &crate::results::pending_metadata(&id))?;
        }
        println!("{id}");
        eprintln!("build {id} accepted; follow it with `farm logs {id} -f`, cancel it with `farm cancel {id}`");
        client.finish().await;
        return Ok(());
    }
    view.note(&format!("build {id} accepted"));
    let mut failed_lines: BTreeMap<Platform, (String, Vec<String>)> = BTreeMap::new();
    let end = loop {
        let next = tokio::select! {
            e = follow.next() => e?,
            _ = tokio::signal::ctrl_c() => {
                view.finish();
                if remote {
                    eprintln!("\nbuild {id} keeps running on the farm; follow it with `farm logs {id} -f`, cancel it with `farm cancel {id}`");
                } else {
                    eprintln!("\nstopped: build {id} ran inside this command (no coordinator configured) and is abandoned");
                }
                std::process::exit(130);
            }
        };
        let Some(event) = next else {
            break None;
        };
        view.event(&event);
        match event {
            BuildEvent::PlatformFailed { platform, error, last_lines } => {
                failed_lines.insert(platform, (error, last_lines));
            }
            e if e.is_terminal() => break Some(e),
            _ => {}
        }
    };
    view.finish();
    let wall = view.elapsed();
    let delivered = match &end {
        Some(BuildEvent::Succeeded { index, platforms, .. }) => {
            Some(crate::results::deliver(&client, &plan, &args, &id, index, platforms, pushed_registry.as_ref()).await)
        }
        _ => None,
    };
    drop(ssh_server);
    client.finish().await;
    drop(local);
    drop(ssh);
    delivered.transpose()?;
    match end {
        Some(BuildEvent::Succeeded { index, tags, platforms, stitch_ms }) => {
            if args.progress != Progress::Json && !plan.stdout {
                println!("{}", output::build_summary(&index, &tags, &platforms, progress::mode, wall));
                if args.timings {
                    println!("{}", output::timings(&platforms, stitch_ms));
                }
            }
            Ok(())
        }
        Some(BuildEvent::Failed { error }) => {
            for (platform, (err, lines)) in &failed_lines {
                eprintln!("{platform} failed: {err}");
                if !lines.is_empty() {
                    eprintln!("last log lines of {platform}:");
                    for l in lines {
                        eprintln!("  {l}");
                    }
                }
            }
            bail!("build {} failed: {error}; no tag was pushed", follow.build)
        }
        Some(BuildEvent::Cancelled) => bail!("build {} was cancelled; no tag was pushed", follow.build),
        _ => bail!("the coordinator ended build {} without a result", follow.build),
    }
}

/// The platform this machine builds natively (buildx's default).
pub(crate) fn host_platform() -> Result<Platform> {
    let host = shared::host::detect(Path::new(shared::host::DEFAULT_BINFMT_DIR));
    host.native.into_iter().next().context("cannot tell this machine's platform; pass --platform")
}

/// The Dockerfile's path inside the context, as agents will find it.
fn dockerfile_in_context(context: &Path, file: Option<&Path>) -> Result<String> {
    let Some(file) = file else { return Ok("Dockerfile".into()) };
    let ctx = context.canonicalize().with_context(|| format!("build context {}", context.display()))?;
    let path: PathBuf =
        file.canonicalize().with_context(|| format!("Dockerfile {} not found (check -f)", file.display()))?;
    let rel = path.strip_prefix(&ctx).map_err(|_| {
        anyhow::anyhow!(
            "Dockerfile {} is outside the build context {}; move it inside",
            file.display(),
            context.display()
        )
    })?;
    Ok(rel.to_string_lossy().into_owned())
}

/// `KEY=VALUE`, or `KEY` alone to take the value from the environment, as docker does.
fn build_args(flags: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for f in flags {
        let (k, v) = match f.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(f) {
                Ok(v) => (f.clone(), v),
                Err(_) => continue,
            },
        };
        if k.is_empty() {
            bail!("--build-arg {f:?} has no name; use KEY=VALUE");
        }
        out.push((k, v));
    }
    Ok(out)
}

/// `--secret` as buildx takes it (`id=ID,src=FILE`, `id=ID,env=VAR`, `type=env,id=ID`), read
/// now: the bytes travel to the agent inside the mutual-TLS connection and are never written by
/// the coordinator.
fn secrets(flags: &[String]) -> Result<Vec<shared::proto::Secret>> {
    let mut out = Vec::new();
    for f in flags {
        let flag = shared::inputs::parse_secret(f)?;
        let value = flag.read(|k| std::env::var_os(k))?;
        out.push(shared::proto::Secret { id: flag.id, value });
    }
    Ok(out)
}

/// The name the Dockerfile read from stdin (`-f -`) has in the uploaded context.
const STDIN_DOCKERFILE: &str = ".farm-stdin.Dockerfile";

/// `--build-context NAME=DIR`, each a directory, no name twice.
fn named_contexts(flags: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for f in flags {
        let (name, dir) = shared::inputs::parse_build_context(f)?;
        if out.iter().any(|(n, _)| *n == name) {
            bail!("--build-context {name}: given twice; give each name once");
        }
        if !dir.is_dir() {
            bail!("--build-context {f}: {} is not a directory; name a local directory", dir.display());
        }
        out.push((name, dir));
    }
    Ok(out)
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `--network` and `--allow` as buildx takes them: `--network host` is the `network.host`
/// entitlement (so is `--allow network.host`).
fn entitlements(network: shared::inputs::Network, allow: &[String]) -> Result<Vec<shared::proto::Entitlement>> {
    use shared::proto::Entitlement;
    let mut out: Vec<Entitlement> = Vec::new();
    if network == shared::inputs::Network::Host {
        out.push(Entitlement::NetworkHost);
    }
    for a in allow.iter().flat_map(|a| a.split(',')) {
        let e: Entitlement = a.trim().parse().map_err(|e: String| anyhow::anyhow!("--allow: {e}"))?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    if network == shared::inputs::Network::None && out.contains(&Entitlement::NetworkHost) {
        bail!("--network none and --allow network.host contradict each other: give one");
    }
    out.sort();
    Ok(out)
}
