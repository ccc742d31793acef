//! The `webdav` flavor: `<stateuri>/<node>/state.json` on a WebDAV server
//! (the Go version's podnat-state-store chart runs one), the node's first
//! label as the folder. The folder is made with MKCOL before the first PUT;
//! GET reads the record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::{Method, StatusCode, Url};

use super::{StateError, StateStore};
use crate::config::short_node_name;

pub struct WebDavStore {
    client: reqwest::Client,
    folder: Url,
    file: Url,
    /// MKCOL answered (made, or already there); made again after a PUT
    /// that says the folder is gone.
    folder_ready: AtomicBool,
}

impl WebDavStore {
    /// `base` is `-stateuri` (`http://podnat-state-store:80` by default).
    pub fn new(base: &str, node_id: &str) -> Result<WebDavStore, StateError> {
        let bad = |reason: String| StateError::Uri {
            uri: base.to_string(),
            reason,
        };
        let mut root = Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if !matches!(root.scheme(), "http" | "https") {
            return Err(bad("not an http:// or https:// URL".into()));
        }
        // Join below the URI's own path, not beside its last segment.
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let node = short_node_name(node_id);
        let folder = root
            .join(&format!("{node}/"))
            .map_err(|e| bad(format!("node {node:?}: {e}")))?;
        let file = folder
            .join("state.json")
            .map_err(|e| bad(format!("node {node:?}: {e}")))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("podnat-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| StateError::Client {
                uri: base.to_string(),
                source,
            })?;
        Ok(WebDavStore {
            client,
            folder,
            file,
            folder_ready: AtomicBool::new(false),
        })
    }

    /// The record's URL.
    pub fn url(&self) -> &Url {
        &self.file
    }

    async fn send(
        &self,
        method: &'static str,
        url: &Url,
        body: Option<&str>,
    ) -> Result<StatusCode, StateError> {
        let m = Method::from_bytes(method.as_bytes()).map_err(|e| StateError::Uri {
            uri: url.to_string(),
            reason: format!("method {method}: {e}"),
        })?;
        let mut req = self.client.request(m, url.clone());
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|source| StateError::Http {
            method,
            url: url.to_string(),
            source,
        })?;
        Ok(resp.status())
    }

    async fn make_folder(&self) -> Result<(), StateError> {
        let status = self.send("MKCOL", &self.folder, None).await?;
        // 201: made. 405: a resource is already there (RFC 4918 9.3.1).
        if status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED {
            self.folder_ready.store(true, Ordering::Release);
            return Ok(());
        }
        Err(StateError::Status {
            method: "MKCOL",
            url: self.folder.to_string(),
            status,
        })
    }
}

impl StateStore for WebDavStore {
    fn flavor(&self) -> &'static str {
        "webdav"
    }

    fn location(&self) -> String {
        self.file.to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<String>, StateError>> {
        Box::pin(async move {
            let err = |source| StateError::Http {
                method: "GET",
                url: self.file.to_string(),
                source,
            };
            let resp = self
                .client
                .get(self.file.clone())
                .send()
                .await
                .map_err(err)?;
            match resp.status() {
                StatusCode::NOT_FOUND => Ok(None),
                s if s.is_success() => Ok(Some(resp.text().await.map_err(err)?)),
                status => Err(StateError::Status {
                    method: "GET",
                    url: self.file.to_string(),
                    status,
                }),
            }
        })
    }

    fn save<'a>(&'a self, json: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            if !self.folder_ready.load(Ordering::Acquire) {
                self.make_folder().await?;
            }
            let status = self.send("PUT", &self.file, Some(json)).await?;
            if status.is_success() {
                return Ok(());
            }
            // 409: the folder is gone (the server lost its data): make it
            // again on the next attempt.
            if status == StatusCode::CONFLICT {
                self.folder_ready.store(false, Ordering::Release);
            }
            Err(StateError::Status {
                method: "PUT",
                url: self.file.to_string(),
                status,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_uri_node_state_json() {
        let s = WebDavStore::new("http://podnat-state-store:80", "node1.example.org").unwrap();
        assert_eq!(
            s.url().as_str(),
            "http://podnat-state-store/node1/state.json"
        );
        assert_eq!(s.folder.as_str(), "http://podnat-state-store/node1/");
        let s = WebDavStore::new("https://dav.example.org:8443/podnat", "n2").unwrap();
        assert_eq!(
            s.url().as_str(),
            "https://dav.example.org:8443/podnat/n2/state.json"
        );
        let e = WebDavStore::new("ftp://x", "n").err().unwrap().to_string();
        assert!(e.contains("not an http"), "{e}");
    }
}
