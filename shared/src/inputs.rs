//! `farm build`'s input flags, parsed (**pure**): `--build-context NAME=DIR`, `--secret`
//! (`id=ID,src=FILE`, `id=ID,env=VAR`, `type=env,id=ID`), `--network default|none|host` and
//! `--add-host HOST:IP`, as buildx spells them. Each error names the flag, what was wrong and the
//! fix; everything is checked before anything is uploaded.

use std::net::IpAddr;
use std::path::PathBuf;

/// Named contexts farm's agents give buildah themselves start so (natively built stages).
pub const RESERVED_CONTEXT_PREFIX: &str = "farm-native-";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

fn err(msg: String) -> InputError {
    InputError(msg)
}

/// `--build-context NAME=DIR`: the name the Dockerfile uses (`COPY --from=NAME`,
/// `RUN --mount=...,from=NAME`, `FROM NAME`) and a local directory.
pub fn parse_build_context(flag: &str) -> Result<(String, PathBuf), InputError> {
    let Some((name, value)) = flag.split_once('=') else {
        return Err(err(format!("--build-context {flag:?}: expected NAME=DIR, e.g. --build-context extra=./extra")));
    };
    if name.is_empty() {
        return Err(err(format!("--build-context {flag:?}: the name is empty; use NAME=DIR")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:@".contains(&b)) {
        return Err(err(format!(
            "--build-context {flag:?}: the name may hold letters, digits, '-', '_', '.', '/', ':' and '@'"
        )));
    }
    if name.to_ascii_lowercase().starts_with(RESERVED_CONTEXT_PREFIX) {
        return Err(err(format!(
            "--build-context {flag:?}: names starting {:?} are farm's own; choose another name",
            RESERVED_CONTEXT_PREFIX
        )));
    }
    if value.is_empty() {
        return Err(err(format!("--build-context {flag:?}: no directory after '='; use NAME=DIR")));
    }
    if let Some((scheme, _)) = value.split_once("://") {
        return Err(err(format!(
            "--build-context {flag:?}: farm takes only local directories as named contexts, not {scheme}:// \
             (for an image, name it in the Dockerfile: FROM IMAGE AS {name})"
        )));
    }
    Ok((name.to_string(), PathBuf::from(value)))
}

/// Where a `--secret`'s value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    /// The name of an environment variable of the `farm build` process.
    Env(String),
}

/// One `--secret`, parsed (its value not read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFlag {
    pub id: String,
    pub source: SecretSource,
    /// The flag as given, for messages.
    flag: String,
}

const SECRET_FORMS: &str = "id=ID,src=FILE, id=ID,env=VAR or type=env,id=ID";

/// `--secret` as buildx takes it: `id=ID,src=FILE` (`source=` too; `type=file` optional),
/// `id=ID,env=VAR`, `type=env,id=ID` (the variable named like the id) or `type=env,id=ID,env=VAR`.
pub fn parse_secret(flag: &str) -> Result<SecretFlag, InputError> {
    let expected = || err(format!("--secret {flag:?}: expected {SECRET_FORMS}"));
    let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
    for part in flag.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            Some(("env", v)) => env = Some(v.to_string()),
            Some(("type", v)) => kind = Some(v.to_string()),
            _ => return Err(expected()),
        }
    }
    let Some(id) = id else { return Err(expected()) };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(err(format!("--secret {flag:?}: the id may hold letters, digits, '-', '_' and '.'")));
    }
    let source = match (kind.as_deref(), src, env) {
        (Some("file") | None, Some(src), None) => SecretSource::File(src),
        (Some("env") | None, None, Some(var)) => SecretSource::Env(var),
        (Some("env"), None, None) => SecretSource::Env(id.clone()),
        (Some("file" | "env") | None, Some(_), Some(_)) => {
            return Err(err(format!("--secret {flag:?}: give either src=FILE or env=VAR, not both")))
        }
        (Some("file"), None, Some(_)) | (Some("env"), Some(_), None) => {
            return Err(err(format!("--secret {flag:?}: type=file takes src=FILE, type=env takes env=VAR")))
        }
        (Some(other), _, _) if other != "file" && other != "env" => {
            return Err(err(format!("--secret {flag:?}: unknown type {other:?}: farm takes type=file or type=env")))
        }
        _ => return Err(expected()),
    };
    if let SecretSource::Env(var) = &source {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            return Err(err(format!("--secret {flag:?}: env= needs the name of an environment variable")));
        }
    }
    Ok(SecretFlag { id, source, flag: flag.to_string() })
}

impl SecretFlag {
    /// The secret's bytes: the file's, or the variable's from `env` (the process environment, or
    /// a map in tests). An unset variable or unreadable file is refused, naming the flag and the fix.
    pub fn read(&self, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Vec<u8>, InputError> {
        match &self.source {
            SecretSource::File(path) => std::fs::read(path)
                .map_err(|e| err(format!("--secret {}: cannot read {}: {e}", self.id, path.display()))),
            SecretSource::Env(var) => match env(var) {
                Some(v) => Ok(std::os::unix::ffi::OsStringExt::into_vec(v)),
                None => Err(err(format!(
                    "--secret {}: the environment variable {var} is not set; set it (export {var}=...) or pass the \
                     secret from a file: --secret id={},src=FILE",
                    self.flag, self.id
                ))),
            },
        }
    }
}

/// `--network`: `default` (the build's own network with outbound access), `none` (only
/// loopback) or `host` (the agent host's; the `network.host` entitlement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Default,
    None,
    Host,
}

pub fn parse_network(value: &str) -> Result<Network, InputError> {
    match value {
        "default" => Ok(Network::Default),
        "none" => Ok(Network::None),
        "host" => Ok(Network::Host),
        other => Err(err(format!(
            "--network {other:?}: farm takes default (the build's own network), none (no network) or host (the \
             agent host's)"
        ))),
    }
}

/// `--add-host HOST:IP` (docker's `HOST=IP` too): an `/etc/hosts` line for RUN steps.
pub fn parse_add_host(flag: &str) -> Result<(String, String), InputError> {
    let split = match (flag.find('='), flag.find(':')) {
        (Some(e), Some(c)) => Some(e.min(c)),
        (Some(i), None) | (None, Some(i)) => Some(i),
        (None, None) => None,
    };
    let Some(at) = split else {
        return Err(err(format!("--add-host {flag:?}: expected HOST:IP, e.g. --add-host db.internal:10.1.2.3")));
    };
    let (host, ip) = (&flag[..at], &flag[at + 1..]);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !host.starts_with(['-', '.']);
    if !host_ok {
        return Err(err(format!(
            "--add-host {flag:?}: {host:?} is not a host name (letters, digits, '-', '_' and '.'); use HOST:IP"
        )));
    }
    let ip_text = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(ip);
    match ip_text.parse::<IpAddr>() {
        Ok(addr) => Ok((host.to_string(), addr.to_string())),
        Err(_) if ip == "host-gateway" => Err(err(format!(
            "--add-host {flag:?}: farm cannot resolve host-gateway (each agent has its own); give an IP address"
        ))),
        Err(_) => {
            Err(err(format!("--add-host {flag:?}: {ip:?} is not an IP address; use HOST:IP, e.g. {host}:10.1.2.3")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e<T: std::fmt::Debug>(r: Result<T, InputError>) -> String {
        r.unwrap_err().0
    }

    #[test]
    fn build_contexts() {
        assert_eq!(parse_build_context("extra=./x").unwrap(), ("extra".to_string(), PathBuf::from("./x")));
        assert_eq!(parse_build_context("a=b=c").unwrap(), ("a".to_string(), PathBuf::from("b=c")));
        assert_eq!(
            e(parse_build_context("extra")),
            "--build-context \"extra\": expected NAME=DIR, e.g. --build-context extra=./extra"
        );
        assert_eq!(e(parse_build_context("=dir")), "--build-context \"=dir\": the name is empty; use NAME=DIR");
        assert_eq!(
            e(parse_build_context("extra=")),
            "--build-context \"extra=\": no directory after '='; use NAME=DIR"
        );
        assert_eq!(
            e(parse_build_context("a b=dir")),
            "--build-context \"a b=dir\": the name may hold letters, digits, '-', '_', '.', '/', ':' and '@'"
        );
        assert_eq!(
            e(parse_build_context("base=docker-image://alpine:3.18")),
            "--build-context \"base=docker-image://alpine:3.18\": farm takes only local directories as named \
             contexts, not docker-image:// (for an image, name it in the Dockerfile: FROM IMAGE AS base)"
        );
        assert_eq!(
            e(parse_build_context("farm-native-x=dir")),
            "--build-context \"farm-native-x=dir\": names starting \"farm-native-\" are farm's own; choose another \
             name"
        );
    }

    #[test]
    fn secrets() {
        let file = parse_secret("id=tok,src=/f").unwrap();
        assert_eq!((file.id.as_str(), &file.source), ("tok", &SecretSource::File("/f".into())));
        assert_eq!(parse_secret("type=file,id=tok,source=/f").unwrap().source, SecretSource::File("/f".into()));
        assert_eq!(parse_secret("id=tok,env=TOKVAR").unwrap().source, SecretSource::Env("TOKVAR".into()));
        // buildx: type=env without env= reads the variable named like the id.
        assert_eq!(parse_secret("type=env,id=TOK").unwrap().source, SecretSource::Env("TOK".into()));
        assert_eq!(parse_secret("type=env,id=tok,env=V").unwrap().source, SecretSource::Env("V".into()));
        assert_eq!(
            e(parse_secret("id=tok")),
            "--secret \"id=tok\": expected id=ID,src=FILE, id=ID,env=VAR or type=env,id=ID"
        );
        assert_eq!(
            e(parse_secret("src=/f")),
            "--secret \"src=/f\": expected id=ID,src=FILE, id=ID,env=VAR or type=env,id=ID"
        );
        assert_eq!(
            e(parse_secret("id=tok,src=/f,env=V")),
            "--secret \"id=tok,src=/f,env=V\": give either src=FILE or env=VAR, not both"
        );
        assert_eq!(
            e(parse_secret("type=file,id=tok,env=V")),
            "--secret \"type=file,id=tok,env=V\": type=file takes src=FILE, type=env takes env=VAR"
        );
        assert_eq!(
            e(parse_secret("type=ssh,id=tok")),
            "--secret \"type=ssh,id=tok\": unknown type \"ssh\": farm takes type=file or type=env"
        );
        assert_eq!(
            e(parse_secret("id=a/b,env=V")),
            "--secret \"id=a/b,env=V\": the id may hold letters, digits, '-', '_' and '.'"
        );
    }

    #[test]
    fn env_secrets_read_the_variable_and_an_unset_one_is_refused() {
        let env = |k: &str| (k == "TOKVAR").then(|| std::ffi::OsString::from("s3cret"));
        assert_eq!(parse_secret("id=tok,env=TOKVAR").unwrap().read(env).unwrap(), b"s3cret");
        assert_eq!(
            e(parse_secret("type=env,id=tok").unwrap().read(env)),
            "--secret type=env,id=tok: the environment variable tok is not set; set it (export tok=...) or pass \
             the secret from a file: --secret id=tok,src=FILE"
        );
        assert!(e(parse_secret("id=tok,src=/nonexistent/x").unwrap().read(env))
            .starts_with("--secret tok: cannot read /nonexistent/x: "));
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("none").unwrap(), Network::None);
        assert_eq!(parse_network("host").unwrap(), Network::Host);
        assert_eq!(parse_network("default").unwrap(), Network::Default);
        assert_eq!(
            e(parse_network("bridge")),
            "--network \"bridge\": farm takes default (the build's own network), none (no network) or host (the \
             agent host's)"
        );
    }

    #[test]
    fn add_hosts() {
        let ok = |s: &str| parse_add_host(s).unwrap();
        assert_eq!(ok("db.internal:10.1.2.3"), ("db.internal".into(), "10.1.2.3".into()));
        assert_eq!(ok("db=10.1.2.3"), ("db".into(), "10.1.2.3".into()));
        assert_eq!(ok("v6:fd00::1"), ("v6".into(), "fd00::1".into()));
        assert_eq!(ok("v6:[fd00::1]"), ("v6".into(), "fd00::1".into()));
        assert_eq!(
            e(parse_add_host("db.internal")),
            "--add-host \"db.internal\": expected HOST:IP, e.g. --add-host db.internal:10.1.2.3"
        );
        assert_eq!(
            e(parse_add_host("db:10.1.2.300")),
            "--add-host \"db:10.1.2.300\": \"10.1.2.300\" is not an IP address; use HOST:IP, e.g. db:10.1.2.3"
        );
        assert_eq!(
            e(parse_add_host(":10.1.2.3")),
            "--add-host \":10.1.2.3\": \"\" is not a host name (letters, digits, '-', '_' and '.'); use HOST:IP"
        );
        assert_eq!(
            e(parse_add_host("gw:host-gateway")),
            "--add-host \"gw:host-gateway\": farm cannot resolve host-gateway (each agent has its own); give an IP \
             address"
        );
    }
}
