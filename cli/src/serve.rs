//! `sdlite serve`: the browser demo and model folders over plain HTTP on one origin (WebGPU
//! needs a secure context, which `127.0.0.1` is). GET and HEAD only:
//! - `/` and `/<file>`: the built page (`scripts/build-web.sh` writes `target/web/site`);
//! - `/models/index.json`: the model folders offered (the built-in models, or every folder
//!   under `--models` holding a `model_index.json`), with their files, sizes and a version tag
//!   (size and modification time) the page keys its Cache Storage entries by;
//! - `/models/<name>/<path>`: those files.

use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; keep it on loopback unless the page should be reachable from
    /// other machines.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The built page.
    #[arg(long, default_value = "target/web/site")]
    site: PathBuf,
    /// A folder of model folders offered to the page; the built-in models by default.
    #[arg(long)]
    models: Option<PathBuf>,
}

/// The model folders the page is offered.
#[derive(Clone)]
enum Models {
    /// Every folder under this one that holds a `model_index.json`, looked up per request
    /// (folders added while serving appear).
    Under(PathBuf),
    /// Named folders (the built-in models, written out once at start).
    Named(Vec<(String, PathBuf)>),
}

impl Models {
    fn folders(&self) -> Result<Vec<(String, PathBuf)>> {
        match self {
            Models::Named(list) => Ok(list.clone()),
            Models::Under(dir) => {
                let mut names: Vec<_> = std::fs::read_dir(dir)
                    .with_context(|| format!("reading {}", dir.display()))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().join("model_index.json").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(names.into_iter().map(|n| (n.clone(), dir.join(n))).collect())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Models::Under(dir) => dir.display().to_string(),
            Models::Named(list) => format!("built-in: {}", list.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")),
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.site.join("index.html").is_file() {
        anyhow::bail!(
            "{}: no built page (index.html); run scripts/build-web.sh first",
            args.site.display()
        );
    }
    let models = match &args.models {
        Some(dir) => Models::Under(dir.clone()),
        None => Models::Named(
            crate::default_models::names()
                .into_iter()
                .map(|n| crate::default_models::resolve(&n).map(|dir| (n, dir)))
                .collect::<Result<_>>()?,
        ),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!(
            "serving http://{}/ (page {}, models {})",
            listener.local_addr()?,
            args.site.display(),
            models.describe()
        );
        let site = args.site.clone();
        loop {
            let (stream, _) = listener.accept().await?;
            let (site, models) = (site.clone(), models.clone());
            tokio::spawn(async move {
                if let Err(e) = respond(stream, &site, &models).await {
                    eprintln!("serve: {e:#}");
                }
            });
        }
    })
}

/// What a request path resolves to.
#[derive(Debug, PartialEq)]
enum Target {
    File(PathBuf),
    ModelIndex,
    /// A model name that is not offered.
    NoSuchModel,
}

/// Maps a request path to a file under `site` or an offered model folder, refusing anything
/// that would leave them (`..`, absolute or drive components, encoded separators).
fn resolve(path: &str, site: &Path, models: &[(String, PathBuf)]) -> Option<Target> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.contains('%') || path.contains('\\') {
        return None;
    }
    let rel = path.strip_prefix('/')?;
    let rel = if rel.is_empty() { "index.html" } else { rel };
    if rel == "models/index.json" {
        return Some(Target::ModelIndex);
    }
    let rel_path = Path::new(rel);
    if !rel_path.components().all(|c| matches!(c, Component::Normal(_))) || rel.contains("//") {
        return None;
    }
    match rel.strip_prefix("models/") {
        None => Some(Target::File(site.join(rel_path))),
        Some(r) => {
            let (name, file) = r.split_once('/')?;
            Some(match models.iter().find(|(n, _)| n == name) {
                Some((_, root)) => Target::File(root.join(file)),
                None => Target::NoSuchModel,
            })
        }
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("txt") | Some("model") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The offered model folders and their files, as JSON.
fn model_index(models: &[(String, PathBuf)]) -> Result<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<serde_json::Value>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let meta = e.metadata()?;
            if meta.is_dir() {
                walk(&path, root, out)?;
            } else if meta.is_file() {
                let modified = meta.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let rel = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                out.push(serde_json::json!({
                    "path": rel,
                    "bytes": meta.len(),
                    "version": format!("{}-{modified}", meta.len()),
                }));
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    for (name, root) in models {
        let mut files = Vec::new();
        walk(root, root, &mut files)?;
        list.push(serde_json::json!({ "name": name, "files": files }));
    }
    Ok(serde_json::json!({ "models": list }).to_string())
}

async fn respond(stream: TcpStream, site: &Path, models: &Models) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut stream = reader.into_inner();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return send(&mut stream, "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n", false).await;
    }
    let folders = match models.folders() {
        Ok(f) => f,
        Err(e) => {
            let msg = format!("{e:#}\n");
            return send(&mut stream, "500 Internal Server Error", "text/plain", msg.as_bytes(), false).await;
        }
    };
    let body = match resolve(path, site, &folders) {
        None => return send(&mut stream, "400 Bad Request", "text/plain", b"bad path\n", false).await,
        Some(Target::NoSuchModel) => return send(&mut stream, "404 Not Found", "text/plain", b"no such model\n", false).await,
        Some(Target::ModelIndex) => match model_index(&folders) {
            Ok(json) => return send(&mut stream, "200 OK", "application/json", json.as_bytes(), head).await,
            Err(e) => {
                let msg = format!("{e:#}\n");
                return send(&mut stream, "500 Internal Server Error", "text/plain", msg.as_bytes(), false).await;
            }
        },
        Some(Target::File(file)) => (std::fs::read(&file), file),
    };
    match body {
        (Ok(bytes), file) => send(&mut stream, "200 OK", content_type(&file), &bytes, head).await,
        (Err(_), _) => send(&mut stream, "404 Not Found", "text/plain", b"not found\n", false).await,
    }
}

async fn send(stream: &mut TcpStream, status: &str, content_type: &str, body: &[u8], head: bool) -> Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head {
        stream.write_all(body).await?;
    }
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_their_folders() {
        let (site, models) = (Path::new("/s"), [("sd-tiny".to_string(), PathBuf::from("/m/sd-tiny"))]);
        let file = |p: &str| resolve(p, site, &models);
        assert_eq!(file("/"), Some(Target::File("/s/index.html".into())));
        assert_eq!(file("/pkg/a.js?x=1"), Some(Target::File("/s/pkg/a.js".into())));
        assert_eq!(file("/models/index.json"), Some(Target::ModelIndex));
        assert_eq!(
            file("/models/sd-tiny/unet/config.json"),
            Some(Target::File("/m/sd-tiny/unet/config.json".into()))
        );
        assert_eq!(file("/models/other/unet/config.json"), Some(Target::NoSuchModel));
        for bad in [
            "/../etc/passwd",
            "/models/../../x",
            "/a/%2e%2e/b",
            "relative",
            "/a\\..\\b",
            "/models//x",
            "/models/sd-tiny//x",
            "/models/sd-tiny",
        ] {
            assert_eq!(file(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_index_lists_model_folders_with_versions() {
        let dir = std::env::temp_dir().join(format!("sdlite-serve-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m1/unet")).unwrap();
        std::fs::create_dir_all(dir.join("not-a-model")).unwrap();
        std::fs::write(dir.join("m1/model_index.json"), "{}").unwrap();
        std::fs::write(dir.join("m1/unet/config.json"), "{\"a\": 1}").unwrap();
        let folders = Models::Under(dir.clone()).folders().unwrap();
        let v: serde_json::Value = serde_json::from_str(&model_index(&folders).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let models = v["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0]["name"], "m1");
        let files = models[0]["files"].as_array().unwrap();
        assert_eq!(files[0]["path"], "model_index.json");
        assert_eq!(files[1]["path"], "unet/config.json");
        assert_eq!(files[1]["bytes"], 8);
        assert!(files[1]["version"].as_str().unwrap().starts_with("8-"));
    }
}
