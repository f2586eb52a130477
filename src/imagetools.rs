//! `farm imagetools inspect`: glue. The registry is read as `farm build` pushes to it (plain
//! HTTP only for `--insecure-registry` and the config's `insecure_registries`, credentials from
//! ~/.docker/config.json); the coordinator, if one is configured or answers, is asked what it
//! knows of the image's builds. `shared::imagetools` does the work.

use anyhow::{Context, Result};
use shared::imagetools;
use shared::oci::ImageRef;
use shared::proto::{Request, Response};
use shared::registry::{load_docker_credentials, Registry};

use crate::cli::{InspectArgs, InspectFormat};
use crate::config;

pub async fn inspect(args: InspectArgs) -> Result<()> {
    let file = config::load(args.client.config.config.as_deref(), true)?;
    let r: ImageRef = args.reference.parse()?;
    let mut insecure = file.insecure_registries.clone();
    insecure.extend(args.insecure_registries.iter().cloned());
    let credentials = load_docker_credentials(&r.registry)
        .with_context(|| format!("reading registry credentials for {}", r.registry))?;
    let key = match &args.key {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--key {}: cannot read the public key file", path.display()))?,
        ),
        None => None,
    };
    let registry = Registry::new(&insecure, credentials);
    let mut found = imagetools::inspect(&registry, &r).await?;
    if let Some(pem) = &key {
        found.signature = Some(imagetools::check_signature(&registry, &r, &found.digest, pem).await);
    }

    // What farm knows: only if a coordinator is configured or answers here; silence otherwise.
    let target = crate::target(&args.client, file);
    if target.configured || crate::answers(&target.addr).await {
        match crate::connect_to(&target).await {
            Ok(client) => {
                let answer = client.request(&Request::ListBuilds { limit: 1000 }).await;
                client.finish().await;
                match answer {
                    Ok(Response::Builds(builds)) => imagetools::attach_builds(&mut found, &builds),
                    other => tracing::debug!("no build history from the coordinator: {other:?}"),
                }
            }
            Err(e) => tracing::debug!("no coordinator to ask about builds: {e:#}"),
        }
    }
    match args.format {
        InspectFormat::Text => print!("{}", imagetools::text(&found)),
        InspectFormat::Json => println!("{}", serde_json::to_string_pretty(&imagetools::json(&found))?),
    }
    Ok(())
}
